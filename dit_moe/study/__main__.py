"""`python -m dit_moe.study` = `dit-moe study` (and `accelerate launch -m dit_moe.study`)."""
import sys

from .cli import main

sys.exit(main())
