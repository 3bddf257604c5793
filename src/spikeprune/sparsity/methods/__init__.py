"""Compression methods, registered by name. Each is one file with a ``Config`` dataclass."""

from __future__ import annotations

import importlib

from ...registry import Registry
from ...schema import ConfigError, from_dict
from ._base import Method, MethodConfig

METHODS = Registry("method")
register_method = METHODS.register

_MODULES = ["dynsnn", "pq_rewire", "sca", "magnitude", "lth", "set", "rigl", "deep_r", "grad_r", "stds", "admm",
            "eslsnn", "upr", "lamp", "l1_filter", "slimming", "random_channels"]


def _load_all() -> None:
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")


def list_methods() -> list[str]:
    _load_all()
    return METHODS.names()


def method_config(spec: dict) -> MethodConfig:
    """Validate a ``method:`` mapping against the method's own config dataclass."""
    _load_all()
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in METHODS:
        raise ConfigError(f"config key 'method.name' must be one of {METHODS.names()}, got {name!r}")
    return from_dict(METHODS.get(name).Config, spec, "method")


def create_method(spec: dict | str, **options) -> Method:
    """Build a method from ``{"name": ..., **options}`` or a name plus keyword options."""
    spec = {"name": spec, **options} if isinstance(spec, str) else {**spec, **options}
    cfg = method_config(spec)
    return METHODS.get(spec["name"])(cfg)


__all__ = ["Method", "MethodConfig", "register_method", "create_method", "list_methods", "method_config"]
