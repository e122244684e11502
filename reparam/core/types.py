"""Value types of the weight algebra: plain numpy containers, 0 to 3 spatial dims.

A :class:`Conv` with zero spatial dims is a fully connected layer (weight ``[out, in]``), so the same
rules fold BN into ``Linear`` layers.  Padding is stored per side, ``((begin, end), ...)``, so ONNX's
asymmetric pads are representable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .errors import NotFusable, ReparamError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IntOrSeq = int | Sequence[int]
PaddingArg = int | Sequence[int] | Sequence[Sequence[int]]


def _tuple(value: IntOrSeq, ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ReparamError(f"{what} has {len(out)} entries, expected {ndim} (one per spatial dim)")
    return out


def normalize_padding(padding: PaddingArg, ndim: int) -> tuple[tuple[int, int], ...]:
    """Accept ``p``, ``(p_h, p_w)`` or ``((top, bottom), (left, right))`` and return per-side pairs."""
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * ndim
    items = list(padding)
    if len(items) == ndim and all(isinstance(p, (int, np.integer)) for p in items):
        return tuple((int(p), int(p)) for p in items)
    if len(items) == ndim and all(not isinstance(p, (int, np.integer)) and len(p) == 2 for p in items):
        return tuple((int(a), int(b)) for a, b in items)
    raise ReparamError(f"padding {padding!r} does not fit {ndim} spatial dims")


def _as_array(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" and str(arr.dtype) != "bfloat16":
        raise ReparamError(f"{what} must be a numeric array, got dtype {arr.dtype}")
    return arr


@dataclass(frozen=True, eq=False)
class Conv:
    """A convolution ``y = W * x + b`` (cross-correlation, as in PyTorch and ONNX).

    ``weight`` is ``[out, in/groups, *kernel]``; ``bias`` is ``[out]`` or None.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        w = _as_array(self.weight, "conv weight")
        object.__setattr__(self, "weight", w)
        if w.ndim < 2:
            raise ReparamError(f"conv weight must be [out, in/groups, *kernel], got shape {w.shape}")
        nd = w.ndim - 2
        object.__setattr__(self, "stride", _tuple(self.stride or 1, nd, "stride") if nd else ())
        object.__setattr__(self, "dilation", _tuple(self.dilation or 1, nd, "dilation") if nd else ())
        object.__setattr__(self, "padding", normalize_padding(self.padding or 0, nd) if nd else ())
        if self.bias is not None:
            b = _as_array(self.bias, "conv bias")
            if b.shape != (w.shape[0],):
                raise ReparamError(f"conv bias shape {b.shape} does not match {w.shape[0]} output channels")
            object.__setattr__(self, "bias", b)
        if self.groups < 1 or w.shape[0] % self.groups:
            raise ReparamError(f"groups={self.groups} does not divide out_channels={w.shape[0]}")
        if self.padding_mode not in PADDING_MODES:
            raise ReparamError(f"padding_mode {self.padding_mode!r} is not one of {PADDING_MODES}")
        if any(s < 1 for s in self.stride) or any(d < 1 for d in self.dilation):
            raise ReparamError(f"stride {self.stride} and dilation {self.dilation} must be positive")
        if any(p < 0 for pair in self.padding for p in pair):
            raise NotFusable(f"negative padding {self.padding} (a crop) is not a convolution")

    @property
    def ndim(self) -> int:
        """Number of spatial dims (0 for a fully connected layer)."""
        return self.weight.ndim - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype

    @property
    def is_padded(self) -> bool:
        return any(p for pair in self.padding for p in pair)

    @property
    def is_pointwise(self) -> bool:
        """Every kernel dim is 1 (a 1x1 conv or a linear layer)."""
        return all(k == 1 for k in self.kernel_size)

    def bias_or_zeros(self) -> np.ndarray:
        return self.bias if self.bias is not None else np.zeros(self.out_channels, self.weight.dtype)

    def with_(self, **changes) -> Conv:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)

    def _evolve(self, **changes) -> Conv:
        """A copy with fields replaced by values already valid for it (a same-shape kernel array, a bias
        array or None, a padding mode): no validation, for the planner's inner loop."""
        new = object.__new__(Conv)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel_size)) or "fc"
        return (f"Conv({self.in_channels}->{self.out_channels}, k={k}, stride={self.stride}, "
                f"pad={self.padding}, dil={self.dilation}, groups={self.groups}, mode={self.padding_mode})")


@dataclass(frozen=True, eq=False)
class ConvTranspose:
    """A transposed convolution; ``weight`` is ``[in, out/groups, *kernel]`` as in PyTorch and ONNX."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    output_padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def __post_init__(self) -> None:
        w = _as_array(self.weight, "conv-transpose weight")
        object.__setattr__(self, "weight", w)
        if w.ndim < 3:
            raise ReparamError(f"conv-transpose weight must be [in, out/groups, *kernel], got {w.shape}")
        if self.groups < 1 or w.shape[0] % self.groups:
            raise ReparamError(f"groups={self.groups} does not divide in_channels={w.shape[0]}")
        if self.bias is not None:
            b = _as_array(self.bias, "conv-transpose bias")
            if b.shape != (self.out_channels,):
                raise ReparamError(f"bias shape {b.shape} does not match {self.out_channels} output channels")
            object.__setattr__(self, "bias", b)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True, eq=False)
class BatchNorm:
    """Inference-mode batch norm: ``gamma * (x - mean) / sqrt(var + eps) + beta`` per channel."""

    running_mean: np.ndarray
    running_var: np.ndarray
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        n = np.asarray(self.running_mean).shape
        for name in ("running_mean", "running_var", "gamma", "beta"):
            v = getattr(self, name)
            if v is None:
                continue
            arr = _as_array(v, f"batch-norm {name}")
            if arr.shape != n or arr.ndim != 1:
                raise ReparamError(f"batch-norm {name} has shape {arr.shape}, expected {n}")
            object.__setattr__(self, name, arr)

    @property
    def channels(self) -> int:
        return self.running_mean.shape[0]

    def to_affine(self) -> Affine:
        """The per-channel affine this BN computes, in float64; refuses a negative or non-finite variance."""
        var = np.asarray(self.running_var, np.float64)
        if not np.all(np.isfinite(var)) or np.any(var + self.eps <= 0):
            raise NotFusable(f"batch norm has running_var + eps <= 0 or non-finite (min {var.min()!r})")
        inv = 1.0 / np.sqrt(var + float(self.eps))
        gamma = np.ones_like(var) if self.gamma is None else np.asarray(self.gamma, np.float64)
        beta = np.zeros_like(var) if self.beta is None else np.asarray(self.beta, np.float64)
        scale = gamma * inv
        return Affine(scale=scale, shift=beta - np.asarray(self.running_mean, np.float64) * scale)


@dataclass(frozen=True, eq=False)
class Affine:
    """Per-channel ``scale * x + shift``; either may be None (1 and 0).  Scalars broadcast."""

    scale: np.ndarray | None = None
    shift: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("scale", "shift"):
            v = getattr(self, name)
            if v is not None:
                arr = np.atleast_1d(_as_array(v, f"affine {name}"))
                if arr.ndim != 1:
                    raise ReparamError(f"affine {name} must be per-channel (1-D), got shape {arr.shape}")
                object.__setattr__(self, name, arr)

    def scale_for(self, channels: int) -> np.ndarray:
        return _broadcast(self.scale, channels, 1.0, "scale")

    def shift_for(self, channels: int) -> np.ndarray:
        return _broadcast(self.shift, channels, 0.0, "shift")


def _broadcast(v: np.ndarray | None, channels: int, default: float, what: str) -> np.ndarray:
    if v is None:
        return np.full(channels, default, np.float64)
    v = np.asarray(v, np.float64)
    if v.shape[0] == 1:
        return np.full(channels, v[0])
    if v.shape[0] != channels:
        raise NotFusable(f"affine {what} has {v.shape[0]} entries but the value has {channels} channels")
    return v


@dataclass(frozen=True)
class Identity:
    """``y = x`` (also eval-mode dropout)."""


@dataclass(frozen=True)
class AvgPool:
    """Average pooling; exact as a depthwise conv only when padded cells count (or there is no padding)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    count_include_pad: bool = True
    ceil_mode: bool = False
    divisor_override: int | None = None

    def __post_init__(self) -> None:
        k = tuple(int(v) for v in self.kernel_size)
        nd = len(k)
        object.__setattr__(self, "kernel_size", k)
        object.__setattr__(self, "stride", _tuple(self.stride or k, nd, "pool stride"))
        object.__setattr__(self, "padding", normalize_padding(self.padding or 0, nd))


@dataclass(frozen=True)
class Pad:
    """Constant zero padding of the spatial dims, per side (a crop, negative padding, is refused)."""

    padding: tuple[tuple[int, int], ...]
    mode: str = "zeros"
    value: float = 0.0


@dataclass(frozen=True)
class Add:
    """Sum of two or more values of the same shape, each times its coefficient (``a - b`` is
    ``Add((1.0, -1.0))``); no coefficients means a plain sum."""

    coefficients: tuple[float, ...] | None = None

    def coefficient(self, i: int) -> float:
        return 1.0 if self.coefficients is None else float(self.coefficients[i])


LinearOp = Conv | BatchNorm | Affine | Identity | AvgPool | Pad | Add

__all__ = [
    "PADDING_MODES",
    "Add",
    "Affine",
    "AvgPool",
    "BatchNorm",
    "Conv",
    "ConvTranspose",
    "Identity",
    "LinearOp",
    "Pad",
    "normalize_padding",
]

