"""reparam: exact structural re-parameterization of multi-branch CNNs (core algebra + torch/ONNX frontends)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the typed signatures (overloads of fuse) for checkers; at run time imported on first use
    from .fx import FuseReport, fuse, verify

__version__ = "0.1.0"

__all__ = ["FuseReport", "__version__", "fuse", "verify"]


def __getattr__(name: str):
    # torch is an optional extra: reparam.fuse / reparam.verify import it only when asked for.
    if name in ("fuse", "verify", "FuseReport"):
        from . import fx

        return getattr(fx, name)
    raise AttributeError(f"module 'reparam' has no attribute {name!r}")
