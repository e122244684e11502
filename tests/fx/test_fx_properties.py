"""Property tests: random re-parameterizable blocks and networks fuse exactly, and every fusable region
becomes exactly the convs the strategy predicts (counted by executed aten ops, not module attributes)."""

from __future__ import annotations

import pytest
import torch
from fx_helpers import examples, ops
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.testing import JOINS, architectures, assert_equivalent, count_executed_ops, randomize_bn_, rep_blocks
from reparam.testing.architectures import _Idiom

_LINEAR_KEYS = ("conv", "batch_norm", "linear", "add", "mul", "avg_pool")


def _check_counts(model, fused, x, allow_costlier: bool) -> None:
    want = model.expected_ops(allow_costlier)
    got = ops(fused, x)
    if want is not None:
        assert got == want, (f"{model.spec}\nallow_costlier={allow_costlier}: expected {want} executed, got {got}\n"
                             f"{fused.reparam_report}")
    else:  # the cost guard may keep branches apart, but a rewrite never executes more linear ops
        before, after = count_executed_ops(model, x), count_executed_ops(fused, x)
        total_before, total_after = (sum(c[k] for k in _LINEAR_KEYS) for c in (before, after))
        assert total_after <= total_before, (model.spec, before, after)


def _fuse_both_ways(model, x, rtol: float) -> None:
    for allow in (True, False):
        fused = reparam.fuse(model, x, allow_costlier=allow)
        assert_equivalent(model, fused, x, rtol=rtol)
        _check_counts(model, fused, x, allow)


def _block_input(block, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    size = max(block.min_size(), 5 if block.ndim == 3 else 7)
    return block.example_input(size=size, seed=seed, dtype=dtype)  # (a block of pools has no parameters)



BLOCKS = rep_blocks(ndim=st.integers(1, 3), channels=st.integers(1, 5), stride=None, valid=None, cheap=None,
                    padding_mode=None)


@examples(250)
@given(block=BLOCKS)
def test_random_block_float64(block) -> None:
    block.double()
    _fuse_both_ways(block, _block_input(block), rtol=1e-9)


@examples(40)
@given(block=rep_blocks(ndim=2, stride=None, valid=None, cheap=None, padding_mode=None))
def test_random_block_float32(block) -> None:
    x = _block_input(block, dtype=torch.float32)
    fused = reparam.fuse(block, x, allow_costlier=True)
    assert_equivalent(block, fused, x, rtol=1e-4)
    _check_counts(block, fused, x, True)


@examples(40)
@given(block=rep_blocks(ndim=st.integers(1, 3), stride=None, valid=None, allow_refused=False, cheap=True,
                        padding_mode=None))
def test_legal_block_is_one_conv(block) -> None:
    """A block whose every branch is legal becomes exactly one conv with the default options."""
    block.double()
    x = _block_input(block)
    assert block.expected_ops(False) == {"conv": 1, "batch_norm": 0, "linear": 0}
    fused = reparam.fuse(block, x)
    assert_equivalent(block, fused, x, rtol=1e-9)
    assert ops(fused, x) == {"conv": 1, "batch_norm": 0, "linear": 0}, (block.spec, str(fused.reparam_report))


@examples(60)
@given(net=architectures(ndim=st.integers(1, 2), cheap=None, block_options={"padding_mode": None, "joins": JOINS}))
def test_random_architecture_float64(net) -> None:
    net.double()
    _fuse_both_ways(net, net.example_input(), rtol=1e-9)


@examples(15)
@given(net=architectures(ndim=st.integers(1, 2), cheap=None, residual_into_linear=True,
                                 block_options={"joins": JOINS}))
def test_random_architecture_residual_into_linear(net) -> None:
    """Residual sums feeding the next block directly: exact, never more linear ops (counts are the planner's)."""
    net.double()
    _fuse_both_ways(net, net.example_input(), rtol=1e-9)


@examples(15)
@given(net=architectures(ndim=2, cheap=None, block_options={"joins": JOINS}))
def test_random_architecture_float32(net) -> None:
    x = net.example_input()
    fused = reparam.fuse(net, x, allow_costlier=True)
    assert_equivalent(net, fused, x, rtol=1e-4)
    _check_counts(net, fused, x, True)


@st.composite
def stacked_blocks(draw) -> tuple[nn.Module, torch.Tensor]:
    """Two random blocks with nothing between them: the second reads the first's sum directly."""
    nd = draw(st.integers(1, 2))
    b1 = draw(rep_blocks(st.integers(1, 4), nd, out_channels=st.integers(1, 4), stride=None, valid=None,
                         padding_mode=None, joins=JOINS))
    b2 = draw(rep_blocks(b1.out_channels, nd, stride=None, valid=None, padding_mode=None, joins=JOINS))
    size = max(b1.min_size(), 2 * b2.min_size() + 3, 7)
    model = nn.Sequential(b1, b2).double()
    model.spec = f"{b1.spec} -> {b2.spec}"
    return model, b1.example_input(size=size, dtype=torch.float64)


def _check_stacked(model: nn.Module, x: torch.Tensor) -> None:
    for allow in (True, False):
        fused = reparam.fuse(model, x, allow_costlier=allow)
        assert_equivalent(model, fused, x, rtol=1e-9)
        before, after = count_executed_ops(model, x), count_executed_ops(fused, x)
        assert sum(after[k] for k in _LINEAR_KEYS) <= sum(before[k] for k in _LINEAR_KEYS), model.spec


@examples(80)
@given(case=stacked_blocks())
def test_stacked_blocks_without_activation(case) -> None:
    """Composition across blocks: whatever the planner merges or refuses, the result is exact."""
    _check_stacked(*case)


@pytest.mark.slow
@examples(1500)
@given(block=BLOCKS)
def test_random_block_float64_sweep(block) -> None:
    block.double()
    _fuse_both_ways(block, _block_input(block), rtol=1e-9)


@pytest.mark.slow
@examples(400)
@given(net=architectures(ndim=st.integers(1, 3), cheap=None, max_stages=5,
                                 block_options={"padding_mode": None, "joins": JOINS}))
def test_random_architecture_sweep(net) -> None:
    net.double()
    _fuse_both_ways(net, net.example_input(), rtol=1e-9)


@pytest.mark.slow
@examples(600)
@given(case=stacked_blocks())
def test_stacked_blocks_sweep(case) -> None:
    _check_stacked(*case)


@pytest.mark.parametrize("nd", [1, 2])
def test_a_one_channel_pooled_shortcut_does_not_keep_the_bn_beside_it(nd) -> None:
    """Regression (found by test_random_architecture_float64): with one channel, a guarded re-plan let the
    pool compose into the shortcut's 1x1 conv (its step counted the pool's window as stored weights), so the
    region stayed blocked by its own weight test and the BN before the other 1x1 conv was left unfused."""
    torch.manual_seed(0)
    idiom = _Idiom("tokens", nd, 1, "gelu").double().eval()
    randomize_bn_(idiom, 0)
    x = torch.randn((2, 1) + (6,) * nd, dtype=torch.float64)
    fused = reparam.fuse(idiom, x)
    assert_equivalent(idiom, fused, x, rtol=1e-9)
    assert ops(fused, x) == idiom.expected(False) == {"conv": 2, "batch_norm": 0, "linear": 1}
