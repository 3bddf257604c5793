"""Strict dataclass configs from YAML: the low-level machinery every config in spikeprune uses.

:func:`from_dict` builds a dataclass from a plain mapping, checking every key and type and calling the dataclass's
``validate(key)``; errors are :class:`ConfigError` naming the dotted key. :func:`read_yaml` reads a recipe file
with one-line errors for every way a file can be wrong; :func:`apply_overrides` applies ``key.sub=value`` strings.
This module imports nothing from spikeprune, so any layer (the run config, the methods' configs, the bench and
conversion recipes) can build on it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,@-]*")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")


def finite(value: Any, key: str) -> None:
    """Every number inside ``value`` (nested dicts and lists) must be finite: ``.inf`` or ``.nan`` in a recipe is
    a typo that would train silently wrong (a neuron that never fires, a diverging step)."""
    if isinstance(value, dict):
        for k, v in value.items():
            finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")


def is_device(spec: str) -> bool:
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        return False
    return dev.type in ("cpu", "cuda", "mps") and (dev.index is None or 0 <= dev.index < 1024)


def check_name(name: str) -> str:
    """``name`` if it is one plain path component (a run or bench name), else a ``ValueError`` saying what is
    allowed: a run then writes only below its ``out_dir``."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", "..") or len(name) > 200:
        raise ValueError(f"must be one plain name (letters, digits and _ . + = , @ -, not starting with . or -, "
                         f"at most 200 characters), got {name!r}")
    return name


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


_check, _finite = check, finite  # the names the config modules used before
