"""`python -m krea2_train.cli` (what `accelerate launch -m krea2_train.cli CONFIG` runs)."""

import sys

from krea2_train.cli import main

sys.exit(main())
