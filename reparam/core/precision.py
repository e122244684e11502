"""The float64 policy: every rule computes in float64 and casts back once, refusing non-finite results."""

from __future__ import annotations

import numpy as np

from .errors import NotFusable
from .types import Conv


def f64(a: np.ndarray | None) -> np.ndarray | None:
    """``a`` as float64 (bfloat16 arrays from ml_dtypes convert through float32 exactly)."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype == np.float64:
        return a
    if a.dtype.kind not in "fiub":  # ml_dtypes' bfloat16 reports kind 'V'
        a = a.astype(np.float32)
    return a.astype(np.float64)


def conv64(conv: Conv) -> Conv:
    """The same conv with float64 weight and bias."""
    if conv.weight.dtype == np.float64 and (conv.bias is None or conv.bias.dtype == np.float64):
        return conv
    return conv.with_(weight=f64(conv.weight), bias=f64(conv.bias))


def cast_array(a: np.ndarray, dtype, what: str) -> np.ndarray:
    """Cast a float64 result to ``dtype``; a non-finite value, before or after the cast, is refused."""
    if not all_finite(a):
        raise NotFusable(f"{what} has non-finite values after folding (overflow or NaN in the inputs)")
    if np.dtype(dtype).kind in "iub":
        raise NotFusable(f"{what} cannot be stored in the input's {np.dtype(dtype).name} dtype without rounding; "
                         "give the weights a floating-point dtype")
    with np.errstate(over="ignore"):  # an overflow is reported below as a refusal, not a warning
        out = a.astype(dtype)
    if not all_finite(out):
        raise NotFusable(f"{what} overflows {np.dtype(dtype).name} (max |value| {np.abs(a).max():.3g})")
    return out


NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a``, without the boolean array of ``np.isfinite`` or, for numpy's own float
    types, a float64 copy.  A float32/float64 array is first checked by its sum of squares (one BLAS pass,
    three times faster than max and min on a fused kernel): a NaN or infinity makes it non-finite, so a finite
    sum proves every value finite; only a non-finite one (which squares overflowing also give) is settled by
    the max and the min, through which a NaN propagates."""
    if not a.size:
        return True
    if a.dtype not in NATIVE_FLOATS:
        a = f64(a)
    if a.dtype != np.float16 and a.flags.c_contiguous:
        flat = a.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(a.max()) and np.isfinite(a.min()))


def cast_conv(conv: Conv, dtype) -> Conv:
    """Cast a float64 conv to ``dtype`` with the finiteness check on weight and bias."""
    return conv.with_(
        weight=cast_array(conv.weight, dtype, "fused weight"),
        bias=None if conv.bias is None else cast_array(conv.bias, dtype, "fused bias"),
    )
