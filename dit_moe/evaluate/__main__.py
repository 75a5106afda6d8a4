"""`python -m dit_moe.evaluate` = `dit-moe evaluate`."""
import sys

from .cli import main

sys.exit(main())
