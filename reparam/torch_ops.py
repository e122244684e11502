"""Glue between torch modules/tensors and the numpy core values.

Only standard layers translate: a subclass that overrides ``forward`` computes something else, and a
module with forward hooks (old-style ``weight_norm``) may not hold the weight it will use, so both are
refused with a reason.  Parametrized weights (``torch.nn.utils.parametrize``) are read as computed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from . import core
from .core.errors import NotFusable

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.modules.batchnorm._BatchNorm,)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PADS = (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
         nn.modules.padding._ReplicationPadNd, nn.modules.padding.CircularPad1d,
         nn.modules.padding.CircularPad2d, nn.modules.padding.CircularPad3d, nn.ZeroPad2d)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PAD_MODES = {"constant": "zeros", "zeros": "zeros", "reflect": "reflect", "replicate": "replicate",
              "circular": "circular"}


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    """A detached float64 numpy copy of ``t`` (any float dtype, bfloat16 included, any device)."""
    if t is None:
        return None
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


_NUMPY_DTYPES = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
                 torch.float64: np.dtype(np.float64)}


def read_only(t: torch.Tensor | None) -> np.ndarray | None:
    """A read-only numpy view of a CPU float16/32/64 tensor (no copy: the core only reads kernels and
    computes in float64 as it goes); a float64 copy for other dtypes or devices."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type != "cpu" or t.dtype not in _NUMPY_DTYPES or t.is_conj() or t.is_neg():
        return to_numpy(t)
    a = t.numpy()
    a.flags.writeable = False
    return a


def numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype of a float16/32/64 torch dtype; None for those numpy lacks (bfloat16)."""
    return _NUMPY_DTYPES.get(dtype)


def to_tensor(a: np.ndarray, like: torch.Tensor | None = None, *, dtype=None, device=None,
              what: str = "fused weight", checked: bool = False) -> torch.Tensor:
    """Cast a float64 result to the model's dtype and device, refusing non-finite values (also after the cast).

    ``checked``: ``a`` already has the target dtype and was checked finite (e.g. by ``Term.cast``).
    """
    dtype = dtype or (like.dtype if like is not None else torch.float32)
    device = device or (like.device if like is not None else "cpu")
    target = numpy_dtype(dtype)
    if a.size and not (checked and a.dtype == target):
        peak = max(abs(float(a.max())), abs(float(a.min())))  # no temporary; NaN propagates
        if not np.isfinite(peak):
            raise NotFusable(f"{what} has non-finite values after folding")
        if dtype.is_floating_point and peak > torch.finfo(dtype).max:
            raise NotFusable(f"{what} overflows {dtype} (max |value| {peak:.3g} > {torch.finfo(dtype).max:.3g})")
    if target is not None and a.dtype != target:  # numpy's cast is several times faster than torch's here
        a = a.astype(target)
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype=dtype, device=device)


def is_exported_module(module: nn.Module) -> bool:
    """``module`` is the ``module()`` of a ``torch.export`` program (a graph with no mode: it refuses eval())."""
    unlifted = getattr(getattr(torch.export, "_unlift", None), "_StatefulGraphModule", None)
    return unlifted is not None and isinstance(module, unlifted)


def torch_base(module: nn.Module) -> type:
    """The torch.nn class ``module``'s class derives from (``nn.Module`` itself for a model's own module)."""
    return next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))


def plain_forward(module: nn.Module) -> bool:
    """``module`` runs the forward of the torch.nn class it derives from (a subclass did not override it)."""
    return type(module).forward is torch_base(module).forward


def is_no_op(module: nn.Module) -> bool:
    """``module`` returns its input itself: a plain ``nn.Identity``, or a dropout module in eval mode, without
    hooks."""
    return (isinstance(module, _IDENTITIES) and not (module.training and not isinstance(module, nn.Identity))
            and not module._forward_hooks and not module._forward_pre_hooks and plain_forward(module))


def _standard(module: nn.Module, bases: tuple[type, ...]) -> None:
    base = next(b for b in bases if isinstance(module, b))
    cls = type(module)
    if not plain_forward(module):
        raise NotFusable(f"{cls.__name__} overrides forward; its computation is not a standard "
                         f"{base.__name__}")
    if module._forward_hooks or module._forward_pre_hooks:
        raise NotFusable(f"{cls.__name__} has forward hooks (e.g. old-style weight_norm); the stored "
                         "weight may not be the one it computes")


def _spatial_padding(module: nn.Module) -> tuple[tuple[int, int], ...]:
    rev = list(module._reversed_padding_repeated_twice)
    pairs = [(rev[i], rev[i + 1]) for i in range(0, len(rev), 2)]
    return tuple(reversed(pairs))


def conv_from_module(m: nn.Module) -> core.Conv:
    """A core Conv from nn.ConvNd (padding mode and 'same' padding included) or nn.Linear (0 spatial dims)."""
    if isinstance(m, nn.Linear):
        _standard(m, (nn.Linear,))
        return core.Conv(read_only(m.weight), to_numpy(m.bias))
    _standard(m, _CONVS)
    return core.Conv(read_only(m.weight), to_numpy(m.bias), stride=m.stride, padding=_spatial_padding(m),
                     dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode)


def bn_from_module(m: nn.Module) -> core.BatchNorm:
    """A core BatchNorm from an eval-mode BN with running statistics; refuses batch-statistics BN."""
    _standard(m, _BNS)
    if m.training:
        raise NotFusable(f"{type(m).__name__} is in training mode (it normalizes with batch statistics)")
    if not m.track_running_stats or m.running_mean is None or m.running_var is None:
        raise NotFusable(f"{type(m).__name__} has no running statistics (track_running_stats=False); "
                         "it always normalizes with batch statistics")
    return core.BatchNorm(to_numpy(m.running_mean), to_numpy(m.running_var),
                          to_numpy(m.weight) if m.affine else None, to_numpy(m.bias) if m.affine else None,
                          float(m.eps))


def pool_from_module(m: nn.Module) -> core.AvgPool:
    """A core AvgPool from nn.AvgPool1d/2d/3d (count_include_pad, ceil_mode and divisor kept for the checks)."""
    _standard(m, _POOLS)
    nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[next(c for c in _POOLS if isinstance(m, c))]

    def tup(v):
        return (v,) * nd if isinstance(v, int) else tuple(v)

    return core.AvgPool(tup(m.kernel_size), tup(m.stride or m.kernel_size),
                        tuple((p, p) for p in tup(m.padding)), bool(m.count_include_pad), bool(m.ceil_mode),
                        getattr(m, "divisor_override", None))


def pad_from_torch(pad: tuple[int, ...] | list[int], mode: str, value: float = 0.0) -> core.Pad:
    """``F.pad``-style padding (last dim first, begin/end pairs) as a core Pad over the spatial dims."""
    if mode not in _PAD_MODES:
        raise NotFusable(f"padding mode {mode!r} is not linear")
    if len(pad) % 2:
        raise NotFusable(f"padding {pad} has an odd number of entries")
    pairs = tuple(reversed([(int(pad[i]), int(pad[i + 1])) for i in range(0, len(pad), 2)]))
    return core.Pad(pairs, _PAD_MODES[mode], float(value or 0.0))


def pad_from_module(m: nn.Module) -> core.Pad:
    """A core Pad from a zero/constant, reflection, replication or circular padding module."""
    _standard(m, _PADS)
    if isinstance(m, nn.modules.padding._ConstantPadNd):
        return pad_from_torch(m.padding, "constant", m.value)
    if isinstance(m, nn.modules.padding._ReflectionPadNd):
        return pad_from_torch(m.padding, "reflect")
    if isinstance(m, nn.modules.padding._ReplicationPadNd):
        return pad_from_torch(m.padding, "replicate")
    return pad_from_torch(m.padding, "circular")


def to_core(m: nn.Module) -> core.LinearOp:
    """The core op a standard linear module computes in eval mode; NotFusable for anything else."""
    if isinstance(m, _CONVS) or isinstance(m, nn.Linear):
        return conv_from_module(m)
    if isinstance(m, _BNS):
        return bn_from_module(m)
    if isinstance(m, _POOLS):
        return pool_from_module(m)
    if isinstance(m, _PADS):
        return pad_from_module(m)
    if isinstance(m, _IDENTITIES):
        return core.Identity()
    raise NotFusable(f"{type(m).__name__} is not a linear layer reparam knows")


@functools.lru_cache(maxsize=512)
def _template(cls: type[nn.Module], args: tuple, kwargs: tuple) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The state of ``cls(*args, **kwargs)`` on the meta device, and the keys of its containers."""
    state = cls(*args, **dict(kwargs), device="meta").__dict__
    return state, tuple(k for k, v in state.items() if isinstance(v, (dict, set, list)))


def blank_module(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` with its parameters still to be set (they are meta tensors).

    Built from the state of a cached meta-device template whose containers (parameter, buffer, hook dicts)
    are copied, so nothing is shared: constructing a conv runs its random initialisation, which costs 15x
    more than this and is thrown away anyway.
    """
    template, containers = _template(cls, args, tuple(sorted(kwargs.items())))
    state = dict(template)
    for k in containers:
        state[k] = type(state[k])(state[k])
    m = object.__new__(cls)
    object.__setattr__(m, "__dict__", state)
    return m


def to_module(conv: core.Conv, *, dtype=torch.float32, device="cpu", checked: bool = False) -> nn.Module:
    """A fresh nn.ConvNd (or nn.Linear for 0 spatial dims) computing ``conv``.

    Symmetric padding maps to the module's ``padding``; asymmetric padding is applied with an explicit
    pad (``reparam.torch_ops.PaddedConv``) so the module stays exact.  ``checked``: the weight and bias
    are already in ``dtype`` and known finite (see :func:`to_tensor`).
    """
    nd = conv.ndim
    weight = to_tensor(conv.weight, dtype=dtype, device=device, checked=checked)
    bias = None if conv.bias is None else to_tensor(conv.bias, dtype=dtype, device=device, what="fused bias",
                                                    checked=checked)
    if nd == 0:
        m = blank_module(nn.Linear, conv.in_channels, conv.out_channels, bias=bias is not None)
    else:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        symmetric = all(b == e for b, e in conv.padding)
        pad = tuple(b for b, _ in conv.padding) if symmetric else 0
        m = blank_module(cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=pad, dilation=conv.dilation, groups=conv.groups, bias=bias is not None,
                         padding_mode=conv.padding_mode if symmetric else "zeros")
        if not symmetric:
            m = PaddedConv(conv.padding, conv.padding_mode, m)
    target = m.conv if isinstance(m, PaddedConv) else m
    target._parameters["weight"] = nn.Parameter(weight)  # (its own table: nn.Module.__setattr__ costs more)
    if bias is not None:
        target._parameters["bias"] = nn.Parameter(bias)
    if m is target:  # a fresh layer without children: eval() would only set this
        m.training = False
        return m
    return m.eval()


def load_conv_(module: nn.Module, conv: core.Conv) -> None:
    """Copy ``conv``'s weight (and bias) into an existing conv/linear module in place, checking shapes."""
    if tuple(module.weight.shape) != conv.weight.shape:
        raise NotFusable(f"cannot load a {conv.weight.shape} kernel into {type(module).__name__} "
                         f"of weight shape {tuple(module.weight.shape)}")
    if conv.bias is not None and module.bias is None:
        raise NotFusable(f"{type(module).__name__} has no bias to receive the fused bias")
    with torch.no_grad():
        module.weight.copy_(to_tensor(conv.weight, module.weight))
        if module.bias is not None:
            b = conv.bias if conv.bias is not None else np.zeros(conv.out_channels)
            module.bias.copy_(to_tensor(b, module.bias, what="fused bias"))


class PaddedConv(nn.Module):
    """An explicit (possibly asymmetric) pad followed by an unpadded conv, for ONNX-style per-side pads."""

    def __init__(self, padding: tuple[tuple[int, int], ...], mode: str, conv: nn.Module) -> None:
        super().__init__()
        self.pad = [p for pair in reversed(padding) for p in pair]
        self.mode = {"zeros": "constant"}.get(mode, mode)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.pad(x, self.pad, mode=self.mode))


__all__ = [
    "PaddedConv",
    "blank_module",
    "bn_from_module",
    "conv_from_module",
    "is_exported_module",
    "load_conv_",
    "pad_from_module",
    "pad_from_torch",
    "pool_from_module",
    "read_only",
    "to_core",
    "to_module",
    "to_numpy",
    "to_tensor",
]
