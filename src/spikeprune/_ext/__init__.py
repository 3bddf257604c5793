"""Compiled CPU kernels (one ``.cpp`` per kernel family, see ``spikeprune_cpu.h``): build and load.

The rest of spikeprune calls them through :mod:`spikeprune.kernels`.

They are built once with :func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja are needed): at install
time with ``python -m spikeprune._ext`` (:func:`build`), else on first use. The build lands in
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in a folder keyed by what the library depends on
(source content, flags, CPU features, torch and Python ABI; not the checkout's path, so checkouts and virtualenvs
of one commit share it), and says on stderr what it does and how long it took. One process builds at a time; the
others wait (saying so, at most ``SPIKEPRUNE_CPP_WAIT`` s, default 900, then eager PyTorch), and a lock left by a
killed build is removed (saying so) instead of waited for. When the build fails or is switched off
(``use_cpp(False)`` or ``SPIKEPRUNE_CPP=0``), everything runs the eager PyTorch code, which gives the same results:
the kernels are only faster (one call for all T steps instead of several kernels per step).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import signal
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; a stale torch lock is then recognised by its age
    fcntl = None

__all__ = ["build", "build_dir", "cpu_kernels", "kernels_for", "t_major_dense", "use_cpp"]

_HERE = Path(__file__).parent
_SOURCES = tuple(sorted(_HERE.glob("*.cpp")))  # one per kernel family, plus bindings.cpp
_FILES = tuple(sorted([*_SOURCES, *_HERE.glob("*.h")]))  # what the build depends on
_CFLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp")
_DTYPES = (torch.float32, torch.float64)
_LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"
_DONE = "spikeprune.built"  # written after a complete build: then later processes just import the library
_WAIT_S = 900.0  # longest wait for another process's build (SPIKEPRUNE_CPP_WAIT); then eager PyTorch
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


def build(verbose: bool = True) -> ModuleType | None:
    """Build the compiled kernels now (``python -m spikeprune._ext``; at install time, so that the first run does
    not wait for the compiler) or load them when they are built; with ``verbose``, say where they are. ``None``
    (with a warning) when they cannot be built. Ignores ``use_cpp``/``SPIKEPRUNE_CPP``: it is an explicit request."""
    module = _build(verbose=verbose)
    _STATE["module"], _STATE["tried"] = module, True
    return module


def build_dir() -> Path:
    """The folder the kernels are built in: ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/...``)
    / ``spikeprune_cpu_<key>``, the key a hash of all that the built library depends on (see :func:`_key`)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(_key()[0], verbose=False))


def _key() -> tuple[str, str]:
    """The build's name and a description of what it depends on: the source (its content, not its path, so that
    every checkout or virtualenv of the same commit shares one build), the flags, the CPU features (it is compiled
    with -march=native), torch's version and C++ ABI, and the Python ABI. (-fno-trapping-math lets GCC turn the
    surrogate's select into vector blends: 9x faster backward, measured.)"""
    lines = [
        *(f"source {f.name} sha256 {hashlib.sha256(f.read_bytes()).hexdigest()}" for f in _FILES),
        f"cflags {' '.join(_CFLAGS)}",
        f"machine {platform.machine()}",
        f"cpu {_cpu_flags().decode(errors='replace').strip()}",
        f"torch {torch.__version__} {getattr(torch.version, 'git_version', '')} "
        f"cxx11abi {int(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', 0))}",
        f"python {sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}",
    ]
    text = "\n".join(lines) + "\n"
    return "spikeprune_cpu_" + hashlib.sha1(text.encode()).hexdigest()[:12], text


def _build(verbose: bool = False) -> ModuleType | None:
    from torch.utils import cpp_extension

    name, description = _key()
    try:
        where = Path(cpp_extension._get_build_directory(name, verbose=False))
        library, done = where / f"{name}{_LIB_EXT}", where / _DONE
        if not (library.exists() and done.exists()):
            with _BuildLock(where, _wait_s()) as lock:
                if not (library.exists() and done.exists()):  # not built by the process we waited for
                    lock.clear_stale_torch_lock()
                    # build from a copy in the build folder: ninja records the source's path, and a path per
                    # checkout would make every checkout rebuild the others' kernels
                    for f in _FILES:
                        _write_if_changed(where / f.name, f.read_bytes())
                    print(f"spikeprune: building the compiled CPU kernels in {where} (once; about a minute "
                          "or two) ...", file=sys.stderr, flush=True)
                    start = time.monotonic()
                    sources = [str(where / f.name) for f in _SOURCES]
                    module = cpp_extension.load(name, sources, extra_cflags=list(_CFLAGS), extra_ldflags=["-fopenmp"],
                                                build_directory=str(where), verbose=False)
                    print(f"spikeprune: built the compiled CPU kernels in {time.monotonic() - start:.0f} s "
                          f"({where})", file=sys.stderr, flush=True)
                    _write_if_changed(done, description.encode())
                    return module
        module = _load_library(name, library)
        if verbose:
            print(f"spikeprune: compiled CPU kernels ready ({library})", file=sys.stderr, flush=True)
        return module
    except Exception as e:  # no compiler, no ninja, a read-only cache, a build that waited too long: the eager
        # path does the same work
        warnings.warn(f"spikeprune: compiled CPU kernels unavailable ({type(e).__name__}: {str(e)[:300]}); "
                      "using eager PyTorch (same results, slower). Set SPIKEPRUNE_CPP=0 to skip the build.",
                      RuntimeWarning, stacklevel=3)
        return None


def _load_library(name: str, path: Path) -> ModuleType:
    """Import a built kernel library directly (no ninja run: it is complete, its ``spikeprune.built`` says so)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_s() -> float:
    try:
        return float(os.environ.get("SPIKEPRUNE_CPP_WAIT", _WAIT_S))
    except ValueError:
        return _WAIT_S


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _BuildLock:
    """One builder per build folder, across processes: an ``flock`` on ``spikeprune.flock`` (the kernel drops it
    when its holder dies, however it dies), which holds the holder's pid for the others to name. Waiting for a
    live builder says so in one line and gives up after ``wait_s`` (``TimeoutError``: the caller runs eager).

    While it is held, a torch build ``lock`` in the folder was left by a killed build (every builder takes this
    lock first), so :meth:`clear_stale_torch_lock` removes it (torch would wait for it forever), with what that
    build left half done (its compiler, still running, is stopped). Where ``flock`` is unavailable (no ``fcntl``,
    a file system without locks), a torch ``lock`` older than ``wait_s`` counts as stale."""

    def __init__(self, where: Path, wait_s: float):
        self.where, self.wait_s, self.fd, self.held = where, wait_s, None, False
        self.deadline = time.monotonic() + wait_s

    def __enter__(self) -> _BuildLock:
        if fcntl is None:
            return self
        try:
            self.fd = os.open(self.where / "spikeprune.flock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return self
        told = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = self._holder()
                if not told:
                    print(f"spikeprune: waiting for another process building the kernels in {self.where} "
                          f"(pid {pid}; up to {self.wait_s:.0f} s, SPIKEPRUNE_CPP_WAIT)", file=sys.stderr,
                          flush=True)
                    told = True
                if time.monotonic() > self.deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise TimeoutError(f"another process (pid {pid}) has been building the kernels in "
                                       f"{self.where} for over {self.wait_s:.0f} s (SPIKEPRUNE_CPP_WAIT)") from None
                time.sleep(0.2)
            except OSError:  # no locks on this file system
                return self
        self.held = True
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            if self.held:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def _holder(self) -> str:
        try:
            return os.pread(self.fd, 32, 0).decode().strip() or "?"
        except (OSError, UnicodeDecodeError):
            return "?"

    def clear_stale_torch_lock(self) -> None:
        lock = self.where / "lock"
        if not lock.exists():
            return
        if self.held:
            # ninja runs each compile in a process group of its own, so even a job kill often leaves the compiler
            # running here; its work is lost anyway (ninja died before recording it), so stop it, and start clean
            stopped = [pid for pid in _processes_in(self.where) if _kill(pid)]
            told, grace = False, time.monotonic() + 5  # the stopped ones take a moment to go
            while left := _processes_in(self.where):  # not ours to stop: wait for them
                if not told and (set(left) - set(stopped) or time.monotonic() > grace):
                    print(f"spikeprune: waiting for the compiler left running by a killed build in {self.where} "
                          f"(pid {left[0]})", file=sys.stderr, flush=True)
                    told = True
                if time.monotonic() > self.deadline:
                    raise TimeoutError(f"processes left by a killed build (pid {', '.join(map(str, left))}) are "
                                       f"still running in {self.where} after {self.wait_s:.0f} s")
                time.sleep(0.5)
            for pattern in ("*.o", f"*{_LIB_EXT}", ".ninja_log", ".ninja_deps"):
                for half_done in self.where.glob(pattern):
                    half_done.unlink(missing_ok=True)
            why = "its build was killed" + (
                f"; stopped the compiler it left running, pid {', '.join(map(str, stopped))}" if stopped else "")
        else:
            while lock.exists() and time.time() - _mtime(lock) < self.wait_s:
                if time.monotonic() > self.deadline:
                    raise TimeoutError(f"{lock} has been held for over {self.wait_s:.0f} s")
                time.sleep(0.5)
            why = f"held for over {self.wait_s:.0f} s"
        try:
            lock.unlink()
        except FileNotFoundError:
            return
        print(f"spikeprune: removed a stale build lock in {self.where} ({why}); building", file=sys.stderr,
              flush=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: waited for instead
        return False


def _processes_in(where: Path) -> list[int]:
    """Build tools (ninja, a compiler, an assembler or linker; never a shell someone opened there) running in
    ``where``, other than this process: torch runs ninja, and ninja the compiler, there, and a build killed
    without its children leaves them running (Linux ``/proc``; elsewhere none are found)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    target = os.path.realpath(where)
    for entry in entries:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == target:
                    with open(f"/proc/{entry}/comm") as f:
                        if _is_build_tool(f.read().strip()):
                            found.append(int(entry))
            except OSError:
                pass
    return found


_BUILD_TOOLS = ("ninja", "cc1plus", "cc1", "as", "ld", "collect2", "lto-wrapper", "ccache", "sccache", "cc", "c++")


def _is_build_tool(comm: str) -> bool:  # ``comm``: the program's name, cut to 15 characters
    return (comm in _BUILD_TOOLS or any(t in comm for t in ("g++", "gcc", "clang", "c++", "ld.", "icpx"))
            or comm.startswith(("x86_64-linux-", "aarch64-linux-", "powerpc64le-")))


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return platform.processor().encode()
