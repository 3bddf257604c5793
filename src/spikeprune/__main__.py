"""``python -m spikeprune`` (and ``torchrun -m spikeprune``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
