"""Train a (MoE) DiT: `python train.py [--config FILE] [--resume latest|PATH] [section.key=value ...]`.

The same as `dit-moe train` (dit_moe/training/cli.py, where the options and examples are); kept so that
`python train.py` and `accelerate launch train.py` work from a checkout.
"""
import sys

from dit_moe.cli import run_command


def main(argv=None) -> int:
    return run_command("train", argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
