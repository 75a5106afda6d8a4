"""`python sample.py CHECKPOINT`: a labelled grid (default) or N samples to a folder + npz for FID.

The sampling flags come from flags.py (shared with ``dit_moe.analyze`` and ``dit_moe.demo``) and are checked against
the checkpoint's objective before anything is sampled. Every error is one line naming the flag, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from ..config import SampleConfig
from .bulk import Evaluation, SingleProcess, generate
from .calibrate import calibrate_threshold, require_dtopp
from .experts import format_active
from .flags import add_checkpoint_arguments, add_class_arguments, add_sampler_arguments, settings_from_args
from .grid import sample_grid
from .loop import LABEL_POLICIES
from .settings import SamplingError

__all__ = ["build_parser", "run", "main"]

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Sample a trained dit-moe checkpoint (DDPM or flow): a labelled grid (default) or N samples to a "
                    "folder/npz for FID (--num-samples, works under `accelerate launch`). Defaults come from the "
                    "checkpoint's experiment `sample` section; flags override them.",
    )
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
    b.add_argument("--metrics", default="fid", help="with --fid: comma-separated subset of fid,isc,kid,prc")
    b.add_argument("--extractor", default="inception-v3-compat",
                   help="with --fid: torch-fidelity feature extractor (digits-cnn for the embedded digits)")
    b.add_argument("--inception-weights", metavar="PATH", help="with --fid: local Inception weights (offline machines)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", help="grid: PNG path (default samples.png); bulk: output folder (required)")
    s = p.add_argument_group("DTop-p inference-time sparsity")
    s.add_argument("--target-experts", type=float,
                   help="calibrate the DTop-p threshold so sampling activates K experts per token")
    s.add_argument("--calibration-samples", type=int, default=16, help="samples whose trajectory calibrates the threshold")
    return p


def _describe(settings: SampleConfig) -> str:
    text = f"{settings.sampler} {settings.steps} steps, cfg {settings.cfg_scale}"
    if settings.guidance_interval is not None and settings.cfg_scale != 1.0:
        text += f" for t in [{settings.guidance_interval[0]}, {settings.guidance_interval[1]}]"
    if settings.time_shift not in (None, 1.0):
        text += f", time shift {settings.time_shift}"
    return text


def run(args: argparse.Namespace) -> dict:
    """Everything behind the command line; returns a summary (samples.json content for bulk runs)."""
    from ..inference import load

    bulk = args.num_samples is not None
    if bulk and not args.out:
        raise SamplingError("--num-samples needs --out DIR (the folder that receives images/, samples.npz, samples.json)")
    if args.fid and not bulk:
        raise SamplingError("--fid needs bulk sampling (--num-samples N --out DIR)")
    state = SingleProcess()
    if bulk:
        from accelerate import PartialState
        # Without cpu=True Accelerate sets up no process group on a machine without CUDA (torchrun on CPUs).
        state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = torch.device(args.device) if args.device else getattr(state, "device", None) or torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")

    bundle = load(args.checkpoint, weights=args.weights, device=device, vae=args.vae)
    settings = settings_from_args(args, bundle)           # every flag checked before anything is sampled
    bundle.decode                                         # a VAE that cannot be loaded fails here, not mid-run
    calibration = None
    if args.target_experts is not None:
        require_dtopp(bundle.model, bundle.where)
        calibration = calibrate_threshold(bundle.model, args.target_experts, settings=settings, shape=bundle.shape,
                                          num_classes=bundle.num_classes, seed=settings.seed,
                                          num_samples=args.calibration_samples, objective=bundle.objective)
        if state.num_processes > 1:
            # Every rank calibrated on the same inputs; GPU non-determinism must not leave them with different p.
            from accelerate.utils import broadcast
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

    evaluation = None
    if args.fid:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        evaluation = Evaluation(reference=args.fid, metrics=metrics, extractor=args.extractor,
                                inception_weights=args.inception_weights)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..inference import InferenceError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (SamplingError, CheckpointError, ConfigError, InferenceError, OSError) as e:   # OSError: e.g. a VAE
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0
