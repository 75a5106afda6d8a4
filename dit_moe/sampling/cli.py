"""`dit-moe sample CHECKPOINT` (and `python sample.py`): a labelled grid (default) or N samples to a folder + npz.

    dit-moe sample runs/digits/checkpoints/step-0002000 --cfg-scale 3 --out grid.png
    accelerate launch -m dit_moe sample RUN --num-samples 50000 --out samples/ --sampler ddpm --steps 250 --cfg-scale 1.5
    dit-moe sample FLOW_RUN --sampler heun --steps 25 --cfg-scale 1.8 --guidance-interval 0 0.7
    dit-moe sample RUN --target-experts 1.5 --num-samples 1000 --out sparse/ --fid ref.npz

The sampling flags come from flags.py (shared with ``dit_moe.analyze`` and ``dit_moe.demo``). Every value is checked
before the checkpoint is loaded or a folder is created -- the flags on their own first, then against the
checkpoint's objective, and the ``--fid`` reference (it must open as an image folder, npz or statistics file) --
so a bad value is one line naming it (exit code 2) and nothing is sampled.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import broadcast
from PIL import Image

from ..checks import check_at_least, check_output_dir, check_output_file, check_positive
from ..cli import run_command
from ..config import SampleConfig
from ..evaluate.cli import add_metric_arguments
from ..inference import load, resolve_device
from .bulk import Evaluation, SingleProcess, generate
from .calibrate import calibrate_threshold, require_dtopp
from .experts import format_active
from .flags import (add_checkpoint_arguments, add_class_arguments, add_sampler_arguments, check_sample_flags,
                    settings_from_args)
from .grid import sample_grid
from .loop import LABEL_POLICIES
from .settings import SamplingError

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Sample a trained dit-moe checkpoint (DDPM or flow): a labelled grid (default) or N samples to a\n"
                     "folder + npz for FID (--num-samples; works under `accelerate launch`). Defaults come from the\n"
                     "checkpoint's experiment `sample` section; flags override them.")
    p.epilog = "examples:\n" + __doc__.split("\n\n")[1]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    add_checkpoint_arguments(p)
    add_sampler_arguments(p)
    g = p.add_argument_group("grid")
    add_class_arguments(g, "default: the checkpoint's sample.num_per_class")
    g.add_argument("--ncol", type=int, help="grid columns (default: samples per class)")
    b = p.add_argument_group("bulk sampling")
    b.add_argument("--num-samples", type=int, help="draw N samples into --out (PNG files + samples.npz + samples.json)")
    b.add_argument("--labels", choices=LABEL_POLICIES, default="balanced",
                   help="balanced: i %% num_classes, seeded permutation (default); random: uniform (DiT's sample_ddp)")
    b.add_argument("--fid", metavar="REF", help="after sampling, compute metrics against REF (image folder, ADM "
                   "reference npz, or statistics npz) and write DIR/metrics.json")
    add_metric_arguments(b, when="with --fid: ")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", help="grid: PNG path (default samples.png); bulk: output folder (required)")
    s = p.add_argument_group("DTop-p inference-time sparsity")
    s.add_argument("--target-experts", type=float,
                   help="calibrate the DTop-p threshold so sampling activates K experts per token")
    s.add_argument("--calibration-samples", type=int, default=16, help="samples whose trajectory calibrates the threshold")


def _describe(settings: SampleConfig) -> str:
    text = f"{settings.sampler} {settings.steps} steps, cfg {settings.cfg_scale}"
    if settings.guidance_interval is not None and settings.cfg_scale != 1.0:
        text += f" for t in [{settings.guidance_interval[0]}, {settings.guidance_interval[1]}]"
    if settings.time_shift not in (None, 1.0):
        text += f", time shift {settings.time_shift}"
    return text


def run(args: argparse.Namespace) -> dict:
    """Everything behind the command line; returns a summary (samples.json content for bulk runs)."""
    bulk = args.num_samples is not None
    evaluation = _check_args(args, bulk)                  # flags on their own: before the checkpoint is loaded
    requested = resolve_device(args.device) if args.device else None
    state = SingleProcess()
    if bulk:
        # Without cpu=True Accelerate sets up no process group on a machine without CUDA (torchrun on CPUs).
        state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = requested or getattr(state, "device", None) or resolve_device(None)

    bundle = load(args.checkpoint, weights=args.weights, device=device, vae=args.vae)
    settings = settings_from_args(args, bundle)           # every flag checked before anything is sampled
    if not bulk:
        check_output_file("--out", args.out, SamplingError, suffixes=Image.registered_extensions())
    bundle.decode                                         # a VAE that cannot be loaded fails here, not mid-run
    calibration = None
    if args.target_experts is not None:
        require_dtopp(bundle.model, bundle.where)
        calibration = calibrate_threshold(bundle.model, args.target_experts, settings=settings, shape=bundle.shape,
                                          num_classes=bundle.num_classes, seed=settings.seed,
                                          num_samples=args.calibration_samples, objective=bundle.objective)
        if state.num_processes > 1:
            # Every rank calibrated on the same inputs; GPU non-determinism must not leave them with different p.
            threshold = bundle.model.routing_controller.threshold
            threshold.copy_(broadcast(threshold.clone(), from_process=0))
            calibration["threshold"] = threshold.float().cpu().tolist()
        if state.is_main_process:
            print(f"calibrated DTop-p threshold {['%.4f' % v for v in calibration['threshold']]} -> "
                  f"{calibration['measured']:.3f} experts per token (target {args.target_experts})")

    if not bulk:
        result = sample_grid(bundle, settings, classes=args.classes, out=args.out or "samples.png", ncol=args.ncol)
        print(f"wrote {result['path']} ({len(result['labels'])} samples, {_describe(settings)})")
        if result["active_experts"]:
            print(format_active(result["active_experts"]))
        return {"grid": result["path"], "classes": result["classes"], "active_experts": result["active_experts"],
                "calibration": calibration}

    summary = generate(bundle, args.out, settings, num_samples=args.num_samples, labels=args.labels, state=state,
                       progress=not args.no_progress, evaluation=evaluation,
                       run_info={"target_experts": args.target_experts},
                       extra={"calibration": calibration} if calibration else None)
    if state.is_main_process:
        print(f"wrote {args.num_samples} samples to {args.out} ({summary['generated_this_run']} new, "
              f"{summary['images_per_second']} images/s over {summary['processes']} process(es); "
              f"{_describe(settings)})")
        if summary.get("active_experts"):
            print(format_active(summary["active_experts"]))
        if evaluation is not None:
            print(f"metrics vs {args.fid}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["metrics"].items()))
    return summary


def _check_args(args: argparse.Namespace, bulk: bool) -> Optional[Evaluation]:
    """Every flag that can be checked without the checkpoint; returns the --fid evaluation (its reference opened
    and checked here, so a bad reference fails before any sample is drawn)."""
    check_sample_flags(args)
    check_at_least("--num-samples", args.num_samples, 1, SamplingError)
    check_at_least("--ncol", args.ncol, 1, SamplingError)
    check_at_least("--calibration-samples", args.calibration_samples, 1, SamplingError)
    check_positive("--target-experts", args.target_experts, SamplingError)
    if bulk:
        if not args.out:
            raise SamplingError("--num-samples needs --out DIR (the folder that receives images/, samples.npz, "
                                "samples.json)")
        check_output_dir("--out", args.out, SamplingError)
    elif args.fid:
        raise SamplingError("--fid needs bulk sampling (--num-samples N --out DIR)")
    if not args.fid:
        return None
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    evaluation = Evaluation(reference=args.fid, metrics=metrics, extractor=args.extractor,
                            inception_weights=args.inception_weights)
    evaluation.check(label="--fid")
    return evaluation


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("sample", argv, prog="sample.py")
