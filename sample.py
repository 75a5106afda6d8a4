"""Sample a trained dit-moe checkpoint: `python sample.py CHECKPOINT [--out grid.png | --num-samples N --out DIR]`.

The same as `dit-moe sample` (dit_moe/sampling/cli.py, where the options and examples are); kept so that
`python sample.py` and `accelerate launch sample.py` work from a checkout.
"""
import sys

from dit_moe.cli import run_command


def main(argv=None) -> int:
    return run_command("sample", argv, prog="sample.py")


if __name__ == "__main__":
    sys.exit(main())
