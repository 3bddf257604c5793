"""Run directories: what a run owns, whether it may be written, resume checks, and loading a finished run.

A run directory (``out_dir/name``) holds ``config.json``, ``metrics.jsonl``/``metrics.csv``, ``ckpt-*.pt``,
``model.pt`` (+ ``model.pt.sha256``) and ``results.json``. Rules that keep users' files safe:

* a run name is one plain path component (no ``/``, ``..`` or absolute names), so a run writes only below
  ``out_dir``;
* a fresh run into a directory that already holds a run is refused unless ``overwrite`` is asked for, and then
  only the run's own files are removed;
* resuming never silently starts over (no checkpoint is an error) and never rewrites a finished run;
* resuming with settings that change results is refused, naming each key that differs.

Everything a command reads from a run directory is checked: the model file's checksum, its content (tensors
only), the config against the dataclasses.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .schema import check_name  # noqa: F401  (a run name: one plain path component)

RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "results.json", "model.pt", "model.pt.sha256")

# settings that cannot change what a run computes: they may differ on --resume (the new values are recorded)
RESUMABLE = ("out_dir", "train.progress", "train.checkpoint_every", "train.keep_checkpoints",
             "train.keep_freed_memory", "train.device", "train.tensorboard", "train.log_every", "data.root",
             "data.download", "data.eval_batch_size", "measure")
# ... and the subset that cannot change a finished run's results either (measure settings can)
COSMETIC = tuple(k for k in RESUMABLE if k not in ("measure", "train.device"))


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (holds another run, read-only, nothing to resume ...)."""


def run_files(run_dir: str | Path) -> list[Path]:
    """The files of a run present in ``run_dir`` (checkpoints included); other files are not the run's."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return [d / f for f in RUN_FILES if (d / f).exists()] + ckpt.list_checkpoints(d)


def is_finished(run_dir: str | Path) -> bool:
    d = Path(run_dir)
    return (d / "results.json").is_file() and (d / "model.pt").is_file()


def check_writable(run_dir: str | Path, what: str = "the run directory") -> None:
    """Create ``run_dir`` and write a probe file in it, so a read-only or full target is refused before any
    work: ``RunError`` naming the path."""
    d = Path(run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        try:
            (d / f".write-probe-{os.getpid()}").unlink(missing_ok=True)
        except OSError:
            pass
        raise RunError(f"cannot write to {what} {d}: {e.strerror or e}") from None


def config_diff(old: dict, new: dict, allowed: tuple[str, ...] = RESUMABLE, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key (old -> new)``, except ``allowed``
    keys (a section name allows the whole section)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}{k}"
        if key in allowed:
            continue
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, allowed, key + ".")
        elif a != b:
            out.append(f"{key} ({json.dumps(a, default=str)} -> {json.dumps(b, default=str)})")
    return out


def normalised(d: dict) -> dict:
    """A config dict through the dataclasses (fields added since it was written take their defaults) and JSON."""
    from .config import RunConfig, from_dict, to_dict

    return json.loads(json.dumps(to_dict(from_dict(RunConfig, d)), default=str))


def finished_with(cfg) -> bool:
    """True if ``cfg.run_dir`` holds finished results of exactly this config (cosmetic settings aside)."""
    from .config import ConfigError, to_dict

    rd = cfg.run_dir
    if not is_finished(rd) or not (rd / "config.json").is_file():
        return False
    try:
        old = normalised(json.loads((rd / "config.json").read_text()))
    except (ConfigError, OSError, ValueError, RecursionError):
        return False
    return not config_diff(old, json.loads(json.dumps(to_dict(cfg), default=str)), COSMETIC)


# ------------------------------------------------------------------------------------ loading a finished run
def read_json(path: str | Path, kind: type = dict) -> Any:
    """A JSON file of a run holding a ``kind`` (dict or list); any failure is a ``RunError`` naming the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunError(f"cannot read {p}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RunError(f"{p} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, kind):
        raise RunError(f"{p} must hold a JSON {'object' if kind is dict else 'array'}, got {type(data).__name__}")
    return data


def read_config(run_dir: str | Path):
    """A run's ``config.json`` as a validated :class:`RunConfig` (``RunError`` naming the file otherwise)."""
    from .config import ConfigError, RunConfig, from_dict

    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise RunError(f"{Path(run_dir)} is not a finished run (needs config.json and model.pt)")
    data = read_json(p)
    try:
        return from_dict(RunConfig, data)
    except (ConfigError, ValueError, RecursionError) as e:
        raise RunError(f"{p} is not a valid run config: {str(e).splitlines()[0][:200]}") from None


def run_model(run_dir: str | Path, cfg=None, fold: bool = False, warn=None):
    """A finished run's network rebuilt from ``config.json`` and ``model.pt`` (checksum verified, tensors only):
    with its masks (buffers and hooks, as trained) or, with ``fold``, the masks folded into the weights
    (:meth:`MaskEngine.remove`): the same network at full width with no mask machinery, e.g. the fair reference for
    a compacted one's speed."""
    from .data import dataset_info
    from .models import create_model

    rd = Path(run_dir)
    if cfg is None:
        cfg = read_config(rd)
    if not (rd / "model.pt").is_file():
        raise RunError(f"{rd} is not a finished run (needs config.json and model.pt)")
    info, m = dataset_info(cfg.data.name, **cfg.data.options), cfg.model
    model = create_model(m.name, num_classes=info.num_classes, in_channels=info.in_shape[-3], T=m.T,
                         neuron=m.neuron, encoding=m.encoding, **m.options)
    from .sparsity.pruned import load_into

    state = ckpt.load_model(rd / "model.pt", warn=warn if warn is not None else _stderr)
    try:
        engine = load_into(model, state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise RunError(f"{rd / 'model.pt'} does not fit the model in config.json: "
                       f"{str(e).splitlines()[0][:200]}") from None
    if fold and engine is not None:
        engine.remove()
    return model


def load_run(run_dir: str | Path, data_root: str | None = None):
    """Rebuild a finished run's model (with its masks) and its test loader: ``(cfg, model, test_loader)``."""
    from .data import build_loaders

    cfg = read_config(run_dir)
    d = cfg.data
    _, _, test, _ = build_loaders(d.name, root=data_root or d.root, batch_size=d.batch_size,
                                  eval_batch_size=d.eval_batch_size, seed=cfg.seed, **d.options)
    return cfg, run_model(run_dir, cfg), test


def provenance() -> str:
    """Markdown header: the exact command, the machine and the date (for committed results)."""
    import datetime
    import platform
    import shlex

    import torch

    cmd = shlex.join(["spikeprune", *sys.argv[1:]])  # quoted, so it can be pasted back
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return (f"- command: `{cmd}`\n- machine: {platform.system()} {cpu}, {os.cpu_count()} cores, {threads} torch "
            f"thread(s), {dev}, torch {torch.__version__}\n- date: {datetime.date.today().isoformat()}\n")


def _stderr(msg: str) -> Any:
    print(msg, file=sys.stderr)
