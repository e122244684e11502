"""The public torch-side test helpers (``reparam.testing``), and the docs' examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fx_helpers import RepVGG, examples, x_of
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam.testing as rt
from reparam.testing import (
    BRANCH_KINDS,
    RepBlock,
    RepNet,
    architectures,
    assert_equivalent,
    assert_outputs_close,
    count_executed_ops,
    randomize_bn_,
    rep_blocks,
    tensors,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_import_is_lazy() -> None:
    code = ("import sys, reparam.testing as t; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'hypothesis')]; "
            "assert callable(t.assert_equivalent)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exports() -> None:
    for name in ("assert_equivalent", "assert_outputs_close", "count_executed_ops", "randomize_bn_", "rep_blocks",
                 "architectures", "tensors", "RepBlock", "RepNet", "strategies", "reference", "conv_nd"):
        assert name in rt.__all__ and getattr(rt, name) is not None, name
    import reparam.testing.architectures as module

    assert rt.architectures is module and callable(module)  # the module doubles as the strategy
    assert repr(module.architectures(ndim=2)) == repr(architectures(ndim=2))


# ------------------------------------------------------------------------------------------ assertions


class Scaled(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor):
        return {"a": x * self.factor, "b": (x.sum(), [x[:1] * self.factor])}


def test_assert_equivalent_passes_and_fails_with_details() -> None:
    x = x_of(2, 3)
    assert_equivalent(Scaled(1.0), Scaled(1.0 + 1e-7), x)
    with pytest.raises(AssertionError) as err:
        assert_equivalent(Scaled(1.0), Scaled(1.01), x)
    msg = str(err.value)
    assert "output['a']" in msg and "max abs diff" in msg and "at index" in msg and "relative" in msg
    assert_equivalent(Scaled(1.0), Scaled(1.01), x, rtol=0.02)


def test_assert_equivalent_tolerance_is_relative_to_output_scale() -> None:
    expected = torch.tensor([1000.0, 1e-3])
    assert_outputs_close(expected, expected + torch.tensor([0.0, 1e-3]), rtol=1e-5)  # 1e-3 << 1e-5 * 1000
    with pytest.raises(AssertionError):
        assert_outputs_close(expected, expected + torch.tensor([0.0, 1e-3]), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("actual, fragment", [
    (torch.zeros(2, 4), "shape"),
    ((torch.zeros(2, 3),), "structure"),
    (torch.tensor([[0.0, float("nan"), 0.0]] * 2), "got nan"),
])
def test_assert_outputs_close_mismatches(actual, fragment: str) -> None:
    with pytest.raises(AssertionError, match=fragment):
        assert_outputs_close(torch.zeros(2, 3), actual)


def test_assert_equivalent_restores_flags_and_clones_inputs() -> None:
    class Mutating(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return x

    model = nn.Sequential(nn.BatchNorm1d(3)).train()
    x = x_of(4, 3)
    before = x.clone()
    assert_equivalent(model, model, x)
    assert model.training and model[0].training
    assert_equivalent(Mutating(), Mutating(), x)
    assert torch.equal(x, before)


def test_count_executed_ops() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.up = nn.ConvTranspose2d(4, 4, 2, 2)
            self.pool = nn.AvgPool2d(2)
            self.fc = nn.Linear(4, 2)
            self.bn1 = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            y = self.pool(self.up(y + y)) * 2.0
            y = torch.nn.functional.batch_norm(y, self.bn.running_mean, self.bn.running_var)
            return self.bn1(self.fc(y.mean((2, 3))))

    model = Net().train()
    counts = count_executed_ops(model, x_of(2, 3, 4, 4))
    assert counts["conv"] == 2 and counts["conv_transpose"] == 1
    assert counts["batch_norm"] == 3 and counts["linear"] == 1
    assert counts["add"] == 1 and counts["mul"] == 1 and counts["avg_pool"] == 1
    assert counts["aten.convolution.default"] == 2
    assert model.training, "flags are restored"


def test_randomize_bn() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(5), nn.BatchNorm1d(3, affine=False), nn.BatchNorm2d(2).half())

    a, b, c = randomize_bn_(make(), 3), randomize_bn_(make(), 3), randomize_bn_(make(), 4)
    for ka, va in a.state_dict().items():
        assert torch.equal(va, b.state_dict()[ka]), ka
    assert not torch.equal(a[0].running_mean, c[0].running_mean)
    assert (a[0].running_var > 0).all() and not torch.allclose(a[0].running_var, torch.ones(5))
    assert not torch.allclose(a[0].weight, torch.ones(5)) and not torch.allclose(a[0].bias, torch.zeros(5))
    assert a[2].running_mean.dtype == torch.float16
    state = torch.random.get_rng_state()
    randomize_bn_(make(), 5)
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG is untouched"


@examples(5)
@given(x=tensors(st.tuples(st.integers(1, 3), st.integers(1, 4)), dtype=torch.float64, scale=3.0))
def test_tensors_strategy(x: torch.Tensor) -> None:
    assert x.dtype == torch.float64 and x.dim() == 2 and 1 <= x.shape[0] <= 3


# ------------------------------------------------------------------------------------------ strategies


@examples(15)
@given(block=rep_blocks(channels=st.integers(1, 4), ndim=st.integers(1, 3), stride=2, out_channels=3))
def test_rep_blocks_respect_shape_options(block: RepBlock) -> None:
    assert block.stride == (2,) * block.ndim and block.out_channels == 3
    def branch_types(b: RepBlock) -> set[str]:
        out = set()
        for br in b.branches:
            out |= branch_types(br) if isinstance(br, RepBlock) else {type(br).__name__}
        return out

    forbidden = {"_Identity", "_Scale", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"}  # they keep stride 1
    if block.in_channels != 3:
        forbidden |= {"AvgPool1d", "AvgPool2d", "AvgPool3d"}  # it keeps the channel count
    assert not branch_types(block) & forbidden, block.spec
    x = block.example_input(size=max(block.min_size(), 4))
    with torch.no_grad():
        y = block(x)
    assert y.shape[:2] == (x.shape[0], 3)
    assert y.shape[2:] == block.output_size(tuple(x.shape[2:]))


@examples(10)
@given(block=rep_blocks(kinds=("conv_bn", "bn", "identity"), allow_refused=False))
def test_rep_blocks_kinds_and_legal(block: RepBlock) -> None:
    assert block.expected_ops(True) == {"conv": 1, "batch_norm": 0, "linear": 0}
    assert "chain" not in block.spec and "scale" not in block.spec


@examples(5)
@given(net=architectures(ndim=1, head=True, cheap=True))
def test_architectures_shape(net: RepNet) -> None:
    x = net.example_input(batch=3)
    with torch.no_grad():
        assert net(x).shape[0] == 3 and net(x).dim() == 2
    linears = sum(isinstance(m, nn.Linear) for m in net.modules())  # the head's two, an idiom's own: each runs once
    assert net.expected_ops(False) is not None and net.expected_ops(False)["linear"] == linears >= 2


def test_kinds_are_documented() -> None:
    text = (DOCS / "testing.md").read_text()
    assert set(BRANCH_KINDS) <= {"conv", "conv_bn", "bn", "identity", "scale", "avgpool", "chain", "act", "nested"}
    assert "rep_blocks" in text and "architectures" in text


# ------------------------------------------------------------------------------------------ docs


def test_repvgg_helper_is_a_real_block() -> None:
    """Sanity check of the helper block the other tests use: it really has three branches."""
    model = randomize_bn_(RepVGG(), 0).eval()
    assert count_executed_ops(model, x_of(1, 4, 5, 5))["conv"] == 2
