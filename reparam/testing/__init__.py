"""Test support: an independent numpy reference of every linear op, and Hypothesis strategies.

:mod:`reparam.testing.reference` needs only numpy; :mod:`reparam.testing.strategies` needs Hypothesis
(the ``test`` extra), so it is imported on first use rather than here.
"""

from __future__ import annotations

from .reference import (
    affine,
    avg_pool,
    batch_norm,
    conv_nd,
    conv_transpose_nd,
    pad,
    pad_nd,
    run_conv,
    run_op,
)

__all__ = [
    "affine",
    "avg_pool",
    "batch_norm",
    "conv_nd",
    "conv_transpose_nd",
    "pad",
    "pad_nd",
    "reference",
    "run_conv",
    "run_op",
    "strategies",
]


def __getattr__(name: str):
    if name == "strategies":  # lazy: Hypothesis is a test-only dependency
        import importlib

        return importlib.import_module(f"{__name__}.strategies")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
