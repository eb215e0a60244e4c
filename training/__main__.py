"""`python -m training ...`: the training CLI (see training/train.py)."""

import sys

from training.train import main

sys.exit(main())
