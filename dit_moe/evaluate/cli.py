"""`dit-moe evaluate GENERATED REFERENCE` (also `python -m dit_moe.evaluate`): metrics of two image sets as JSON.

    dit-moe evaluate samples/samples.npz VIRTUAL_imagenet256_labeled.npz --metrics fid,sfid,isc,kid,prc --out m.json

Every value is checked before any feature is extracted; a bad input is one line naming it (exit code 2).
"""
import argparse
import json
import math
import os

from ..checks import check_at_least, check_output_file
from ..cli import add_device_argument, run_command
from ..errors import EvaluationError, InputNotFoundError
from ..inference import resolve_device
from . import __doc__ as package_doc
from .extraction import DEFAULT_EXTRACTOR
from .metrics import METRICS, compute_metrics, write_metrics_json

__all__ = ["add_arguments", "add_metric_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = package_doc.strip()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("generated", help="folder of images, or .npz with arr_0 (uint8 NHWC) or mu/sigma")
    p.add_argument("reference", help="folder of images, .npz with arr_0, ADM reference batch, or save_stats file")
    add_metric_arguments(p)
    p.add_argument("--batch-size", type=int, default=64)
    add_device_argument(p)
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: 4 for folders "
                                                                  "on CUDA, else 0)")
    p.add_argument("--recursive", action="store_true", help="search image folders recursively")
    p.add_argument("--kid-subset-size", type=int, default=None)
    p.add_argument("--settings", default=None, metavar="JSON",
                   help="JSON file of settings to record (model, checkpoint step, sampler, steps, cfg, seeds, ...)")
    p.add_argument("--out", default=None, help="write metrics + settings to this JSON file")
    p.add_argument("--save-ref-stats", default=None, metavar="PATH", help="also write the reference's FID "
                                                                          "(and sFID) statistics to this .npz")
    p.add_argument("--verbose", action="store_true")


def add_metric_arguments(p, when: str = "") -> None:
    """--metrics, --extractor, --inception-weights: what to compute and with which features (``dit-moe evaluate``;
    ``dit-moe sample --fid`` with ``when="with --fid: "``)."""
    p.add_argument("--metrics", default="fid",
                   help=f"{when}comma-separated subset of {','.join(METRICS)} (default fid)")
    p.add_argument("--extractor", default=DEFAULT_EXTRACTOR,
                   help=f"{when}torch-fidelity feature extractor (default {DEFAULT_EXTRACTOR}; digits-cnn for the "
                        "embedded digits)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"{when}local extractor weights (offline machines), e.g. "
                        "weights-inception-2015-12-05-6726825d.pth")


def run(args: argparse.Namespace) -> dict:
    """The metrics of ``args.generated`` against ``args.reference``; prints them, writes --out; returns the result."""
    settings = _check_cli(args)
    result = compute_metrics(
        args.generated, args.reference, metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        feature_extractor=args.extractor, inception_weights=args.inception_weights, batch_size=args.batch_size,
        device=args.device, settings=settings, verbose=args.verbose, kid_subset_size=args.kid_subset_size,
        num_workers=args.num_workers, recursive=args.recursive, save_reference_stats=args.save_ref_stats)
    if args.out:
        write_metrics_json(args.out, result["metrics"], result["settings"])
    for key, value in result["metrics"].items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) and math.isfinite(value) else f"{key}: {value}")
    return result


def main(argv=None) -> int:
    return run_command("evaluate", argv, prog="python -m dit_moe.evaluate", label="evaluate")


def _check_cli(args):
    """Every command-line value checked before any work; returns the --settings object (or None)."""
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0),
                             ("--kid-subset-size", args.kid_subset_size, 1)):
        check_at_least(flag, value, low, EvaluationError)
    resolve_device(args.device)                  # the one --device check (evaluate, sample, analyze, demo, study)
    check_output_file("--out", args.out, EvaluationError)
    check_output_file("--save-ref-stats", args.save_ref_stats, EvaluationError)
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise InputNotFoundError(f"--inception-weights {args.inception_weights} does not exist")
    if not args.settings:
        return None
    if not os.path.isfile(args.settings):
        raise InputNotFoundError(f"--settings {args.settings} does not exist")
    try:
        with open(args.settings) as fh:
            settings = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(f"--settings {args.settings} is not valid JSON ({e})") from e
    if not isinstance(settings, dict):
        raise EvaluationError(f"--settings {args.settings} must hold a JSON object")
    return settings
