"""`python -m dit_moe` = the `dit-moe` command (dit_moe/cli.py); `python -m dit_moe models` lists the registry."""
import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
