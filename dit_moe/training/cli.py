"""`dit-moe train` (and `python train.py`): train a (MoE) DiT from a YAML config with dotted overrides.

    dit-moe train                                              # tiny DiT-MoE with DTop-p on the builtin digits
    dit-moe train --config configs/imagenet-S2-E8K2-dtopp.yaml data.path=latents/imagenet256
    dit-moe train --resume latest                              # continue the run named by the config
    dit-moe train --resume latest train.lr=5e-5                # ... with a new learning rate (takes effect)
    accelerate launch --num_processes 2 -m dit_moe train train.global_batch_size=256

The run folder is train.run_dir/train.run_name (default: runs/<config file name>); see the docstring of
dit_moe/training/__init__.py for what it contains and for the metrics.jsonl keys.
Exit codes: 0 done; 2 a user error (bad config, data, checkpoint, locked run folder, disk full; one line on
stderr); 128 + signal number after SIGTERM/SIGINT (a checkpoint was written; continue with --resume latest).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import read_config
from .loop import train

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Train a (MoE) DiT from a YAML experiment config with dotted overrides (section.key=value)."
    p.epilog = "examples:\n" + __doc__.split("\n\n", 1)[1].rstrip()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", default="default",
                   help="YAML experiment config: a path, or a shipped config's name (default: default)")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue exactly from the newest checkpoint of the run (latest) or from PATH")
    p.add_argument("--run-name", default=None, help="run folder name (overrides train.run_name)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=2e-4 train.steps=500")


def run(args: argparse.Namespace) -> Path:
    """Read the config, train; returns the run folder (TrainingInterrupted after a stop signal). The trainer runs the
    validation pass, once, when it knows the number of processes."""
    overrides = list(args.overrides)
    if args.run_name is not None:
        overrides.append(f"train.run_name={args.run_name}")
    cfg = read_config(args.config, overrides)
    if cfg.train.run_name is None:
        cfg.train.run_name = Path(args.config).name.removesuffix(".yaml")
    try:
        run_dir = train(cfg, resume=args.resume)
    except KeyboardInterrupt:   # a second Ctrl-C: no checkpoint now, but every one written so far is intact
        raise KeyboardInterrupt("stopped without saving; the checkpoints written so far are intact") from None
    print(f"run folder: {run_dir}")
    return run_dir
