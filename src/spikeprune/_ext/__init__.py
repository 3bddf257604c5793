"""Compiled CPU kernels (``spikeprune_cpu.cpp``): the fused LIF/IF neuron and the event-driven linear layers.

They are built once, on first use, with :func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja are
needed; the build lands in ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). When the build fails
or is switched off (``use_cpp(False)`` or ``SPIKEPRUNE_CPP=0``), everything runs the eager PyTorch code, which gives
the same results: the kernels are only faster (one call for all T steps instead of several kernels per step).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["cpu_kernels", "kernels_for", "t_major_dense", "use_cpp"]

_SOURCE = Path(__file__).with_name("spikeprune_cpu.cpp")
_CFLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp")
_DTYPES = (torch.float32, torch.float64)
_STATE: dict = {"enabled": os.environ.get("SPIKEPRUNE_CPP", "1") != "0", "module": None, "tried": False}


def use_cpp(enabled: bool = True) -> None:
    """Switch the compiled CPU kernels on (default, built on first use) or off (eager PyTorch everywhere)."""
    _STATE["enabled"] = bool(enabled)


def cpu_kernels() -> ModuleType | None:
    """The compiled kernel module, building it the first time; ``None`` when switched off or the build failed
    (then a warning says why, once per process)."""
    if not _STATE["enabled"]:
        return None
    if not _STATE["tried"]:
        _STATE["tried"] = True
        _STATE["module"] = _build()
    return _STATE["module"]


def kernels_for(x) -> ModuleType | None:
    """The compiled kernels when they can take ``x`` (a CPU float32/float64 tensor), else ``None``."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return None
    return cpu_kernels()


def t_major_dense(x, broadcast: bool = False) -> bool:
    """Whether ``x`` ``[T, ...]`` has the layout the kernels walk through: T outermost and each step dense
    (contiguous or channels-last); with ``broadcast``, one step expanded over T (stride 0) also qualifies."""
    if x.is_contiguous():
        return True
    step = x[0]
    dense = step.is_contiguous() or (step.dim() == 4 and step.is_contiguous(memory_format=torch.channels_last))
    return dense and (x.shape[0] <= 1 or x.stride(0) == step.numel() or (broadcast and x.stride(0) == 0))


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    # a new build per source and per CPU feature set (it is compiled for the CPU it runs on, -march=native)
    # (-fno-trapping-math lets GCC turn the surrogate's select into vector blends: 9x faster backward, measured)
    key = _SOURCE.read_bytes() + _cpu_flags() + repr(_CFLAGS).encode()
    name = "spikeprune_cpu_" + hashlib.sha1(key).hexdigest()[:12]
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob(f"{name}*.so")):
            print("spikeprune: building the compiled CPU kernels (once; about a minute) ...", file=sys.stderr,
                  flush=True)
        return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=list(_CFLAGS),
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a read-only cache: the eager path does the same work
        warnings.warn(f"spikeprune: compiled CPU kernels unavailable ({type(e).__name__}: {str(e)[:300]}); "
                      "using eager PyTorch (same results, slower). Set SPIKEPRUNE_CPP=0 to skip the build.",
                      RuntimeWarning, stacklevel=3)
        return None


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return platform.processor().encode()
