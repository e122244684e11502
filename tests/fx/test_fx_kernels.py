"""How ``reparam.fuse`` builds the fused layers: kernels written straight into new tensors in the model's
dtype (a large one split among torch's threads, with the same result), modules built without their random
initialisation."""

from __future__ import annotations

import pytest
import torch
from fx_helpers import ACNet, C, RepVGG, conv_bn, ops, refusals, x_of
from torch import nn

import reparam
from reparam.core import kernel_sum
from reparam.measure import torch_threads
from reparam.testing import assert_equivalent, randomize_bn_
from reparam.torch_ops import blank_module


@pytest.fixture
def split_every_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split kernels of any size among threads (normally only large ones are)."""
    monkeypatch.setattr(kernel_sum, "_THREADED", 1)


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(RepVGG(), ACNet(), RepVGG(), conv_bn(C, C, 3), RepVGG())
    randomize_bn_(model, 0)
    return model.eval().to(dtype)


def _overflowing_half_model() -> nn.Module:
    """A float16 model whose middle block folds to weights beyond float16's range."""
    model = _model(torch.float16)
    with torch.no_grad():
        bn = model[2].dense[1]
        bn.running_var.fill_(1e-3)
        bn.weight.fill_(3e4)  # a BN scale of ~1e6 on weights of order 1: far beyond float16's 65504
    return model


@pytest.mark.usefixtures("split_every_kernel")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_fused_model_on_any_number_of_threads(threads: int) -> None:
    model = _model()
    x = x_of(2, C, 8, 8)
    with torch_threads(1):
        one = reparam.fuse(model)
    with torch_threads(threads):
        many = reparam.fuse(model)
    a, b = one.state_dict(), many.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert_equivalent(model, many, x, rtol=1e-5)
    assert ops(many, x) == {"conv": 5, "batch_norm": 0, "linear": 0}


@pytest.mark.usefixtures("split_every_kernel")
@pytest.mark.parametrize("threads", [1, 2])
def test_a_kernel_that_overflows_its_dtype_is_refused_alone(threads: int) -> None:
    model = _overflowing_half_model()
    x = x_of(2, C, 8, 8, dtype=torch.float16)
    with torch_threads(threads):
        fused, rep = reparam.fuse(model, report=True)
    assert "overflows float16" in refusals(rep), rep
    assert ops(fused, x) == {"conv": 4 + 2, "batch_norm": 3, "linear": 0}, rep  # block 2 kept as it was
    with torch.no_grad():  # the model itself overflows in that block: the same values come out, infinities too
        torch.testing.assert_close(fused(x), model(x), rtol=2e-2, atol=2e-2, equal_nan=True)


def test_a_large_block_on_two_threads() -> None:
    """A 704-channel RepVGG block: its 4.5M-element kernel is split between two threads at the default size."""
    torch.manual_seed(0)
    model = RepVGG(704).eval()
    randomize_bn_(model, 0)
    assert model.dense[0].weight.numel() >= kernel_sum._THREADED
    x = x_of(1, 704, 3, 3)
    with torch_threads(1):
        one = reparam.fuse(model)
    with torch_threads(2):
        two = reparam.fuse(model)
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.equal(a, b), name
    assert_equivalent(model, two, x, rtol=1e-5)


def test_fused_parameters_are_new_contiguous_tensors() -> None:
    model = _model()
    fused = reparam.fuse(model)
    inputs = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in model.parameters()]
    for name, p in fused.named_parameters():
        assert p.is_contiguous() and p.dtype == torch.float32, name
        start = p.data_ptr()
        assert not any(lo <= start < hi for lo, hi in inputs), f"{name} shares memory with the input model"


@pytest.mark.parametrize("cls, args, kwargs", [
    (nn.Conv2d, (4, 6, (3, 1)), {"stride": 2, "padding": (1, 0), "groups": 2, "bias": True}),
    (nn.Conv1d, (3, 3, 5), {"dilation": 2, "padding_mode": "reflect", "padding": 4, "bias": False}),
    (nn.Conv3d, (2, 4, 1), {}),
    (nn.Linear, (5, 7), {"bias": True}),
])
def test_blank_modules_are_the_constructed_module_without_its_initialisation(cls, args, kwargs) -> None:
    made = cls(*args, **kwargs)
    a, b = blank_module(cls, *args, **kwargs), blank_module(cls, *args, **kwargs)
    assert type(a) is cls and vars(a).keys() == vars(made).keys()
    for key, value in vars(made).items():
        if key in ("_parameters",):
            continue
        assert type(vars(a)[key]) is type(value) and vars(a)[key] == value, key
    assert {k: v is None for k, v in vars(a)["_parameters"].items()} == \
        {k: v is None for k, v in vars(made)["_parameters"].items()}
    assert all(p.is_meta for p in a.parameters())
    # no container is shared between two blank modules (or with the cached template)
    for key, value in vars(a).items():
        if isinstance(value, (dict, set, list)):
            assert value is not vars(b)[key], key
    a.register_forward_hook(lambda *_: None)
    a.weight = nn.Parameter(torch.ones_like(made.weight))
    assert not b._forward_hooks and b.weight.is_meta
    assert repr(a) == repr(made)
