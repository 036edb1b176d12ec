"""`python -m accelerate_dfkd` and `accelerate launch -m accelerate_dfkd`."""

import sys

from .cli import main

sys.exit(main())
