"""A tiny name -> factory registry shared by models, datasets, methods and scores."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any


class Registry:
    """Maps names to callables; ``build`` turns unknown names and bad keyword arguments into one-line errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable:
        def deco(fn):
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def build(self, name: str, **kwargs: Any) -> Any:
        fn = self.get(name)
        check_kwargs(fn, kwargs, f"{self.kind} {name!r}")
        return fn(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def check_kwargs(fn: Callable, kwargs: dict, what: str) -> None:
    """Raise ``ValueError`` naming any keyword that ``fn`` does not accept."""
    sig = inspect.signature(fn)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    bad = [k for k in kwargs if k not in sig.parameters]
    if bad:
        allowed = [k for k, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise ValueError(f"{what} got unknown option(s) {bad}; allowed: {allowed}")
