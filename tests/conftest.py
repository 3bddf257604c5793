"""Test-wide settings: one CPU thread per test process (the suite runs beside other work on 2 cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

from spikeprune._ext import cpu_kernels, use_cpp  # noqa: E402


@pytest.fixture(params=["cpp", "eager"])
def backend(request):
    """Run a test on the compiled CPU kernels and on eager PyTorch: both must give the same results."""
    use_cpp(request.param == "cpp")
    if request.param == "cpp" and cpu_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable (no C++ compiler / ninja)")
    yield request.param
    use_cpp(True)
