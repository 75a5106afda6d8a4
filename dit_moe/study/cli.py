"""`dit-moe study CONFIG` (also `python -m dit_moe.study`): run a routing study, then tabulate and plot it.

    dit-moe study configs/study-digits.yaml --jobs 2 --plots-dir docs/study
    OMP_NUM_THREADS=1 dit-moe study configs/study-digits-v2.yaml --jobs 2 --plots-dir docs/study-v2
    accelerate launch --multi_gpu --num_processes 8 -m dit_moe study configs/study-imagenet-S2.yaml data.path=latents/in256

The study config and every arm's experiment config are validated, and the flags, the reference and the extractor
checked, before the output folder is created; a bad value is one line naming it (exit code 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..checks import check_output_dir
from ..cli import add_device_argument, run_command
from . import __doc__ as package_doc
from .config import StudyError, load_study
from .run import report_study, run_study

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = package_doc.split("\n")[0]
    p.epilog = __doc__.split("\n\n")[1]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("config", type=Path, help="study YAML (e.g. configs/study-digits.yaml)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes; cores split evenly)")
    p.add_argument("--output", help="override the study's output folder")
    p.add_argument("--records", help="override the study's records folder (one JSON per finished run, kept in git)")
    p.add_argument("--plots-dir", type=Path, help="write the PNGs here (default <output>/plots)")
    p.add_argument("--arms", nargs="+", help="run only these arms (and their calibration sources)")
    p.add_argument("--seeds", type=int, nargs="+", help="run and report only these seeds (default: the config's)")
    add_device_argument(p)
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the report of what has finished (records, finished runs), list the rest")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="extra overrides of every arm's experiment config (appended to base.overrides)")


def run(args: argparse.Namespace) -> dict:
    """Load the study, run what is not finished, write the report; returns the summary (results.json)."""
    check_output_dir("--plots-dir", args.plots_dir, StudyError)
    study = load_study(args.config, args.overrides, args.output, args.records)
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            raise StudyError(f"--seeds {args.seeds}: seeds must be distinct")
        study.seeds = list(args.seeds)
    if args.report_only:
        summary = report_study(study, plots_dir=args.plots_dir, only_arms=args.arms)
    else:
        summary = run_study(study, jobs=args.jobs, device=args.device, plots_dir=args.plots_dir, only_arms=args.arms)
    if summary:
        print(f"\nresults: {study.output / 'results.md'}, {study.output / 'results.json'}; plots: "
              + ", ".join(summary.get("plots", [])))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("study", argv, prog="python -m dit_moe.study", label="study")
