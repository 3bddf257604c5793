"""``python -m spikeprune._ext``: build the compiled CPU kernels now (e.g. right after ``pip install``), so that
the first run does not wait for the compiler; says where they are. Exit status 1 when they cannot be built (the
library still works, on eager PyTorch); ``SPIKEPRUNE_CPP=0`` skips the build (status 0)."""

import os
import sys

from . import build

if os.environ.get("SPIKEPRUNE_CPP", "1") == "0":
    print("spikeprune: compiled CPU kernels switched off (SPIKEPRUNE_CPP=0); nothing built", file=sys.stderr)
    sys.exit(0)
sys.exit(0 if build(verbose=True) is not None else 1)
