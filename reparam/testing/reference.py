"""Independent reference implementations of the linear ops, in plain numpy and float64.

This module is the oracle the weight algebra is tested against, so it is written straight from the
definitions (PyTorch semantics) and shares no code with :mod:`reparam.core` beyond the value types.
Everything is computed in float64 whatever the input dtype; 0 spatial dims means a linear layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from reparam.core.types import (
    Add,
    Affine,
    AvgPool,
    BatchNorm,
    Conv,
    ConvTranspose,
    Identity,
    Pad,
)

__all__ = [
    "affine",
    "avg_pool",
    "batch_norm",
    "conv_nd",
    "conv_transpose_nd",
    "pad",
    "pad_nd",
    "run_conv",
    "run_op",
]

# Our padding-mode names -> np.pad modes (PyTorch's reflect excludes the edge, as np's "reflect" does).
_NP_PAD_MODES = {
    "zeros": "constant",
    "constant": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "edge": "edge",
    "circular": "wrap",
    "wrap": "wrap",
}

IntArg = int | Sequence[int]
PadArg = int | Sequence[int] | Sequence[Sequence[int]]


def _per_dim(value: IntArg, ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"{what} {value!r} has {len(out)} entries, expected {ndim}")
    return out


def _per_side(padding: PadArg, ndim: int) -> tuple[tuple[int, int], ...]:
    """``p``, ``(p_0, p_1, ...)`` or ``((b_0, e_0), ...)`` -> per-side pairs."""
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * ndim
    items = list(padding)
    if len(items) != ndim:
        raise ValueError(f"padding {padding!r} does not fit {ndim} spatial dims")
    if all(isinstance(p, (int, np.integer)) for p in items):
        return tuple((int(p), int(p)) for p in items)
    pairs = tuple(tuple(int(v) for v in p) for p in items)
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"padding {padding!r} must be per-dim ints or (begin, end) pairs")
    return pairs  # type: ignore[return-value]


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def pad_nd(x: np.ndarray, padding: PadArg, mode: str = "zeros", value: float = 0.0) -> np.ndarray:
    """Pad the spatial dims (axes 2..) of ``[N, C, *spatial]`` per side, like ``torch.nn.functional.pad``.

    ``mode`` is zeros/constant (filled with ``value``), reflect, replicate or circular.  Negative
    padding crops (any mode: the crop is applied after padding the positive sides).
    """
    x = _f64(x)
    nd = x.ndim - 2
    pairs = _per_side(padding, nd)
    if mode not in _NP_PAD_MODES:
        raise ValueError(f"unknown padding mode {mode!r}")
    np_mode = _NP_PAD_MODES[mode]
    for size, (b, e) in zip(x.shape[2:], pairs):
        if np_mode == "reflect" and max(b, e) >= size:
            raise ValueError(f"reflect padding {(b, e)} must be smaller than the dim size {size}")
        if np_mode == "wrap" and max(b, e) > size:
            raise ValueError(f"circular padding {(b, e)} must not exceed the dim size {size}")
    grow = [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in pairs]
    if np_mode == "constant":
        out = np.pad(x, grow, mode="constant", constant_values=value)
    else:
        out = np.pad(x, grow, mode=np_mode)
    crop = tuple(slice(-min(b, 0), n + min(e, 0)) for n, (b, e) in zip(out.shape[2:], pairs))
    return out[(slice(None), slice(None), *crop)]


def _taps(kernel: Sequence[int]):
    return itertools.product(*(range(k) for k in kernel))


def conv_nd(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: IntArg = 1,
    padding: PadArg = 0,
    dilation: IntArg = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> np.ndarray:
    """Direct N-d cross-correlation (PyTorch ``convNd`` semantics), 0 to 3 spatial dims, in float64.

    ``x`` is ``[N, C, *spatial]``, ``weight`` ``[out, C/groups, *kernel]``.  Padding is an int, one
    int per dim or ``(begin, end)`` per dim, filled according to ``padding_mode``.  With 0 spatial
    dims this is ``x @ W.T + b``.  Implemented as im2col over kernel taps (strided slices) and one
    einsum per call, not a loop over output pixels.
    """
    x, w = _f64(x), _f64(weight)
    nd = w.ndim - 2
    if nd < 0 or x.ndim != nd + 2:
        raise ValueError(f"input {x.shape} and weight {w.shape} disagree on the number of spatial dims")
    n, c = x.shape[:2]
    out_c, cg = w.shape[:2]
    if groups < 1 or c % groups or out_c % groups or c // groups != cg:
        raise ValueError(f"groups={groups} does not fit input channels {c} and weight {w.shape}")
    s = _per_dim(stride, nd, "stride")
    d = _per_dim(dilation, nd, "dilation")
    xp = pad_nd(x, padding, padding_mode) if nd else x
    kernel = w.shape[2:]
    out_sz = []
    for size, k, si, di in zip(xp.shape[2:], kernel, s, d):
        span = di * (k - 1) + 1
        if size < span:
            raise ValueError(f"padded input size {size} is smaller than the dilated kernel {span}")
        out_sz.append((size - span) // si + 1)
    cols = []
    for tap in _taps(kernel):
        idx = tuple(
            slice(t * di, t * di + (o - 1) * si + 1, si) for t, di, si, o in zip(tap, d, s, out_sz)
        )
        cols.append(xp[(slice(None), slice(None), *idx)])
    col = np.stack(cols, axis=2)  # [N, C, K, *out]
    col = col.reshape(n, groups, cg, len(cols), *out_sz)
    wk = w.reshape(groups, out_c // groups, cg, len(cols))
    y = np.einsum("ngck...,gock->ngo...", col, wk).reshape(n, out_c, *out_sz)
    if bias is not None:
        y = y + _f64(bias).reshape((1, out_c) + (1,) * nd)
    return y


def run_conv(conv: Conv, x: np.ndarray) -> np.ndarray:
    """:func:`conv_nd` with the hyper-parameters of a core :class:`~reparam.core.types.Conv`."""
    return conv_nd(
        x,
        conv.weight,
        conv.bias,
        stride=conv.stride or 1,
        padding=conv.padding or 0,
        dilation=conv.dilation or 1,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
    )


def conv_transpose_nd(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: IntArg = 1,
    padding: PadArg = 0,
    output_padding: IntArg = 0,
    dilation: IntArg = 1,
    groups: int = 1,
) -> np.ndarray:
    """Direct transposed convolution (PyTorch ``conv_transposeNd`` semantics) by scatter-add per tap.

    ``weight`` is ``[C, out/groups, *kernel]``.  Each input pixel ``i`` adds ``x[i] * W[tap]`` at
    ``i*stride + tap*dilation`` of the full output, which is then cropped by ``padding`` (per dim or
    per side, as ONNX allows) and extended by ``output_padding`` at the end.
    """
    x, w = _f64(x), _f64(weight)
    nd = w.ndim - 2
    if nd < 1 or x.ndim != nd + 2:
        raise ValueError(f"input {x.shape} and weight {w.shape} disagree on the number of spatial dims")
    n, c = x.shape[:2]
    if groups < 1 or c % groups or w.shape[0] != c:
        raise ValueError(f"groups={groups} does not fit input channels {c} and weight {w.shape}")
    cg, og = c // groups, w.shape[1]
    s = _per_dim(stride, nd, "stride")
    d = _per_dim(dilation, nd, "dilation")
    op = _per_dim(output_padding, nd, "output_padding")
    pads = _per_side(padding, nd)
    kernel = w.shape[2:]
    in_sz = x.shape[2:]
    full = [(i - 1) * si + di * (k - 1) + 1 + o for i, si, di, k, o in zip(in_sz, s, d, kernel, op)]
    y = np.zeros((n, groups, og, *full))
    xg = x.reshape(n, groups, cg, *in_sz)
    wg = w.reshape(groups, cg, og, *kernel)
    for tap in _taps(kernel):
        contrib = np.einsum("ngc...,gco->ngo...", xg, wg[(slice(None), slice(None), slice(None), *tap)])
        idx = tuple(slice(t * di, t * di + (i - 1) * si + 1, si) for t, di, si, i in zip(tap, d, s, in_sz))
        y[(slice(None), slice(None), slice(None), *idx)] += contrib
    y = y.reshape(n, groups * og, *full)
    crop = tuple(slice(b, f - e) for (b, e), f in zip(pads, full))
    if any(f - b - e < 1 for (b, e), f in zip(pads, full)):
        raise ValueError(f"padding {pads} leaves no output of the full size {full}")
    y = y[(slice(None), slice(None), *crop)]
    if bias is not None:
        y = y + _f64(bias).reshape((1, groups * og) + (1,) * nd)
    return y


def _channel_view(v, channels: int, nd: int, default: float) -> np.ndarray:
    arr = np.full(channels, default) if v is None else np.atleast_1d(_f64(v))
    if arr.shape[0] == 1:
        arr = np.full(channels, arr[0])
    if arr.shape != (channels,):
        raise ValueError(f"per-channel parameter of shape {arr.shape} does not fit {channels} channels")
    return arr.reshape((1, channels) + (1,) * nd)


def batch_norm(x: np.ndarray, bn: BatchNorm) -> np.ndarray:
    """Inference batch norm along axis 1: ``(x - mean) / sqrt(var + eps) * gamma + beta``."""
    x = _f64(x)
    c, nd = x.shape[1], x.ndim - 2
    mean = _channel_view(bn.running_mean, c, nd, 0.0)
    var = _channel_view(bn.running_var, c, nd, 1.0)
    gamma = _channel_view(bn.gamma, c, nd, 1.0)
    beta = _channel_view(bn.beta, c, nd, 0.0)
    return (x - mean) / np.sqrt(var + float(bn.eps)) * gamma + beta


def affine(x: np.ndarray, aff: Affine) -> np.ndarray:
    """Per-channel ``scale * x + shift`` along axis 1; a length-1 scale or shift broadcasts."""
    x = _f64(x)
    c, nd = x.shape[1], x.ndim - 2
    return x * _channel_view(aff.scale, c, nd, 1.0) + _channel_view(aff.shift, c, nd, 0.0)


def avg_pool(x: np.ndarray, pool: AvgPool) -> np.ndarray:
    """Average pooling with PyTorch semantics (``count_include_pad``, ``ceil_mode``, ``divisor_override``).

    Padding may be asymmetric (ONNX).  With ``count_include_pad`` the divisor counts the window cells
    inside the padded input; without it only the real cells; ``divisor_override`` replaces both.
    """
    x = _f64(x)
    nd = x.ndim - 2
    k = _per_dim(pool.kernel_size, nd, "pool kernel")
    s = _per_dim(pool.stride or k, nd, "pool stride")
    pads = _per_side(pool.padding or 0, nd)
    out_sz, extra, counts = [], [], []
    for size, ki, si, (b, e) in zip(x.shape[2:], k, s, pads):
        span = size + b + e - ki
        if span < 0:
            raise ValueError(f"pool kernel {ki} is larger than the padded input {size + b + e}")
        o = (-(-span // si) if pool.ceil_mode else span // si) + 1
        if pool.ceil_mode and (o - 1) * si >= size + b:
            o -= 1  # the last window must start inside the input or its begin padding
        out_sz.append(o)
        extra.append(max(0, (o - 1) * si + ki - (size + b + e)))
        start = np.arange(o) * si - b
        stop = np.minimum(start + ki, size + e)
        if pool.count_include_pad:
            counts.append(stop - start)
        else:
            counts.append(np.minimum(stop, size) - np.maximum(start, 0))
    xp = np.pad(x, [(0, 0), (0, 0)] + [(b, e + ex) for (b, e), ex in zip(pads, extra)])
    total = np.zeros((*x.shape[:2], *out_sz))
    for tap in _taps(k):
        idx = tuple(slice(t, t + (o - 1) * si + 1, si) for t, si, o in zip(tap, s, out_sz))
        total += xp[(slice(None), slice(None), *idx)]
    if pool.divisor_override:
        return total / float(pool.divisor_override)
    divisor = np.ones(())
    for cnt in counts:
        divisor = np.multiply.outer(divisor, cnt.astype(np.float64))
    return total / divisor


def pad(x: np.ndarray, pad_op: Pad) -> np.ndarray:
    """A core :class:`~reparam.core.types.Pad`: per-side padding of the spatial dims in its mode."""
    return pad_nd(x, pad_op.padding, pad_op.mode, pad_op.value)


def _conv_transpose(op: ConvTranspose, x: np.ndarray) -> np.ndarray:
    return conv_transpose_nd(
        x,
        op.weight,
        op.bias,
        stride=op.stride or 1,
        padding=op.padding or 0,
        output_padding=op.output_padding or 0,
        dilation=op.dilation or 1,
        groups=op.groups,
    )


def run_op(op, x):
    """Apply one core op to ``x`` in float64 (``Add`` takes a sequence of same-shaped arrays)."""
    if isinstance(op, Conv):
        return run_conv(op, x)
    if isinstance(op, ConvTranspose):
        return _conv_transpose(op, x)
    if isinstance(op, BatchNorm):
        return batch_norm(x, op)
    if isinstance(op, Affine):
        return affine(x, op)
    if isinstance(op, Identity):
        return _f64(x).copy()
    if isinstance(op, AvgPool):
        return avg_pool(x, op)
    if isinstance(op, Pad):
        return pad(x, op)
    if isinstance(op, Add):
        items = [_f64(v) for v in x]
        if not items:
            raise ValueError("Add needs at least one input")
        return np.sum(items, axis=0)
    raise TypeError(f"run_op does not know {type(op).__name__}")
