"""`python -m dit_moe` = the `dit-moe` command (dit_moe/cli.py); `python -m dit_moe models` lists the registry."""
import sys

from .cli import list_models, main

__all__ = ["list_models", "main"]

if __name__ == "__main__":
    sys.exit(main())
