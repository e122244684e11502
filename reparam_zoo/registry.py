"""Name -> factory registry of the zoo models."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

F = TypeVar("F", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: F) -> F:
    """Register a factory under its ``__name__`` (decorator)."""
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model name {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a shell-style ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with factory keyword arguments (e.g. ``deploy=True``)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        close = fnmatch.filter(_REGISTRY, f"*{name.split('_')[0]}*") or list(_REGISTRY)
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(close))}") from None
    return factory(**kwargs)
