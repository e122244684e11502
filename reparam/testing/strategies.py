"""Hypothesis strategies for the core value types (convs, batch norms, affines, inputs).

Every ``convs``/``conv_params`` argument may be a fixed value, ``None`` (drawn) or a Hypothesis strategy
(drawn from it), so a test pins exactly what it needs and lets the rest vary.  Arrays come from a drawn
seed and numpy's RNG rather than element-wise floats: that is much faster, and shrinking the seed is
all the shrinking a random weight needs.  Examples are kept small (channels <= 8, spatial <= 12) so
property tests that run the float64 reference stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from reparam.core.types import PADDING_MODES, Affine, BatchNorm, Conv

__all__ = [
    "ConvParams",
    "affines",
    "batch_norms",
    "conv_inputs",
    "conv_params",
    "convs",
    "inputs",
    "rngs",
    "seeds",
    "spatial_sizes",
]

T = TypeVar("T")
MaybeDrawn = Any  # a fixed value, None (drawn from a default strategy) or a SearchStrategy

MAX_CHANNELS = 8
MAX_SPATIAL = 12


@dataclass(frozen=True)
class ConvParams:
    """Consistent hyper-parameters of one convolution (everything but the weight values)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    bias: bool

    @property
    def ndim(self) -> int:
        """Number of spatial dims (0 for a linear layer)."""
        return len(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)


def _resolve(draw, value: MaybeDrawn, default: st.SearchStrategy[T]) -> T:
    if value is None:
        return draw(default)
    if isinstance(value, st.SearchStrategy):
        return draw(value)
    return value


def _per_dim(draw, value: MaybeDrawn, ndim: int, default: st.SearchStrategy[int], what: str):
    value = _resolve(draw, value, st.tuples(*([default] * ndim)))
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise InvalidArgument(f"{what}={value!r} does not fit ndim={ndim}")
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``numpy.random.default_rng`` (shrinks towards 0)."""
    return st.integers(0, 2**32 - 1)


def rngs() -> st.SearchStrategy[np.random.Generator]:
    """Seeded numpy generators; prints as the seed, so failures are reproducible."""
    return seeds().map(np.random.default_rng)


@st.composite
def _padding(draw, ndim: int, max_padding: int) -> tuple[tuple[int, int], ...]:
    side = st.integers(0, max_padding)
    if draw(st.booleans()):  # symmetric, the common case (and the only one torch modules express)
        return tuple((p, p) for p in draw(st.tuples(*([side] * ndim))))
    return tuple(draw(st.tuples(*([st.tuples(side, side)] * ndim))))


def _normalize_padding(value, ndim: int) -> tuple[tuple[int, int], ...]:
    if isinstance(value, (int, np.integer)):
        return ((int(value), int(value)),) * ndim
    items = list(value)
    if len(items) != ndim:
        raise InvalidArgument(f"padding={value!r} does not fit ndim={ndim}")
    if all(isinstance(p, (int, np.integer)) for p in items):
        return tuple((int(p), int(p)) for p in items)
    return tuple((int(a), int(b)) for a, b in items)


@st.composite
def conv_params(
    draw,
    ndim: MaybeDrawn = None,
    *,
    in_channels: MaybeDrawn = None,
    out_channels: MaybeDrawn = None,
    kernel_size: MaybeDrawn = None,
    groups: MaybeDrawn = None,
    stride: MaybeDrawn = None,
    dilation: MaybeDrawn = None,
    padding: MaybeDrawn = None,
    padding_mode: MaybeDrawn = None,
    bias: MaybeDrawn = None,
    max_channels: int = MAX_CHANNELS,
    max_kernel: int = 3,
    max_stride: int = 2,
    max_dilation: int = 2,
    max_padding: int = 2,
) -> ConvParams:
    """Draw consistent conv hyper-parameters: ``groups`` divides both channel counts, tuples fit ``ndim``.

    ``ndim`` defaults to 0-3 (0 = linear layer, which has no kernel, stride, padding or dilation).
    Padding is per side, symmetric about half the time; ``padding_mode`` is drawn from all four modes
    even when nothing is padded (the mode must then be irrelevant).  Fixed values that contradict
    each other raise :class:`hypothesis.errors.InvalidArgument`.
    """
    if ndim is None and isinstance(kernel_size, (tuple, list)):
        ndim = len(kernel_size)
    nd = int(_resolve(draw, ndim, st.integers(0, 3)))
    if not 0 <= nd <= 3:
        raise InvalidArgument(f"ndim={nd} must be 0..3")

    cin = _resolve(draw, in_channels, st.nothing()) if in_channels is not None else None
    cout = _resolve(draw, out_channels, st.nothing()) if out_channels is not None else None
    if groups is not None:
        g = int(_resolve(draw, groups, st.nothing()))
    else:
        fixed = [c for c in (cin, cout) if c is not None]
        if fixed:
            g = draw(st.sampled_from(_divisors(int(np.gcd.reduce(fixed)))))
        else:  # 1 first (shrink target); 8 with 8 channels each is depthwise
            g = draw(st.sampled_from([v for v in (1, 2, 3, 4, 8) if v <= max_channels]))
    per_group = st.integers(1, max(1, max_channels // g))
    cin = int(cin) if cin is not None else g * draw(per_group)
    cout = int(cout) if cout is not None else g * draw(per_group)
    if g < 1 or cin % g or cout % g:
        raise InvalidArgument(f"groups={g} does not divide in_channels={cin} and out_channels={cout}")

    k = _per_dim(draw, kernel_size, nd, st.integers(1, max_kernel), "kernel_size")
    s = _per_dim(draw, stride, nd, st.integers(1, max_stride), "stride")
    d = _per_dim(draw, dilation, nd, st.integers(1, max_dilation), "dilation")
    pads = _normalize_padding(_resolve(draw, padding, _padding(nd, max_padding)), nd)
    mode = _resolve(draw, padding_mode, st.sampled_from(PADDING_MODES)) if nd else "zeros"
    if mode not in PADDING_MODES:
        raise InvalidArgument(f"padding_mode={mode!r} is not one of {PADDING_MODES}")
    has_bias = bool(_resolve(draw, bias, st.booleans()))
    return ConvParams(cin, cout, k, s, pads, d, g, mode, has_bias)


@st.composite
def convs(
    draw,
    in_channels: MaybeDrawn = None,
    out_channels: MaybeDrawn = None,
    ndim: MaybeDrawn = None,
    kernel_size: MaybeDrawn = None,
    groups: MaybeDrawn = None,
    stride: MaybeDrawn = None,
    dilation: MaybeDrawn = None,
    padding: MaybeDrawn = None,
    bias: MaybeDrawn = None,
    dtype: Any = np.float64,
    *,
    padding_mode: MaybeDrawn = None,
    params: ConvParams | st.SearchStrategy[ConvParams] | None = None,
    weight_scale: float = 1.0,
    **limits: int,
) -> Conv:
    """Draw a core :class:`~reparam.core.types.Conv` with standard-normal weight and bias of ``dtype``.

    Arguments not given are drawn by :func:`conv_params` (``limits`` are its ``max_*`` keywords);
    ``params`` replaces all of them.  Values are drawn in float64 from a seeded RNG, then cast.
    """
    if params is None:
        p = draw(
            conv_params(
                ndim,
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=kernel_size,
                groups=groups,
                stride=stride,
                dilation=dilation,
                padding=padding,
                padding_mode=padding_mode,
                bias=bias,
                **limits,
            )
        )
    else:
        p = _resolve(draw, params, st.nothing())
    rng = draw(rngs())
    weight = (rng.standard_normal(p.weight_shape) * weight_scale).astype(dtype)
    b = (rng.standard_normal(p.out_channels) * weight_scale).astype(dtype) if p.bias else None
    return Conv(
        weight=weight,
        bias=b,
        stride=p.stride,
        padding=p.padding,
        dilation=p.dilation,
        groups=p.groups,
        padding_mode=p.padding_mode,
    )


def _min_size(k: int, dil: int, pads: tuple[int, int], mode: str) -> int:
    lo = max(1, dil * (k - 1) + 1 - pads[0] - pads[1])
    if mode == "reflect":  # torch: reflect padding must be smaller than the dim
        lo = max(lo, max(pads) + 1)
    elif mode == "circular":  # torch: circular padding may wrap at most once
        lo = max(lo, max(pads))
    return lo


def spatial_sizes(
    conv: Conv | ConvParams, max_size: int = MAX_SPATIAL, min_size: int = 1
) -> st.SearchStrategy[tuple[int, ...]]:
    """Input spatial sizes valid for ``conv``: ``size + pads >= dilation*(k-1)+1``, reflect pads < size,
    circular pads <= size.  ``max_size`` is raised per dim when the conv needs more; ``()`` for 0-dim.
    """
    dims = []
    for k, dil, pads in zip(conv.kernel_size, conv.dilation, conv.padding):
        lo = max(min_size, _min_size(k, dil, pads, conv.padding_mode))
        dims.append(st.integers(lo, max(lo, max_size)))
    return st.tuples(*dims)


def inputs(
    shape: Sequence[int] | st.SearchStrategy[Sequence[int]], dtype: Any = np.float64, scale: float = 1.0
) -> st.SearchStrategy[np.ndarray]:
    """Random standard-normal arrays of ``shape`` (fixed or drawn), times ``scale``, cast to ``dtype``."""
    shapes = shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape))
    return st.tuples(shapes, rngs()).map(
        lambda sr: (sr[1].standard_normal(tuple(sr[0])) * scale).astype(dtype)
    )


@st.composite
def conv_inputs(
    draw,
    conv: Conv | ConvParams,
    batch: int | None = None,
    max_size: int = MAX_SPATIAL,
    dtype: Any = np.float64,
) -> np.ndarray:
    """An input ``[N, in_channels, *spatial]`` valid for ``conv`` (N drawn from 1-2 unless given)."""
    n = batch if batch is not None else draw(st.integers(1, 2))
    sizes = draw(spatial_sizes(conv, max_size=max_size))
    return draw(inputs((n, conv.in_channels, *sizes), dtype=dtype))


def _channels(draw, channels: MaybeDrawn) -> int:
    return int(_resolve(draw, channels, st.integers(1, MAX_CHANNELS)))


@st.composite
def batch_norms(
    draw,
    channels: MaybeDrawn = None,
    *,
    affine: bool | None = None,
    dtype: Any = np.float64,
    min_var: float = 1e-6,
    max_gamma: float = 1e3,
    eps: MaybeDrawn = None,
) -> BatchNorm:
    """Draw an inference-mode :class:`~reparam.core.types.BatchNorm` whose statistics stress the algebra.

    Per example a regime is drawn: running variances log-uniform down to ``min_var`` (1e-6), |gamma|
    log-uniform up to ``max_gamma`` (1e3) with a drawn share of negative signs (and exact zeros),
    means up to 1e2, eps from common and extreme values.  ``affine=False`` leaves gamma/beta None.
    """
    c = _channels(draw, channels)
    rng = draw(rngs())
    var_lo = draw(st.sampled_from([0.0, -1.0, -3.0, float(np.log10(min_var))]))
    gamma_hi = draw(st.sampled_from([0.0, 1.0, float(np.log10(max_gamma))]))
    neg_share = draw(st.sampled_from([0.0, 0.5, 1.0]))
    mean_scale = draw(st.sampled_from([1.0, 0.0, 100.0]))
    eps_v = float(_resolve(draw, eps, st.sampled_from([1e-5, 1e-3, 1e-1, 1e-6, 0.0])))
    var = 10.0 ** rng.uniform(var_lo, max(var_lo, 1.0), c)
    if eps_v == 0.0:
        var = np.maximum(var, min_var)  # var + eps must stay positive
    mean = rng.standard_normal(c) * mean_scale
    has_affine = draw(st.booleans()) if affine is None else affine
    gamma = beta = None
    if has_affine:
        gamma = 10.0 ** rng.uniform(-2.0, max(gamma_hi, -2.0), c)
        gamma = np.where(rng.random(c) < neg_share, -gamma, gamma)
        if draw(st.booleans()):
            gamma[rng.random(c) < 0.2] = 0.0  # a dead channel
        beta = rng.standard_normal(c)

    def cast(v):
        return None if v is None else np.asarray(v).astype(dtype)

    return BatchNorm(cast(mean), cast(var), cast(gamma), cast(beta), eps=eps_v)


@st.composite
def affines(draw, channels: MaybeDrawn = None, dtype: Any = np.float64) -> Affine:
    """Draw a per-channel :class:`~reparam.core.types.Affine`; scale and shift are each per-channel,
    a broadcasting scalar (shape ``(1,)``) or None.
    """
    c = _channels(draw, channels)
    rng = draw(rngs())

    def part(kind: str, center: float) -> np.ndarray | None:
        if kind == "none":
            return None
        n = c if kind == "channel" else 1
        return (center + rng.standard_normal(n)).astype(dtype)

    kinds = st.sampled_from(["channel", "scalar", "none"])
    return Affine(scale=part(draw(kinds), 1.0), shift=part(draw(kinds), 0.0))
