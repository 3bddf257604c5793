"""Run configuration: dataclasses that load from YAML with strict keys and types.

``load_config("recipe.yaml", overrides=["train.lr=0.01"])`` returns a :class:`RunConfig`. An unknown key, a
value of the wrong type or out of range raises :class:`ConfigError` naming the dotted key and what is allowed.
Method options live under ``method:`` and are checked against the method's own config dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


MAX_T = 10_000  # time steps: beyond this a [T, B, ...] tensor of even a small net fills any memory
# keyword arguments the trainer passes to every model factory itself: model.options must not repeat them
MODEL_ARGS = ("num_classes", "in_channels", "T", "neuron", "encoding")


@dataclass
class ModelConfig:
    name: str = "fc3"
    T: int = 4
    neuron: dict = field(default_factory=lambda: {"type": "lif"})
    encoding: Literal["direct", "rate", "events"] = "direct"
    options: dict = field(default_factory=dict)  # extra keyword arguments of the model factory

    def validate(self, key: str) -> None:
        _check(1 <= self.T <= MAX_T, f"{key}.T", f"must be in [1, {MAX_T}], got {self.T}")
        for k in self.options:
            _check(k not in MODEL_ARGS, f"{key}.options.{k}",
                   f"is set by the trainer (from model.{k} or the dataset); remove it from model.options")
        _finite(self.neuron, f"{key}.neuron")
        _finite(self.options, f"{key}.options")
        from .neurons import make_neuron

        try:  # neuron options are checked now, not when the model is built
            make_neuron(self.neuron)
        except ValueError as e:
            raise ConfigError(f"config key '{key}.neuron' is invalid: {e}") from None


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    val_split: float = 0.0
    subset: int | None = None
    download: bool = False
    augment: dict = field(default_factory=dict)  # training-batch augmentation: crop, flip, roll, rotate, cutout
    options: dict = field(default_factory=dict)

    def validate(self, key: str) -> None:
        from .data.augment import AugmentSpec

        try:
            AugmentSpec.parse(self.augment, f"{key}.augment")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"{key}.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(0.0 <= self.val_split < 1.0, f"{key}.val_split", f"must be in [0, 1), got {self.val_split}")
        _check(self.subset is None or self.subset >= 1, f"{key}.subset", "must be >= 1 or null")
        _finite(self.options, f"{key}.options")


@dataclass
class TrainConfig:
    epochs: int = 10
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    loss: Literal["ce", "mse", "tet"] = "ce"
    tet_lambda: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    amp: Literal["auto", "on", "off"] = "auto"
    device: str = "auto"
    checkpoint_every: int = 0  # also save every N steps inside an epoch (0: only at epoch ends)
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = False  # scalars + histograms (firing rates, densities) in RUN_DIR/tb; needs tensorboard
    log_every: int = 0  # progress when stderr is not a terminal: a line every N steps (0: about 10 per epoch)
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    sync_bn: bool = False  # under DDP: BatchNorm batch statistics over all ranks (docs/ddp.md)
    keep_freed_memory: bool = True  # CPU: glibc malloc reuses freed blocks instead of faulting in new pages (perf.py)
    fused_optimizer: bool = True  # PyTorch's fused optimizer kernels where they take the params (train.py)

    def validate(self, key: str) -> None:
        _check(self.epochs >= 0, f"{key}.epochs", f"must be >= 0, got {self.epochs}")
        _check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(0 <= self.momentum < 1, f"{key}.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null")
        _check(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)")
        _check(self.device == "auto" or _is_device(self.device), f"{key}.device",
               f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        _check(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must be >= 1")
        _check(self.step_size >= 1, f"{key}.step_size", f"must be >= 1, got {self.step_size}")
        _check(self.gamma > 0, f"{key}.gamma", f"must be > 0, got {self.gamma}")
        _check(0 <= self.tet_lambda <= 1, f"{key}.tet_lambda", f"must be in [0, 1], got {self.tet_lambda}")
        _check(self.checkpoint_every >= 0, f"{key}.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, f"{key}.max_steps_per_epoch",
               "must be >= 1 or null")


@dataclass
class MeasureConfig:
    pj_per_ac: float = 0.9
    pj_per_mac: float = 4.6
    max_batches: int | None = None

    def validate(self, key: str) -> None:
        _check(self.pj_per_ac >= 0, f"{key}.pj_per_ac", f"must be >= 0, got {self.pj_per_ac}")
        _check(self.pj_per_mac >= 0, f"{key}.pj_per_mac", f"must be >= 0, got {self.pj_per_mac}")
        _check(self.max_batches is None or self.max_batches >= 1, f"{key}.max_batches", "must be >= 1 or null")


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    method: dict | None = None  # {"name": "pq_rewire", ...options}; None trains densely

    def validate(self, key: str = "") -> None:
        from .runs import check_name

        try:
            check_name(self.name)
        except ValueError as e:
            raise ConfigError(f"config key 'name' {e}") from None
        _check(bool(self.out_dir), "out_dir", "must not be empty")
        _check(abs(self.seed) < 2**63, "seed", f"must fit in 64 bits, got {self.seed}")
        if self.method is not None:
            _finite(self.method, "method")
            if "name" not in self.method:
                raise ConfigError("config key 'method.name' is missing (or set method: null for dense training)")
            from .sparsity.methods import method_config

            method_config(self.method)  # raises ConfigError naming the bad option

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")


def _finite(value: Any, key: str) -> None:
    """Every number inside ``value`` (nested dicts and lists) must be finite: ``.inf`` or ``.nan`` in a recipe is
    a typo that would train silently wrong (a neuron that never fires, a diverging step)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")


def _is_device(spec: str) -> bool:
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        return False
    return dev.type in ("cpu", "cuda", "mps") and (dev.index is None or 0 <= dev.index < 1024)


# ----------------------------------------------------------------------------------------- loading
def from_dict(cls: type, data: dict | None, key: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict, checking keys and types recursively."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{key or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{key}.{k}" if key else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{full}' (allowed: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], full)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def _coerce(v: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, key)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key '{key}' must be {_tname(tp)}, got {v!r}")
    if origin is Literal:
        if v not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {v!r}")
        return v
    if tp is Any:
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {v!r}")
        if abs(v) >= 2**63:
            raise ConfigError(f"config key '{key}' is out of range: {v}")
        return v
    if tp is float:
        if isinstance(v, str):  # YAML reads 1e-3 as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {v!r}")
        try:
            v = float(v)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v):
            raise ConfigError(f"config key '{key}' must be a finite number, got {v}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"config key '{key}' must be a string, got {v!r}")
        if "\0" in v:
            raise ConfigError(f"config key '{key}' must not contain a NUL character")
        return v
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {v!r}")
        inner = args[0] if args else Any
        items = [_coerce(x, inner, f"{key}[{i}]") for i, x in enumerate(v)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {v!r}")
        return dict(v)
    return v


def _tname(tp: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_reason(e)}); quote it, e.g. "
                              f"{path}='\"...\"'") from None
        node = data
        parts = path.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key name")
        if not isinstance(data, dict):
            raise ConfigError("the recipe must be a mapping to take overrides")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema: type = None) -> Any:
    """Read a YAML recipe (or defaults when ``path`` is None), apply overrides, and validate it against
    ``schema`` (default :class:`RunConfig`; ``convert`` and ``bench`` recipes pass their own dataclass)."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    data = apply_overrides(data, overrides or [])
    try:
        cfg = from_dict(schema or RunConfig, data)
    except RecursionError:
        raise ConfigError(f"config {path or '<overrides>'} is nested too deeply") from None
    if path is not None and "name" not in data and hasattr(cfg, "name"):
        cfg.name = Path(path).stem
    return cfg


MAX_CONFIG_BYTES = 1 << 20


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping from ``path``; every failure (missing, unreadable, not UTF-8 text, bad YAML, not a mapping,
    nested too deeply, too large) is a :class:`ConfigError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {p} cannot be read: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {p} is {len(raw):,} bytes; a recipe is at most {MAX_CONFIG_BYTES:,}")
    if b"\0" in raw and raw[:2] not in (b"\xff\xfe", b"\xfe\xff"):
        raise ConfigError(f"{what} {p} is a binary file, not YAML text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        kind = "UTF-16 text" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8 text"
        raise ConfigError(f"{what} {p} is {kind}; save it as UTF-8") from None
    if "\0" in text:
        raise ConfigError(f"{what} {p} is a binary file, not YAML text")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {_yaml_reason(e)}") from None
    except RecursionError:
        raise ConfigError(f"{what} {p} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping (key: value lines), got a {type(data).__name__}")
    return data


def _yaml_reason(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def jsonable(x: Any) -> Any:
    """Make nested results JSON-safe: tensors to lists, paths to strings, non-finite floats to strings."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
