"""Torch-side checks for re-parameterized models: output equivalence, executed-op counts, random BN stats.

Needs torch (the ``torch`` extra); :mod:`reparam.testing` imports this module only when one of its names
is first used.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "assert_equivalent",
    "assert_outputs_close",
    "count_executed_ops",
    "eval_no_grad",
    "randomize_bn_",
]


def _as_args(inputs: Any) -> tuple:
    if inputs is None:
        return ()
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


@contextlib.contextmanager
def eval_no_grad(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` in eval mode under ``torch.no_grad()``, restoring every submodule's training flag."""
    modules = tuple(m for m in modules if not _exported(m))  # an exported program's module() has no mode
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _exported(module: nn.Module) -> bool:
    unlifted = getattr(getattr(torch.export, "_unlift", None), "_StatefulGraphModule", None)
    return unlifted is not None and isinstance(module, unlifted)


def _flatten(out: Any, path: str = "output") -> Iterator[tuple[str, Any]]:
    if isinstance(out, torch.Tensor) or out is None or isinstance(out, (int, float, bool, str)):
        yield path, out
    elif isinstance(out, Mapping):
        for k in out:
            yield from _flatten(out[k], f"{path}[{k!r}]")
    elif isinstance(out, Sequence):
        for i, v in enumerate(out):
            yield from _flatten(v, f"{path}[{i}]")
    else:
        yield path, out


def assert_outputs_close(expected: Any, actual: Any, rtol: float = 1e-5, atol: float | None = None) -> None:
    """Assert two (nested) outputs match: same structure and shapes, and for every element
    ``|actual - expected| <= atol + rtol * |expected|``, compared in float64.

    ``atol`` defaults to ``rtol`` times the largest magnitude of ``expected`` (over all of its tensors),
    so the tolerance is relative to the output's scale: entries near zero are not held to a relative
    bound a fused model in float32 cannot meet.  Dtypes may differ (e.g. a float16 model against the
    float64 original).
    """
    exp, act = list(_flatten(expected)), list(_flatten(actual))
    if [p for p, _ in exp] != [p for p, _ in act]:
        raise AssertionError(f"outputs differ in structure: {[p for p, _ in exp]} vs {[p for p, _ in act]}")
    tensors = [(p, a, b) for (p, a), (_, b) in zip(exp, act) if isinstance(a, torch.Tensor)]
    for (p, a), (_, b) in zip(exp, act):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            raise AssertionError(f"{p}: expected {type(a).__name__}, got {type(b).__name__}")
        if not isinstance(a, torch.Tensor) and a != b:
            raise AssertionError(f"{p}: expected {a!r}, got {b!r}")
    scale = max((float(a.detach().double().abs().max()) for _, a, _ in tensors if a.numel()), default=0.0)
    tol_abs = rtol * scale if atol is None else atol
    for p, a, b in tensors:
        if a.shape != b.shape:
            raise AssertionError(f"{p}: shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        if not a.numel():
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        fa, fb = torch.isfinite(a64), torch.isfinite(b64)
        if not bool(torch.equal(fa, fb)):
            bad = tuple(int(i) for i in torch.nonzero(fa != fb)[0])
            raise AssertionError(f"{p}: got {float(b64[bad])} at index {bad}, expected {float(a64[bad])}")
        diff = (a64 - b64).abs().nan_to_num(0.0)
        excess = diff - (tol_abs + rtol * a64.abs().nan_to_num(0.0))
        if float(excess.max()) > 0:
            at = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
            raise AssertionError(
                f"{p}: outputs differ: max abs diff {float(diff.max()):.3g} (at index {at}: expected "
                f"{float(a64[at]):.6g}, got {float(b64[at]):.6g}); max diff relative to output scale "
                f"{float(diff.max()) / scale if scale else float('inf'):.3g} (scale {scale:.3g}); "
                f"allowed rtol={rtol:g}, atol={tol_abs:.3g}; shape {tuple(a.shape)}")


def assert_equivalent(model: nn.Module, fused: nn.Module, inputs: Any, rtol: float = 1e-5,
                      atol: float | None = None) -> None:
    """Assert ``fused`` computes what ``model`` computes on ``inputs`` (a tensor or a tuple of them).

    Both run in eval mode under ``torch.no_grad()`` (their training flags are restored afterwards).
    Outputs may be tensors or nested tuples/lists/dicts; see :func:`assert_outputs_close` for the
    tolerance (by default relative to the largest output magnitude).  Inputs are cloned for each model,
    so a model that writes to its input in place cannot hide a difference.
    """
    args = _as_args(inputs)
    with eval_no_grad(model, fused):
        expected = model(*_clone(args))
        actual = fused(*_clone(args))
    assert_outputs_close(expected, actual, rtol=rtol, atol=atol)


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


_CONV_OPS = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "mkldnn_convolution", "_slow_conv2d_forward", "slow_conv3d_forward",
             "slow_conv_dilated2d", "slow_conv_dilated3d", "slow_conv_transpose2d", "slow_conv_transpose3d",
             "thnn_conv2d", "_nnpack_spatial_convolution", "cudnn_convolution", "cudnn_convolution_transpose",
             "miopen_convolution", "convolution_overrideable"}
_LINEAR_OPS = {"addmm", "mm", "linear", "_addmm_activation"}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__  # e.g. "convolution", "add_"
        self.counts[str(func)] += 1
        if name in _CONV_OPS:
            self.counts["conv"] += 1
            transposed = "transpose" in name or (name in ("convolution", "_convolution") and len(args) > 6
                                                 and bool(args[6]))
            if transposed:
                self.counts["conv_transpose"] += 1
        elif "batch_norm" in name and "backward" not in name and "stats" not in name:
            self.counts["batch_norm"] += 1
        elif name in _LINEAR_OPS:
            self.counts["linear"] += 1
        elif name in ("add", "add_") and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            self.counts["add"] += 1
        elif name in ("mul", "mul_") and len(args) >= 2:
            self.counts["mul"] += 1
        elif name in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
            self.counts["avg_pool"] += 1
        return func(*args, **kwargs)


def count_executed_ops(model: nn.Module, inputs: Any) -> Counter[str]:
    """Run ``model`` on ``inputs`` (eval mode, no grad) and count the aten ops that actually execute.

    Besides the raw overload names (``"aten.convolution.default"``...), normalized keys are counted:
    ``"conv"`` (every convolution, transposed included), ``"conv_transpose"``, ``"batch_norm"`` (all
    batch-norm kernels), ``"linear"`` (addmm/mm/linear), ``"add"`` (tensor + tensor, in place or not),
    ``"mul"`` and ``"avg_pool"``.  Counting executed ops rather than modules sees through wrappers,
    functional calls and graph rewrites alike.
    """
    args = _as_args(inputs)
    counter = _OpCounter()
    with eval_no_grad(model), counter:
        model(*args)
    return counter.counts


_BNS = (nn.modules.batchnorm._BatchNorm,)


def randomize_bn_(model: nn.Module, seed: int = 0, *, var_range: tuple[float, float] = (0.25, 2.0)) -> nn.Module:
    """Give every BatchNorm in ``model`` non-trivial statistics and affine parameters, in place.

    Fresh BNs have mean 0, variance 1, weight 1 and bias 0, which hides most folding mistakes (and makes
    a padded 1x1->BN->kxk chain look foldable).  Running means and biases are drawn standard normal
    (times 0.5), variances uniform in ``var_range``, weights uniform in [0.5, 1.5] with random signs.
    Deterministic for a given ``seed``; the global RNG is untouched.  Returns ``model``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    lo, hi = var_range
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _BNS):
                continue
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(_draw(gen, "mean", n, m.running_mean, lo, hi))
            if m.running_var is not None:
                m.running_var.copy_(_draw(gen, "var", n, m.running_var, lo, hi))
            if m.weight is not None:
                m.weight.copy_(_draw(gen, "weight", n, m.weight, lo, hi))
            if m.bias is not None:
                m.bias.copy_(_draw(gen, "bias", n, m.bias, lo, hi))
    return model


def _draw(gen: torch.Generator, kind: str, n: int, like: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    f64 = torch.float64
    if kind == "var":
        v = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=f64)
    elif kind == "weight":
        mag = 0.5 + torch.rand(n, generator=gen, dtype=f64)
        v = mag * torch.where(torch.rand(n, generator=gen, dtype=f64) < 0.25, -1.0, 1.0)
    else:  # mean, bias
        v = torch.randn(n, generator=gen, dtype=f64) * 0.5
    return v.to(dtype=like.dtype, device=like.device)
