"""The weight algebra on :class:`Conv` values, float64 in and out.

Public wrappers in :mod:`reparam.core.rules` add dtype handling; this module holds the math.
Conventions: for spatial dim ``i`` a conv reads, for output index ``u``, the input positions
``u*stride - pad_begin + j*dilation`` for ``j < k``.  Two convs give equal output sizes for every input
size iff ``pad_begin + pad_end - dilation*(k-1)`` is equal (given equal strides).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from math import gcd, prod

import numpy as np

from .errors import NotFusable
from .types import Affine, AvgPool, Conv, Pad


@functools.lru_cache(maxsize=4096)
def zeros_placeholder(shape: tuple[int, ...]) -> np.ndarray:
    """A read-only zero-memory array of ``shape`` (a broadcast 0), standing in for a kernel not computed."""
    return np.broadcast_to(np.float64(0.0), shape)


def _gcd_all(values, default: int = 1) -> int:
    g = 0
    for v in values:
        g = gcd(g, int(v))
    return g or default


def reach(conv: Conv, dim: int) -> int:
    """``pad_begin + pad_end - dilation*(k-1)``: equal across convs iff their output sizes always agree."""
    (b, e), d, k = conv.padding[dim], conv.dilation[dim], conv.kernel_size[dim]
    return b + e - d * (k - 1)


def fold_affine(conv: Conv, affine: Affine) -> Conv:
    """``affine(conv(x))`` as one conv: scale the output channels, then shift the bias."""
    n = conv.out_channels
    s, t = affine.scale_for(n), affine.shift_for(n)
    w = conv.weight * s.reshape((n,) + (1,) * (conv.weight.ndim - 1))
    return conv.with_(weight=w, bias=conv.bias_or_zeros() * s + t)


def identity(channels: int, ndim: int) -> Conv:
    """The identity as a depthwise 1x..x1 conv."""
    return Conv(np.ones((channels, 1) + (1,) * ndim), None, groups=channels)


def affine_conv(affine: Affine, channels: int, ndim: int) -> Conv:
    """A per-channel affine as a depthwise 1x..x1 conv."""
    return fold_affine(identity(channels, ndim), affine)


def regroup(conv: Conv, groups: int) -> Conv:
    """Re-express ``conv`` with fewer groups (a divisor of its own) by block-diagonal expansion."""
    g = conv.groups
    if groups == g:
        return conv
    if groups < 1 or g % groups:
        raise NotFusable(f"cannot regroup a conv with groups={g} into groups={groups} (not a divisor)")
    w = np.zeros((conv.out_channels, conv.weight.shape[1] * (g // groups), *conv.kernel_size), conv.weight.dtype)
    _add_regrouped(w, conv.weight, conv.groups, groups, (slice(None),) * w.ndim)
    return conv.with_(weight=w, groups=groups)


_CAST_BLOCK = 262144  # float64 elements of a kernel cast at a time by bias_through (2 MiB, stays in cache)


def bias_through(weight: np.ndarray, bias: np.ndarray, groups: int = 1) -> np.ndarray:
    """What a conv of ``weight`` (bias-free) gives, away from any padding, for a constant input: each input
    channel ``c`` holding ``bias[c]``.  Output channel ``o`` is the sum over its group's inputs and the taps of
    ``weight[o, c, ...] * bias[c]``, in float64.

    One BLAS product per block of output channels: a float32 kernel is cast a block at a time into a buffer
    that stays in cache (numpy's ``sum`` over the taps with ``dtype=float64`` runs one element per inner loop
    on a 1x1 kernel, ten times slower, and a float64 copy of the whole kernel costs more than the product)."""
    out, per = weight.shape[:2]
    taps = prod(weight.shape[2:])
    og = out // groups
    vec = np.repeat(np.asarray(bias, np.float64).reshape(groups, per, 1), taps, axis=2).reshape(groups, -1, 1)
    w = weight.reshape(groups, og, per * taps)
    if weight.dtype == np.float64:
        return np.matmul(w, vec).reshape(out)
    res = np.empty((groups, og))
    if groups == 1:  # blocks of rows
        step = max(1, _CAST_BLOCK // (per * taps))
        buf = np.empty((min(step, og), per * taps))
        for i in range(0, og, step):
            j = min(i + step, og)
            np.copyto(buf[: j - i], w[0, i:j], casting="unsafe")
            np.matmul(buf[: j - i], vec[0, :, 0], out=res[0, i:j])
    else:  # blocks of groups
        step = max(1, _CAST_BLOCK // (og * per * taps))
        for i in range(0, groups, step):
            j = min(i + step, groups)
            res[i:j] = np.matmul(w[i:j].astype(np.float64), vec[i:j])[..., 0]
    return res.reshape(out)


def _window_slices(conv: Conv, start: tuple[int, ...], dilation: tuple[int, ...], kernel: tuple[int, ...]):
    """Where ``conv``'s taps land in the window (one slice per dim) and the padding that keeps its output size."""
    slices, pads = [], []
    for i in range(conv.ndim):
        b, d, k = conv.padding[i][0], conv.dilation[i], conv.kernel_size[i]
        rel = -b - start[i]
        step = d // dilation[i] if k > 1 else 1
        misfit = rel % dilation[i] or (k > 1 and d % dilation[i])
        if misfit or rel < 0 or rel // dilation[i] + step * (k - 1) >= kernel[i]:
            offs = (-b + d * np.arange(k)).tolist()
            raise NotFusable(
                f"dim {i}: taps at offsets {offs} do not fit a window of {kernel[i]} taps at "
                f"dilation {dilation[i]} starting at {start[i]}")
        first = rel // dilation[i]
        slices.append(slice(first, first + step * (k - 1) + 1, step))
        new_b = -start[i]
        new_e = reach(conv, i) + dilation[i] * (kernel[i] - 1) - new_b
        if new_e < 0:
            raise NotFusable(f"dim {i}: the window would need negative end padding {new_e}")
        pads.append((new_b, new_e))
    return (slice(None), slice(None), *slices), tuple(pads)


def place(conv: Conv, start: tuple[int, ...], dilation: tuple[int, ...], kernel: tuple[int, ...]) -> Conv:
    """Re-express ``conv`` on a window of ``kernel`` taps at ``dilation`` starting at input offset ``start``.

    Exact (for every padding mode) when each tap of ``conv`` lands on a tap of the new window; the padding
    is adjusted so the output size is unchanged.
    """
    where, pads = _window_slices(conv, start, dilation, kernel)
    w = np.zeros(conv.weight.shape[:2] + tuple(kernel), conv.weight.dtype)
    w[where] = conv.weight
    return conv.with_(weight=w, padding=pads, dilation=tuple(dilation))


def pad_kernel(conv: Conv, kernel_size: tuple[int, ...], offset: tuple[int, ...] | None = None) -> Conv:
    """Zero-pad the kernel to ``kernel_size``, adding ``offset[i]`` taps before (default: centered).

    The conv's padding grows by the same amount, so the result computes exactly the same function.
    """
    nd = conv.ndim
    kernel_size = tuple(int(k) for k in kernel_size)
    if len(kernel_size) != nd:
        raise NotFusable(f"kernel_size {kernel_size} has {len(kernel_size)} dims, the conv has {nd}")
    if offset is None:
        offset = []
        for i, (big, k) in enumerate(zip(kernel_size, conv.kernel_size)):
            if (big - k) % 2:
                raise NotFusable(
                    f"dim {i}: padding a {k}-tap kernel to {big} taps cannot be centered "
                    f"(odd difference {big - k}); give an explicit offset")
            offset.append((big - k) // 2)
    offset = tuple(int(o) for o in offset)
    for i, (big, k, o) in enumerate(zip(kernel_size, conv.kernel_size, offset)):
        if big < k or o < 0 or o + k > big:
            raise NotFusable(f"dim {i}: cannot place a {k}-tap kernel at offset {o} inside {big} taps")
    start = tuple(-conv.padding[i][0] - offset[i] * conv.dilation[i] for i in range(nd))
    return place(conv, start, conv.dilation, kernel_size)


def _merged_mode(convs: list[Conv], what: str) -> str:
    """Padding mode of a merged conv: convs that never read padding accept any mode."""
    modes = {c.padding_mode for c in convs if c.is_padded and c.padding_mode != "zeros"}
    zero_padded = any(c.is_padded and c.padding_mode == "zeros" for c in convs)
    if len(modes) > 1 or (modes and zero_padded):
        found = sorted(modes | ({"zeros"} if zero_padded else set()))
        raise NotFusable(f"{what}: padding modes differ between padded branches: {found}")
    return modes.pop() if modes else "zeros"


def sum_geometry(convs: list[Conv], sizes: Sequence[int | None] | None = None) -> Conv:
    """The geometry of :func:`sum_convs` (all its legality checks) with a zero-memory placeholder kernel.

    ``sizes``: the input's spatial sizes where they are fixed (None, or None in a dim, where they are not).
    A dim where the reaches differ is then legal if the output sizes agree at that size.
    """
    if not convs:
        raise NotFusable("nothing to sum")
    first = convs[0]
    for c in convs[1:]:
        for attr in ("ndim", "in_channels", "out_channels", "stride"):
            if getattr(c, attr) != getattr(first, attr):
                raise NotFusable(
                    f"branch sum: {attr} differs ({getattr(first, attr)} vs {getattr(c, attr)})")
    nd = first.ndim
    outs: dict[int, int] = {}  # dim -> the output size shared at the fixed input size (dims whose reaches differ)
    for i in range(nd):
        reaches = [reach(c, i) for c in convs]
        if len(set(reaches)) == 1:
            continue
        desc = "; ".join(f"k={c.kernel_size[i]} pad={c.padding[i]} dil={c.dilation[i]}" for c in convs)
        n = None if sizes is None else sizes[i]
        if n is None:
            raise NotFusable(f"branch sum: windows do not align in dim {i}; output sizes differ for some input "
                             f"sizes ({desc})")
        sizes_out = {(n + r - 1) // first.stride[i] + 1 for r in reaches}
        if len(sizes_out) > 1:
            raise NotFusable(f"branch sum: windows do not align in dim {i}; output sizes differ at input size {n} "
                             f"({sorted(sizes_out)}; {desc})")
        outs[i] = sizes_out.pop()
    mode = _merged_mode(convs, "branch sum")
    groups = _gcd_all(c.groups for c in convs)
    start, dil, kern = [], [], []
    for i in range(nd):
        starts = [-c.padding[i][0] for c in convs]
        ends = [-c.padding[i][0] + c.dilation[i] * (c.kernel_size[i] - 1) for c in convs]
        s0 = min(starts)
        d = _gcd_all([c.dilation[i] for c in convs if c.kernel_size[i] > 1] + [s - s0 for s in starts])
        start.append(s0)
        dil.append(d)
        kern.append((max(ends) - s0) // d + 1)
    start, dil, kern = tuple(start), tuple(dil), tuple(kern)
    _, pads = _window_slices(first, start, dil, kern)
    if outs:
        pads = list(pads)
        for i, out in outs.items():
            pads[i] = (pads[i][0], _end_padding(sizes[i], out, first.stride[i], pads[i][0], dil[i] * (kern[i] - 1)))
        pads = tuple(pads)
    shape = (first.out_channels, first.in_channels // groups, *kern)
    return Conv(zeros_placeholder(shape), None, stride=first.stride, padding=pads, dilation=dil,
                groups=groups, padding_mode=mode)


def _end_padding(n: int, out: int, stride: int, begin: int, extent: int) -> int:
    """The least end padding giving ``out`` outputs on ``n`` inputs for a window of ``extent + 1`` cells.

    It covers every cell the last output reads (each branch read the same cells, inside its own padding).
    """
    end = max(0, (out - 1) * stride + extent - (n - 1 + begin))
    if (n + begin + end - extent - 1) // stride + 1 != out:
        raise NotFusable(f"branch sum: at input size {n} the merged window would need a crop to give {out} outputs")
    return end


def sum_convs(convs: list[Conv], sizes: Sequence[int | None] | None = None) -> Conv:
    """One conv computing the sum of convs applied to the same input.

    Legal when channels, ndim and stride agree and every output size agrees for every input size (or, in
    a dim whose input size ``sizes`` fixes, at that size). The merged window is the union of the branches'
    windows, at the gcd of their dilations; grouped kernels expand block-diagonally to the gcd of the groups.
    """
    geo = sum_geometry(convs, sizes)
    if len(convs) == 1:
        return convs[0]
    start = tuple(-b for b, _ in geo.padding)
    weight = np.zeros(geo.weight.shape)
    bias = np.zeros(geo.out_channels)
    any_bias = False
    for c in convs:
        where, _ = _window_slices(c, start, geo.dilation, geo.kernel_size)
        if c.groups == geo.groups:
            weight[where] += c.weight
        else:
            _add_regrouped(weight, c.weight, c.groups, geo.groups, where)
        if c.bias is not None:
            any_bias = True
            bias = bias + c.bias
    return geo.with_(weight=weight, bias=bias if any_bias else None)


def _add_regrouped(out: np.ndarray, weight: np.ndarray, conv_groups: int, groups: int, where: tuple,
                   rows: tuple[int, int, int] | None = None) -> None:
    """``out[where] += `` the block-diagonal expansion of a kernel with ``conv_groups`` groups to ``groups``.

    ``rows``: ``(first, last, out_channels)`` when ``weight`` holds only output channels ``first:last`` of a
    kernel with ``out_channels`` (``out`` then holds those rows too); default: the whole kernel.
    """
    first, last, n_out = rows or (0, weight.shape[0], weight.shape[0])
    in_g, per, out_g = weight.shape[1], conv_groups // groups, n_out // conv_groups
    # output channel r reads its group's inputs (group r // out_g); with fewer groups those inputs sit at
    # columns local * in_g + [0, in_g), local being the group's index inside the merged group
    r = np.arange(first, last)
    cols = ((r // out_g) % per)[:, None] * in_g + np.arange(in_g)[None, :]
    out[((r - first)[:, None], cols, *where[2:])] += weight


def compose(a: Conv, b: Conv, *, weights: bool = True) -> Conv:
    """One conv computing ``b(a(x))``.

    ``weights=False`` checks legality and returns the composite's shape and bias with a zero-memory
    placeholder kernel (a read-only broadcast of 0): the planner uses it to price a composition first.

    Always exact when ``b`` does not pad.  When ``b`` pads with zeros, ``a``'s output at the border must
    be zero, so ``a`` must be pointwise and bias-free, padding (if at all) with zeros; when ``b`` pads
    with a non-zero mode, ``a`` must be pointwise, unpadded and stride 1 (a pointwise map commutes with
    reflect/replicate/circular padding).  Stride composes as ``sa*sb`` with ``b`` dilated by ``sa``.
    """
    if a.ndim != b.ndim:
        raise NotFusable(f"compose: spatial dims differ ({a.ndim} vs {b.ndim})")
    if a.out_channels != b.in_channels:
        raise NotFusable(f"compose: {a.out_channels} channels feed a conv expecting {b.in_channels}")
    if b.is_padded:
        why = []
        if not a.is_pointwise:
            why.append(f"the first has kernel {a.kernel_size}")
        if b.padding_mode == "zeros":
            if a.is_padded and a.padding_mode != "zeros":
                why.append(f"the first pads {a.padding} in {a.padding_mode} mode")
            if a.bias is not None and np.any(a.bias != 0):
                why.append(f"the first has a non-zero bias (max |b| {np.abs(a.bias).max():.3g}), "
                           "which the second conv's zero padding does not see")
        else:
            if a.is_padded:
                why.append(f"the first pads {a.padding}")
            if any(s != 1 for s in a.stride):
                why.append(f"the first has stride {a.stride} under {b.padding_mode} padding")
        if why:
            raise NotFusable(f"compose: the second conv pads {b.padding} ({b.padding_mode}) but "
                             + "; ".join(why) + "; the border would differ")
        mode = b.padding_mode
    else:
        mode = a.padding_mode if a.is_padded else "zeros"

    if _is_channel_scale(a) and weights:
        return _scale_inputs(a, b, mode)
    nd = a.ndim
    depthwise_a = a.groups == a.in_channels == a.out_channels
    groups = b.groups if depthwise_a else gcd(a.groups, b.groups)
    sa, sb = a.stride, b.stride
    tap_a = [a.dilation[i] if a.kernel_size[i] > 1 else 0 for i in range(nd)]
    tap_b = [b.dilation[i] * sa[i] if b.kernel_size[i] > 1 else 0 for i in range(nd)]
    dil = tuple(_gcd_all([tap_a[i], tap_b[i]]) for i in range(nd))
    kern = tuple(((b.kernel_size[i] - 1) * b.dilation[i] * sa[i] + (a.kernel_size[i] - 1) * a.dilation[i])
                 // dil[i] + 1 for i in range(nd))
    c3, c1 = b.out_channels, a.in_channels
    og, ig, mg = c3 // groups, c1 // groups, a.out_channels // groups
    if weights or a.bias is not None or b.bias is not None:  # pricing a bias-free pair reads no kernel
        wb = regroup(b, groups).weight.reshape((groups, og, mg) + b.kernel_size)
    if weights:
        # per-channel a: each composite tap is b's tap times a's kernel, no matrix product
        wa = (a.weight.reshape((groups, 1, mg) + a.kernel_size) if depthwise_a
              else regroup(a, groups).weight.reshape((groups, mg, ig) + a.kernel_size))
        w = np.zeros((groups, og, ig) + kern)
    else:
        w = zeros_placeholder((groups, og, ig) + kern)
    a_step = tuple(a.dilation[i] // dil[i] if a.kernel_size[i] > 1 else 1 for i in range(nd))
    for jb in itertools.product(*(range(k) for k in b.kernel_size)) if weights else ():
        tap = wb[(Ellipsis, *jb)]
        if depthwise_a:
            part = tap.reshape(tap.shape + (1,) * nd) * wa
        else:  # per group, [og, mg] @ [mg, ig * taps]: a BLAS product (einsum's own loop is ~50x slower)
            part = np.matmul(tap, wa.reshape(groups, mg, -1)).reshape((groups, og, ig) + a.kernel_size)
        at = tuple(jb[i] * b.dilation[i] * sa[i] // dil[i] for i in range(nd))
        sl = tuple(slice(at[i], at[i] + a_step[i] * (a.kernel_size[i] - 1) + 1, a_step[i])
                   for i in range(nd))
        w[(slice(None), slice(None), slice(None), *sl)] += part
    bias = None
    if a.bias is not None or b.bias is not None:
        bias = bias_through(wb.reshape((c3, mg) + b.kernel_size), a.bias_or_zeros(), groups) + b.bias_or_zeros()
    pad = tuple((a.padding[i][0] + sa[i] * b.padding[i][0], a.padding[i][1] + sa[i] * b.padding[i][1])
                for i in range(nd))
    return Conv(w.reshape((c3, ig, *kern)), bias, stride=tuple(sa[i] * sb[i] for i in range(nd)),
                padding=pad, dilation=dil, groups=groups, padding_mode=mode)


def _is_channel_scale(a: Conv) -> bool:
    """``a`` scales (and shifts) each channel on its own: depthwise, 1x..x1, stride 1, unpadded."""
    return (a.groups == a.out_channels == a.in_channels and a.is_pointwise and not a.is_padded
            and all(s == 1 for s in a.stride))


def _scale_inputs(a: Conv, b: Conv, mode: str) -> Conv:
    """``b(a(x))`` for a per-channel ``a``: scale ``b``'s input channels; O(weights), no matrix product."""
    s = a.weight.reshape(-1)
    no_bias = a.bias is None or not np.any(a.bias)
    if no_bias and np.all(s == 1):
        return b if b.padding_mode == mode else b.with_(padding_mode=mode)
    g, per = b.groups, b.weight.shape[1]
    scale = s.reshape(g, 1, per)  # channel c of group gi is input gi*per + c
    w = (b.weight.reshape((g, b.out_channels // g, per) + b.kernel_size)
         * scale.reshape((g, 1, per) + (1,) * b.ndim)).reshape(b.weight.shape)
    bias = b.bias
    if not no_bias:
        bias = bias_through(b.weight, a.bias, g) + (0 if bias is None else bias)
    return b.with_(weight=w, bias=bias, padding_mode=mode)


def avgpool_conv(pool: AvgPool, channels: int) -> Conv:
    """Average pooling as a depthwise conv; exact when padded cells count or there is no padding."""
    padded = any(p for pair in pool.padding for p in pair)
    if pool.ceil_mode:
        raise NotFusable("average pooling with ceil_mode=True has a partial last window whose divisor "
                         "differs from a conv's")
    if padded and not pool.count_include_pad and pool.divisor_override is None:
        raise NotFusable("average pooling with count_include_pad=False divides border windows by fewer "
                         "cells; no conv computes that")
    divisor = pool.divisor_override or int(np.prod(pool.kernel_size))
    w = np.full((channels, 1) + pool.kernel_size, 1.0 / divisor)
    return Conv(w, None, stride=pool.stride, padding=pool.padding, groups=channels)


def pad_conv(pad: Pad, channels: int) -> Conv:
    """Spatial padding as an identity conv that pads: zeros/constant 0, reflect, replicate or circular."""
    mode = {"constant": "zeros", "edge": "replicate", "wrap": "circular"}.get(pad.mode, pad.mode)
    if mode not in ("zeros", "reflect", "replicate", "circular"):
        raise NotFusable(f"padding mode {pad.mode!r} is not one reparam folds")
    if mode == "zeros" and pad.value != 0:
        raise NotFusable(f"constant padding with value {pad.value} is not linear-homogeneous; only 0 folds")
    if any(p < 0 for pair in pad.padding for p in pair):
        raise NotFusable(f"negative padding {pad.padding} (a crop) is not folded")
    nd = len(pad.padding)
    return identity(channels, nd).with_(padding=pad.padding, padding_mode=mode)
