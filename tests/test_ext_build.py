"""The compiled-kernel build never hangs and never rebuilds needlessly (issue 21, "Safe runs").

Every process here runs with its own ``TORCH_EXTENSIONS_DIR`` in a temporary folder (the user's cache is never
touched). One real build is shared by the module (about 80-100 s on 2 cores): it is the build that follows a
build killed midway, and a second checkout then loads it. The other tests never reach the compiler.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import spikeprune
from spikeprune import _ext

LOAD = ("import sys, spikeprune; from spikeprune._ext import cpu_kernels; m = cpu_kernels(); "
        "print('FROM', spikeprune.__file__); print('KERNELS', m.__file__ if m is not None else None)")
BUILDING = "spikeprune: building the compiled CPU kernels"
STALE = "spikeprune: removed a stale build lock"
BUILD_TIMEOUT_S = 900  # a build on 2 busy cores: ~100 s


def _env(ext_dir: Path, checkout: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SPIKEPRUNE_CPP", "SPIKEPRUNE_CPP_WAIT", "CXX")}
    env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    env["OMP_NUM_THREADS"] = "1"
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    env.update(extra)
    return env


def _checkout(root: Path) -> Path:
    """A copy of the package, as a second clone or virtualenv of the same commit would have it."""
    shutil.copytree(Path(spikeprune.__file__).parent, root / "spikeprune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return root


def _run_timed(args: list[str], env: dict, cwd: Path, marker: str, on_marker=None) -> dict:
    """Run to the end; note when a line containing ``marker`` reached stderr (seconds from the start), and then
    call ``on_marker(pid)``."""
    start = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, err = {}, []

    def read_err():
        for line in proc.stderr:
            err.append(line)
            if marker in line and "at" not in seen:
                seen["at"] = time.monotonic() - start
                if on_marker is not None:
                    on_marker(proc.pid)

    out = []
    readers = [threading.Thread(target=read_err, daemon=True),
               threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for reader in readers:
        reader.join(10)
    out = "".join(out)
    return {"rc": proc.returncode, "out": out, "err": "".join(err), "wall": time.monotonic() - start,
            "marker_at": seen.get("at")}


def _kernels(out: str) -> str | None:
    line = next(x for x in out.splitlines() if x.startswith("KERNELS "))
    value = line.split(" ", 1)[1]
    return None if value == "None" else value


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """A build killed midway (SIGKILL to it and its compiler, once torch's lock exists), the build after it
    (checkout 1) with another process arriving while it builds, then ``python -m spikeprune._ext`` from
    checkout 2 of the same commit."""
    root = tmp_path_factory.mktemp("ext_build")
    ext_dir = root / "torch_extensions"
    co1, co2 = _checkout(root / "co1"), _checkout(root / "co2")
    killed_log = root / "killed.err"
    with open(killed_log, "w") as log:
        victim = subprocess.Popen([sys.executable, "-c", LOAD], env=_env(ext_dir, co1), cwd=root,
                                  stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(ext_dir.glob("spikeprune_cpu_*/lock")):
        assert victim.poll() is None, f"the build ended before it could be killed: {killed_log.read_text()}"
        assert time.monotonic() < deadline, "no torch build lock appeared"
        time.sleep(0.1)
    time.sleep(2)  # the compiler is running
    os.killpg(victim.pid, signal.SIGKILL)  # the build and its ninja and compiler, as a job kill does
    victim.wait()
    locks = list(ext_dir.glob("spikeprune_cpu_*/lock"))
    assert locks, "the killed build left no lock (nothing to test)"
    arrived = {}

    def arrive(builder_pid):  # while the build runs
        arrived["builder"] = builder_pid
        arrived["proc"] = subprocess.Popen([sys.executable, "-c", LOAD], env=_env(ext_dir, co2), cwd=root,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    after_kill = _run_timed([sys.executable, "-c", LOAD], _env(ext_dir, co1), root, STALE, arrive)
    out, err = arrived["proc"].communicate(timeout=BUILD_TIMEOUT_S)
    during = {"rc": arrived["proc"].returncode, "out": out, "err": err, "builder": arrived["builder"]}
    other = _run_timed([sys.executable, "-m", "spikeprune._ext"], _env(ext_dir, co2), root, "ready")
    print(f"\nbuild after the killed one: stale lock reported at {after_kill['marker_at']} s, done in "
          f"{after_kill['wall']:.1f} s; second checkout: {other['wall']:.1f} s")
    return {"lock": locks[0], "after_kill": after_kill, "during": during, "other": other, "co1": co1,
            "co2": co2, "ext_dir": ext_dir}


@pytest.mark.slow
def test_a_build_killed_midway_does_not_block_the_next_process(builds):
    r = builds["after_kill"]
    assert r["rc"] == 0, r["err"]
    assert r["marker_at"] is not None and r["marker_at"] < 60, r["err"]  # it proceeds at once, no waiting
    assert sum(STALE in line for line in r["err"].splitlines()) == 1
    assert "FROM " + str(builds["co1"]) in r["out"]
    assert _kernels(r["out"]) is not None, r["err"]  # and it gets the kernels
    assert BUILDING in r["err"] and "spikeprune: built the compiled CPU kernels in " in r["err"]
    assert not builds["lock"].exists()
    assert "waiting for the compiler" not in r["err"]  # the killed build's compiler was stopped, not waited for


@pytest.mark.slow
def test_b_a_second_checkout_loads_the_kernels_built_by_the_first(builds):
    first, r = builds["after_kill"], builds["other"]
    assert r["rc"] == 0, r["err"]
    assert BUILDING not in r["err"] and STALE not in r["err"], r["err"]
    library = _kernels(first["out"])
    assert f"spikeprune: compiled CPU kernels ready ({library})" in r["err"]
    assert r["wall"] < 30 and r["wall"] < first["wall"] / 2, (r["wall"], first["wall"])


@pytest.mark.slow
def test_a_process_arriving_during_the_build_waits_for_it_and_uses_its_kernels(builds):
    r, builder = builds["during"], builds["after_kill"]
    assert r["rc"] == 0, r["err"]
    where = Path(_kernels(builder["out"])).parent
    waiting = [line for line in r["err"].splitlines() if "waiting for another process" in line]
    assert waiting == [f"spikeprune: waiting for another process building the kernels in {where} "
                       f"(pid {r['builder']}; up to 900 s, SPIKEPRUNE_CPP_WAIT)"], r["err"]
    assert BUILDING not in r["err"] and STALE not in r["err"] and "Warning" not in r["err"], r["err"]
    assert _kernels(r["out"]) == _kernels(builder["out"])


def test_waiting_for_a_live_builder_says_so_and_gives_up_to_eager(tmp_path, monkeypatch):
    import fcntl

    ext_dir = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext_dir))
    where = _ext.build_dir()
    with open(where / "spikeprune.flock", "w") as held:  # a live builder: this process
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()}\n")
        held.flush()
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-c", LOAD], env=_env(ext_dir, SPIKEPRUNE_CPP_WAIT="2"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        wall = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    assert _kernels(r.stdout) is None  # eager PyTorch
    waiting = [line for line in r.stderr.splitlines() if "waiting for another process" in line]
    assert waiting == [f"spikeprune: waiting for another process building the kernels in {where} "
                       f"(pid {os.getpid()}; up to 2 s, SPIKEPRUNE_CPP_WAIT)"]
    assert "RuntimeWarning" in r.stderr and "TimeoutError" in r.stderr and BUILDING not in r.stderr
    assert wall < 60


def test_a_failed_build_warns_and_runs_eager_without_leaving_a_lock(tmp_path):
    ext_dir = tmp_path / "torch_extensions"
    r = subprocess.run([sys.executable, "-c", LOAD], env=_env(ext_dir, CXX=str(tmp_path / "no-such-c++")),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _kernels(r.stdout) is None
    assert "RuntimeWarning: spikeprune: compiled CPU kernels unavailable" in r.stderr
    assert not list(ext_dir.glob("*/lock")) and not list(ext_dir.glob("*/spikeprune.built"))


def test_switched_off_builds_nothing(tmp_path):
    ext_dir = tmp_path / "torch_extensions"
    r = subprocess.run([sys.executable, "-c", LOAD], env=_env(ext_dir, SPIKEPRUNE_CPP="0"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and _kernels(r.stdout) is None and "spikeprune" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "spikeprune._ext"], env=_env(ext_dir, SPIKEPRUNE_CPP="0"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "switched off" in r.stderr, r.stderr
    assert not ext_dir.exists() or not any(ext_dir.iterdir())


def test_only_build_tools_left_in_the_build_folder_count_as_left_by_a_killed_build(tmp_path):
    fake_compiler = tmp_path / "cc1plus"
    shutil.copy(shutil.which("sleep"), fake_compiler)
    compiler = subprocess.Popen([str(fake_compiler), "30"], cwd=tmp_path)
    shell = subprocess.Popen(["sleep", "30"], cwd=tmp_path)  # someone's shell in the folder: never touched
    try:
        deadline = time.monotonic() + 10
        while not (found := _ext._processes_in(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the exec has happened
        assert found == [compiler.pid]
    finally:
        for proc in (compiler, shell):
            proc.kill()
            proc.wait()


def test_the_build_key_ignores_the_checkout_path(tmp_path, monkeypatch):
    name, description = _ext._key()
    copies = []
    for f in _ext._FILES:
        copies.append(tmp_path / f.name)
        copies[-1].write_bytes(f.read_bytes())
    monkeypatch.setattr(_ext, "_FILES", tuple(copies))
    assert _ext._key() == (name, description)
    header = tmp_path / "spikeprune_cpu.h"
    header.write_bytes(header.read_bytes() + b"\n// changed\n")  # every file counts, headers too
    assert _ext._key()[0] != name
    for part in ("source neuron.cpp sha256", "source spikeprune_cpu.h sha256", "cflags", "cpu", "torch", "python"):
        assert part in description
