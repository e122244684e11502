"""Fallbacks (untraceable models and leaves), dtypes, parametrized and hooked weights, the cost guard and
the report's content."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fx_helpers import ACNet, C, RepVGG, conv_bn, fuse_checked, ops, refusals, skips, x_of
from torch import nn

import reparam
from reparam.testing import assert_equivalent, assert_outputs_close, randomize_bn_


def _x() -> torch.Tensor:
    return x_of(2, C, 6, 6)


# ------------------------------------------------------------------------------------------ fallbacks


class DataDependent(nn.Module):
    """Top-level control flow on a tensor value: not traceable as a whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = RepVGG(), RepVGG()
        self.head = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) if x.sum() > 0 else self.b(x)
        return self.head(y)


class Untraceable(nn.Module):
    """A leaf-level module with data-dependent control flow and no submodules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.mean() > 0 else x - 1


class WithUntraceableLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = RepVGG()
        self.odd = Untraceable()
        self.b = RepVGG()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.odd(self.a(x)))


@pytest.mark.parametrize("example", [False, True])
def test_data_dependent_top_level_fuses_submodules(example: bool) -> None:
    torch.manual_seed(0)
    model = DataDependent()
    x = _x()
    fused, rep = fuse_checked(model, x, example=example)
    assert "DataDependent" in skips(rep) and "cannot be traced" in skips(rep), rep
    assert {r.where.split(".")[0] for r in rep.regions} == {"a", "b", "head"}, rep
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}
    assert_equivalent(model, fused, -x)  # the other side of the `if`
    assert isinstance(fused, DataDependent)


def test_untraceable_leaf_skipped_with_reason() -> None:
    torch.manual_seed(0)
    model = WithUntraceableLeaf()
    x = _x()
    fused, rep = fuse_checked(model, x)
    assert "odd" in skips(rep) and "called whole" in skips(rep), rep  # the rest of the model is one graph
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}
    assert_equivalent(model, fused, -x)


# ------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_fold_in_float64(dtype: torch.dtype) -> None:
    """Folding happens in float64: the fused half model is at least as close to the float64 original as the
    unfused half model is."""
    torch.manual_seed(0)
    model = nn.Sequential(RepVGG(), ACNet(), conv_bn(C, C, 3))
    randomize_bn_(model, 0)
    model.eval()
    ref_model = copy.deepcopy(model).double()
    half = model.to(dtype)
    fused = reparam.fuse(half, _x().to(dtype))
    assert {p.dtype for p in fused.parameters()} == {dtype}
    x = _x()
    with torch.no_grad():
        ref = ref_model(x.double())
        out, unfused = fused(x.to(dtype)), half(x.to(dtype))
    assert out.dtype == dtype
    err_fused = float((out.double() - ref).abs().max())
    err_unfused = float((unfused.double() - ref).abs().max())
    assert err_fused <= 1.5 * err_unfused + 1e-6, (err_fused, err_unfused)
    assert_outputs_close(ref, out, rtol=3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_float64_model_stays_float64() -> None:
    torch.manual_seed(0)
    model = RepVGG().double()
    x = _x().double()
    fused, _ = fuse_checked(model, x, rtol=1e-12)
    assert {p.dtype for p in fused.parameters()} == {torch.float64}


# ------------------------------------------------------------------------------------------ weights


class ThreeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(C, C, 3, padding=1)
        self.b3 = nn.BatchNorm2d(C)
        self.c1 = nn.Conv2d(C, C, 1)
        self.b1 = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b3(self.c3(x)) + self.b1(self.c1(x)) + x)


@pytest.mark.parametrize("how", ["weight_norm", "orthogonal", "spectral_norm"])
def test_parametrized_weights_read_as_computed(how: str) -> None:
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    model = ThreeBranch()
    wrap = {"weight_norm": P.weight_norm, "orthogonal": P.orthogonal, "spectral_norm": P.spectral_norm}[how]
    model.c3 = wrap(model.c3)
    model.c1 = wrap(model.c1)
    x = _x()
    fused, rep = fuse_checked(model, x)
    assert ops(fused, x) == {"conv": 1, "batch_norm": 0, "linear": 0}, rep
    assert not any(hasattr(m, "parametrizations") for m in fused.modules())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_old_style_weight_norm_refused_inplace() -> None:
    torch.manual_seed(0)
    model = ThreeBranch()
    model.c3 = torch.nn.utils.weight_norm(model.c3)
    x = _x()
    reference = ThreeBranch()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("c3.")}, strict=False)
    randomize_bn_(model, 0)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fused, rep = reparam.fuse(model, x, inplace=True, report=True)
    assert "c3" in refusals(rep) and "hooks" in refusals(rep), rep
    with torch.no_grad():
        assert_outputs_close(expected, fused(x), rtol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_old_style_weight_norm_refused() -> None:
    torch.manual_seed(0)
    model = ThreeBranch()
    model.c3 = torch.nn.utils.weight_norm(model.c3)
    x = _x()
    fused, rep = fuse_checked(model, x)
    assert "c3" in refusals(rep) and "hooks" in refusals(rep), rep
    # b3 cannot fold into the hooked conv, and turning it into a conv of its own would add one
    assert ops(fused, x) == {"conv": 2, "batch_norm": 1, "linear": 0}
    (left,) = rep.bn_left
    assert left.where == "b3" and "hooks" in left.reason, rep


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_old_style_weight_norm_alone_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(C, C, 3, padding=1)), nn.BatchNorm2d(C))
    _, rep = fuse_checked(model, _x(), example=False)  # (with example inputs, shape propagation happens to
    assert "hooks" in refusals(rep), rep                # recompute the weight under no_grad, as a leaf)


# ------------------------------------------------------------------------------------------ cost guard


class Bottleneck(nn.Module):
    """MobileNetV2-like: a 1x1 projection to few channels, then a 1x1 expansion (no activation between)."""

    def __init__(self, wide: int = 16, narrow: int = 4) -> None:
        super().__init__()
        self.project = conv_bn(wide, narrow, 1)
        self.expand = conv_bn(narrow, wide, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.expand(self.project(x)))


def test_cost_guard_refuses_costlier_composition() -> None:
    torch.manual_seed(0)
    x = x_of(2, 16, 5, 5)
    model = Bottleneck()
    fused, rep = fuse_checked(model, x)
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}
    assert "allow_costlier=True" in refusals(rep) and "MACs" in refusals(rep), rep
    fused2, rep2 = fuse_checked(model, x, allow_costlier=True)
    assert ops(fused2, x) == {"conv": 1, "batch_norm": 0, "linear": 0}
    assert not rep2.refused
    assert rep2.params_after > rep.params_after  # 16x16 > 16x4 + 4x16


class ResidualThenConvBN(nn.Module):
    """``bn(conv1x1(relu(conv(x)) + x))``: the conv+BN after the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(C, C, 3, padding=1)
        self.c = nn.Conv2d(C, C, 1, bias=False)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(F.relu(self.c0(x)) + x))


def test_residual_then_conv_bn_default() -> None:
    torch.manual_seed(0)
    x = _x()
    fused, rep = fuse_checked(ResidualThenConvBN(), x)
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}, rep


def test_residual_then_conv_bn_allow_costlier() -> None:
    torch.manual_seed(0)
    x = _x()
    fused, rep = fuse_checked(ResidualThenConvBN(), x, allow_costlier=True)
    assert ops(fused, x)["batch_norm"] == 0, rep


class PostResidualIntoBlock(nn.Module):
    """``y = relu(conv_bn(x)) + x`` read only by the branches of the next block: ``bn(y) + conv1x1(y)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = conv_bn(C, C, 3)
        self.bn = nn.BatchNorm2d(C)
        self.one = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        y = F.relu(self.c0(x)) + x
        return self.bn(y) + self.one(y)


@pytest.mark.parametrize("allow", [False, True])
def test_block_after_post_residual_is_one_conv(allow: bool) -> None:
    torch.manual_seed(0)
    x = _x()
    fused, rep = fuse_checked(PostResidualIntoBlock(), x, allow_costlier=allow)
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}, rep


class ACNetReordered(ACNet):
    """ACNet with the branches summed in another order: (hor + ver) + square."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hor(x) + self.ver(x) + self.square(x)


def test_cost_guard_is_order_independent() -> None:
    torch.manual_seed(0)
    x = _x()
    fused, rep = fuse_checked(ACNetReordered(), x)
    assert ops(fused, x)["conv"] == 1, rep


# ------------------------------------------------------------------------------------------ the report


def test_report_content() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(RepVGG(), nn.Conv2d(C, C, 1), nn.BatchNorm2d(C, track_running_stats=False))
    x = _x()
    fused, rep = fuse_checked(model, x)
    assert fused.reparam_report is rep
    (region,) = rep.regions
    assert region.where and region.convs_before == 2 and region.convs_after == 1
    assert sum("BatchNorm2d" in op for op in region.ops) == 3 and sum("Conv2d" in op for op in region.ops) == 2
    assert rep.convs_before == 2 and rep.convs_after == 1
    assert rep.params_before == sum(p.numel() for p in model.parameters())
    assert rep.params_after == sum(p.numel() for p in fused.parameters())
    assert rep.params_after == (C * C * 9 + C) + (C * C + C) + 2 * C
    assert "track_running_stats=False" in refusals(rep)
    text = str(rep)
    assert "1 region collapsed" in text and "1 left" in text and "batch_norm 4 -> 1" in text
    assert f"{rep.params_before:,}" in text and f"{rep.params_after:,}" in text
    fused2 = reparam.fuse(model, x)
    assert str(fused2.reparam_report) == text  # deterministic


def test_report_lists_each_refusal_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.AvgPool2d(3, 1, 1, count_include_pad=False))
    _, rep = fuse_checked(model, _x())
    assert len(rep.refused) == len(set(rep.refused)), rep


class ScaledInput(nn.Module):
    """A learned per-channel scale on the input, then conv+BN: its rank is known only from example inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, C, 1, 1) + 0.5)
        self.body = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * self.scale)


def test_per_channel_constant_of_unknown_rank_says_why() -> None:
    torch.manual_seed(0)
    model = ScaledInput()
    x = _x()
    fused, rep = fuse_checked(model, x, example=False)
    assert "give example_inputs" in refusals(rep), rep
    assert [r.ops[0] for r in rep.regions] == ["Conv2d(body.0)"]
    fused, rep = fuse_checked(model, x)  # with shapes the scale folds into the conv's input channels
    assert not rep.refused and rep.regions[0].ops[0] == "mul", rep
    assert ops(fused, x) == {"conv": 1, "batch_norm": 0, "linear": 0}
