"""Train a (MoE) DiT: `python train.py [--config configs/default.yaml] [--resume latest|PATH] [section.key=value ...]`.

Examples:
    python train.py                                            # tiny DiT-MoE with DTop-p on the builtin digits
    python train.py --config configs/imagenet-S2-E8K2-dtopp.yaml data.path=latents/imagenet256
    python train.py --resume latest                            # continue the run named by the config
    python train.py --resume latest train.lr=5e-5              # ... with a new learning rate (takes effect)
    accelerate launch --num_processes 2 train.py train.global_batch_size=256

The run folder is train.run_dir/train.run_name (default: runs/<config file name>); see the docstring of
dit_moe/training/__init__.py for what it contains and for the metrics.jsonl keys.
Exit codes: 0 done; 2 a user error (bad config, data, checkpoint, locked run folder, disk full; one line on
stderr); 128 + signal number after SIGTERM/SIGINT (a checkpoint was written; continue with --resume latest).
"""
import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/default.yaml", help="YAML experiment config")
    parser.add_argument("--resume", default=None, metavar="latest|PATH",
                        help="continue exactly from the newest checkpoint of the run (latest) or from PATH")
    parser.add_argument("--run-name", default=None, help="run folder name (overrides train.run_name)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=2e-4 train.steps=500")
    args = parser.parse_intermixed_args(argv)  # options may come between the overrides

    from dit_moe.config import load_config
    from dit_moe.errors import DitMoeError, TrainingInterrupted, cli_error
    from dit_moe.training import train

    try:
        overrides = list(args.overrides)
        if args.run_name is not None:
            overrides.append(f"train.run_name={args.run_name}")
        cfg = load_config(args.config, overrides)
        if cfg.train.run_name is None:
            cfg.train.run_name = Path(args.config).stem
        run_dir = train(cfg, resume=args.resume)
    except TrainingInterrupted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 128 + e.signum
    except DitMoeError as e:
        return cli_error("train.py", e)
    except KeyboardInterrupt:
        print("train.py: interrupted (Ctrl-C): stopped without saving; the checkpoints written so far are intact",
              file=sys.stderr)
        return 130
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
