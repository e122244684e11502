"""The public weight-algebra rules: float64 math from :mod:`conv_algebra`, cast back to the input dtype.

Each function documents its legality conditions and raises :class:`~reparam.core.errors.NotFusable`
with the failed condition when they do not hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import conv_algebra as _alg
from .kernel_sum import KernelSum
from .precision import cast_array, cast_conv, conv64, f64
from .types import Affine, AvgPool, BatchNorm, Conv, ConvTranspose, Pad


def _affine_of(norm: BatchNorm | Affine) -> Affine:
    return norm.to_affine() if isinstance(norm, BatchNorm) else norm


def fold_bn(conv: Conv, bn: BatchNorm | Affine, *, out: np.ndarray | None = None) -> Conv:
    """``bn(conv(x))`` as one conv (also a linear layer: a conv with zero spatial dims).

    Always legal; the result keeps ``conv``'s dtype and gains a bias.  ``out``: an array of the kernel's
    shape and ``conv``'s dtype to write the kernel into (a frontend's fresh tensor memory).
    """
    if isinstance(bn, BatchNorm) and bn.channels != conv.out_channels:
        raise _alg.NotFusable(f"batch norm has {bn.channels} channels, the conv outputs {conv.out_channels}")
    aff = _affine_of(bn)
    n = conv.out_channels
    s = aff.scale_for(n)
    bias = (np.zeros(n) if conv.bias is None else f64(conv.bias)) * s + aff.shift_for(n)
    # the deferred kernel multiplies in float64 straight into the conv's dtype (each value rounded once, no
    # float64 copy of the kernel) and refuses a non-finite result with the reason
    return KernelSum.of(conv).scaled(s).to_conv(conv.dtype, bias, out=out)


def fold_bn_input(bn: BatchNorm | Affine, conv: Conv) -> Conv:
    """``conv(bn(x))`` as one conv: the BN scales the conv's input channels and its shift moves into the bias.

    Exact when ``conv`` does not pad (its zero border would not see the shift) or the shift is zero; refused
    otherwise.  The result keeps ``conv``'s dtype.
    """
    c = conv64(conv)
    if isinstance(bn, BatchNorm) and bn.channels != c.in_channels:
        raise _alg.NotFusable(f"batch norm has {bn.channels} channels, the conv reads {c.in_channels}")
    first = _alg.affine_conv(_affine_of(bn), c.in_channels, c.ndim)
    return cast_conv(_alg.compose(first, c), conv.dtype)


def fold_bn_transpose(conv: ConvTranspose, bn: BatchNorm | Affine) -> ConvTranspose:
    """``bn(conv_transpose(x))`` as one transposed conv; scales each group's output slice of the weight."""
    if isinstance(bn, BatchNorm) and bn.channels != conv.out_channels:
        raise _alg.NotFusable(f"batch norm has {bn.channels} channels, the transposed conv outputs "
                              f"{conv.out_channels}")
    aff = _affine_of(bn)
    n, g = conv.out_channels, conv.groups
    s, t = aff.scale_for(n), aff.shift_for(n)
    w = f64(conv.weight)
    k = w.shape[2:]
    w = w.reshape((g, w.shape[0] // g, n // g) + k) * s.reshape((g, 1, n // g) + (1,) * len(k))
    b = (np.zeros(n) if conv.bias is None else f64(conv.bias)) * s + t
    return ConvTranspose(cast_array(w.reshape(conv.weight.shape), conv.weight.dtype, "fused weight"),
                         cast_array(b, conv.weight.dtype, "fused bias"), conv.stride, conv.padding,
                         conv.output_padding, conv.dilation, conv.groups)


def identity_conv(channels: int, ndim: int, kernel_size: int | tuple[int, ...] = 1, groups: int | None = None,
                  dtype=np.float32) -> Conv:
    """The identity as a conv with any (odd, centered) kernel size and any groups dividing ``channels``.

    ``groups=None`` gives a depthwise kernel; ``groups=1`` a dense one (block-diagonal expansion).
    """
    k = (kernel_size,) * ndim if isinstance(kernel_size, int) else tuple(kernel_size)
    conv = _alg.regroup(_alg.identity(channels, ndim), groups or channels)
    if any(v != 1 for v in k):
        conv = _alg.pad_kernel(conv, k)
    return cast_conv(conv, dtype)


def affine_to_conv(norm: BatchNorm | Affine, channels: int, ndim: int, kernel_size: int | tuple[int, ...] = 1,
                   groups: int | None = None, dtype=np.float32) -> Conv:
    """A BN-only or per-channel affine branch as a conv of any kernel size and groups (see identity_conv)."""
    conv = _alg.fold_affine(_alg.regroup(_alg.identity(channels, ndim), groups or channels), _affine_of(norm))
    k = (kernel_size,) * ndim if isinstance(kernel_size, int) else tuple(kernel_size)
    if any(v != 1 for v in k):
        conv = _alg.pad_kernel(conv, k)
    return cast_conv(conv, dtype)


def pad_kernel(conv: Conv, kernel_size: tuple[int, ...], offset: tuple[int, ...] | None = None) -> Conv:
    """Zero-pad a kernel to ``kernel_size`` (centered unless ``offset`` gives the taps added before).

    The conv's padding grows to match, so outputs are unchanged; an odd size difference cannot be
    centered and needs an explicit offset.
    """
    return cast_conv(_alg.pad_kernel(conv64(conv), tuple(kernel_size), offset), conv.dtype)


def regroup(conv: Conv, groups: int) -> Conv:
    """Expand a grouped kernel block-diagonally to ``groups`` (a divisor of its own groups)."""
    return cast_conv(_alg.regroup(conv64(conv), groups), conv.dtype)


def sum_convs(convs: list[Conv], sizes: Sequence[int | None] | None = None) -> Conv:
    """One conv equal to the sum of convs reading the same input (see ``conv_algebra.sum_convs``);
    ``sizes`` fixes the input's spatial sizes, so branches whose output sizes agree only there sum too."""
    return cast_conv(_alg.sum_convs([conv64(c) for c in convs], sizes), convs[0].dtype)


def compose(first: Conv, second: Conv) -> Conv:
    """One conv equal to ``second(first(x))`` under the border rule (see ``conv_algebra.compose``)."""
    return cast_conv(_alg.compose(conv64(first), conv64(second)), first.dtype)


def avgpool_to_conv(pool: AvgPool, channels: int, dtype=np.float32) -> Conv:
    """Average pooling as a depthwise conv (refused for ceil_mode or padding not counted)."""
    return cast_conv(_alg.avgpool_conv(pool, channels), dtype)


def pad_to_conv(pad: Pad, channels: int, dtype=np.float32) -> Conv:
    """Zero/reflect/replicate/circular padding as an identity conv that pads."""
    return cast_conv(_alg.pad_conv(pad, channels), dtype)


__all__ = ["affine_to_conv", "avgpool_to_conv", "compose", "fold_bn", "fold_bn_input", "fold_bn_transpose",
           "identity_conv",
           "pad_kernel", "pad_to_conv", "regroup", "sum_convs"]
