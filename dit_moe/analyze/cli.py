"""`dit-moe analyze [CHECKPOINT] [--run DIR]` (also `python -m dit_moe.analyze`): routing plots, training curves.

    dit-moe analyze runs/default                   # routing plots of the latest checkpoint -> runs/default/analysis
    dit-moe analyze --run runs/default             # training curves of runs/default/metrics.jsonl (no torch import)

Every flag is checked before the checkpoint is loaded; a bad value is one line naming it (exit code 2).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..checks import check_at_least, check_output_dir
from ..cli import run_command
from .curves import plot_training_curves
from .errors import AnalysisError
from ..sampling.flags import (add_checkpoint_arguments, add_class_arguments, add_sampler_arguments, check_sample_flags,
                              flag_overrides)

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Routing statistics and plots of an MoE DiT checkpoint (activated experts per layer, timestep, "
                     "class and patch; expert load; DRN scale) and/or training curves of a run.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--run", help="run directory: plot the training curves of its metrics.jsonl")
    p.add_argument("--out", help="output folder (default <run>/analysis, or <checkpoint>/analysis outside a run)")
    add_class_arguments(p, "default 2")
    p.add_argument("--spatial-steps", type=int, default=4, help="timesteps shown in the spatial maps")
    add_checkpoint_arguments(p)
    add_sampler_arguments(p, steps_help="; analyze: 50 unless given")


def run(args: argparse.Namespace) -> dict:
    """The analyses the arguments ask for; returns {"report": analysis.json content or None, "curves": [files]}."""
    if args.checkpoint is None and args.run is None:
        raise AnalysisError("give a CHECKPOINT, --run DIR, or both")
    check_output_dir("--out", args.out, AnalysisError)
    result = {"report": None, "curves": []}
    if args.checkpoint is not None:
        from .report import analyze_checkpoint   # here: torch and the model load only for a checkpoint (not --run)

        check_at_least("--spatial-steps", args.spatial_steps, 1, AnalysisError)
        check_sample_flags(args)
        given = flag_overrides(args)
        for key in ("steps", "seed", "batch_size", "num_per_class"):     # analysis defaults, not the checkpoint's
            given.pop(key, None)
        report = analyze_checkpoint(
            args.checkpoint, out_dir=args.out, classes=args.classes,
            num_per_class=2 if args.num_per_class is None else args.num_per_class,
            num_steps=50 if args.steps is None else args.steps, seed=0 if args.seed is None else args.seed,
            device=args.device, which=args.weights, spatial_steps=args.spatial_steps,
            batch_size=32 if args.batch_size is None else args.batch_size, vae=args.vae, **given)
        ae = report["active_experts"]
        print(f"{report['model']} ({report['routing']}): {ae['mean']:.3f} activated experts per token; per layer "
              + " ".join(f"{v:.2f}" for v in ae["per_layer"]))
        print(f"wrote {len(report['files'])} files to {report['out_dir']}: {', '.join(report['files'])}")
        result["report"] = report
    if args.run is not None:
        files = plot_training_curves(args.run, out_dir=args.out)
        print(f"wrote {', '.join(str(f) for f in files)}")
        result["curves"] = files
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("analyze", argv, prog="python -m dit_moe.analyze", label="analyze")
