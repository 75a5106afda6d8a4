"""`python -m dit_moe.analyze` = `dit-moe analyze`."""
import sys

from .cli import main

sys.exit(main())
