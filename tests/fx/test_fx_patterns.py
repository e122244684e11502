"""Every re-parameterization pattern, written out as a plain nn.Module: fused exactly (float64), and the
executed conv / batch-norm / linear counts are what the pattern must collapse to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fx_helpers import ACNet, RepVGG, conv_bn, fuse_checked, ops, refusals, x_of
from torch import nn

from reparam.testing import count_executed_ops, randomize_bn_

C = 4


def counts(conv: int = 0, batch_norm: int = 0, linear: int = 0) -> dict[str, int]:
    return {"conv": conv, "batch_norm": batch_norm, "linear": linear}


# --------------------------------------------------------------------------------------------- layers


class BNAct(nn.BatchNorm2d):
    """A 'BatchNormAct' layer: a BN subclass whose forward applies an activation after F.batch_norm."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or not self.track_running_stats, self.momentum or 0.0, self.eps)
        return self.act(x)


class BNActSuper(nn.BatchNorm2d):
    """BN subclass calling super().forward, then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(super().forward(x))


class PlainBNSub(nn.BatchNorm2d):
    """A BN subclass that only adds attributes (forward is BatchNorm2d's)."""

    tag = "mine"


class DBB(nn.Module):
    """Diverse Branch Block without its custom BNAndPad: the 1x1->BN->padded kxk and 1x1->BN->padded avg
    branches cannot fold into the sum (the padded border would not see the BN shift)."""

    def __init__(self, c: int = C, inner_bn: bool = True) -> None:
        super().__init__()
        self.origin = conv_bn(c, c, 3)
        self.one = conv_bn(c, c, 1)
        self.avg = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), *([nn.BatchNorm2d(c)] if inner_bn else []),
                                 nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(c))
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), *([nn.BatchNorm2d(c)] if inner_bn else []),
                                 nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.origin(x) + self.one(x) + self.avg(x) + self.kxk(x))


class MobileOne(nn.Module):
    """MobileOne: k over-parameterized depthwise kxk+BN branches, a depthwise 1x1+BN 'scale' branch and a BN
    skip, ReLU, then k pointwise 1x1+BN branches plus a BN skip, ReLU."""

    def __init__(self, c: int = C, k: int = 3) -> None:
        super().__init__()
        self.dw = nn.ModuleList(conv_bn(c, c, 3, groups=c) for _ in range(k))
        self.dw_scale = conv_bn(c, c, 1, groups=c)
        self.dw_skip = nn.BatchNorm2d(c)
        self.pw = nn.ModuleList(conv_bn(c, c, 1) for _ in range(k))
        self.pw_skip = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw_skip(x) + self.dw_scale(x)
        for b in self.dw:
            y = y + b(x)
        y = F.relu(y)
        z = self.pw_skip(y)
        for b in self.pw:
            z = z + b(y)
        return F.relu(z)


class Branches(nn.Module):
    """conv3x3+BN plus one extra branch, joined in one of several styles."""

    def __init__(self, extra: str = "conv1x1", join: str = "plus", c: int = C) -> None:
        super().__init__()
        self.main = conv_bn(c, c, 3)
        self.join = join
        self.extra = extra
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.bn = nn.BatchNorm2d(c)
        self.one = conv_bn(c, c, 1)
        self.pool = nn.AvgPool2d(3, 1, 1)

    def other(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra == "conv1x1":
            return self.one(x)
        if self.extra == "bn":
            return self.bn(x)
        if self.extra == "identity":
            return x
        if self.extra == "scale":
            return x * self.scale
        if self.extra == "avgpool":
            return self.pool(x)
        raise ValueError(self.extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.main(x), self.other(x)
        if self.join == "plus":
            return a + b
        if self.join == "torch_add":
            return torch.add(a, b)
        if self.join == "iadd":
            a += b
            return a
        if self.join == "sum":
            return sum([a, b, self.one(x)])
        if self.join == "method":
            return a.add(b)
        if self.join == "chain":
            return ((a + b) + self.one(x)) + self.bn(x)
        raise ValueError(self.join)


class Chain(nn.Module):
    """1x1 -> BN -> kxk (a DBB/RepMLP-style sequential branch), optionally summed with a kxk conv+BN."""

    def __init__(self, padding: int, parallel: bool, c: int = C) -> None:
        super().__init__()
        self.one = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.k = nn.Conv2d(c, c, 3, padding=padding)
        self.par = conv_bn(c, c, 3, padding=padding) if parallel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.k(self.bn(self.one(x)))
        return y + self.par(x) if self.par is not None else y


class FunctionalBN(nn.Module):
    """F.conv2d (or a ConvTranspose2d module) and F.batch_norm on the module's own parameters and buffers."""

    def __init__(self, c: int = C, transpose: bool = False, batch_stats: bool = False) -> None:
        super().__init__()
        self.batch_stats = batch_stats
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3) * 0.3)
        self.up = nn.ConvTranspose2d(c, c, 2, 2) if transpose else None
        self.register_buffer("mean", torch.randn(c))
        self.register_buffer("var", torch.rand(c) + 0.5)
        self.gamma = nn.Parameter(torch.randn(c))
        self.beta = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x) if self.up is not None else F.conv2d(x, self.weight, None, 1, 1)
        return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, self.batch_stats, 0.0, 1e-3)


class ActInBranch(nn.Module):
    """A ReLU inside one branch: that branch's conv+BN folds on its own, the sum keeps it apart."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.a = conv_bn(c, c, 3)
        self.b = conv_bn(c, c, 3)
        self.c = conv_bn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + F.relu(self.b(x)) + self.c(x)


class Nested(nn.Module):
    """A RepVGG-like sum nested inside another sum, with a 1x1 and an identity at the outer level."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.inner_a = conv_bn(c, c, 3)
        self.inner_b = conv_bn(c, c, (1, 3))
        self.inner_bn = nn.BatchNorm2d(c)
        self.outer = conv_bn(c, c, 1)
        self.post = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.post(self.inner_a(x) + self.inner_b(x) + self.inner_bn(x))
        return F.relu(inner + self.outer(x) + x)


class Repeated(nn.Module):
    """The same block type applied twice, with and without an activation between."""

    def __init__(self, act: bool, c: int = C) -> None:
        super().__init__()
        self.b1, self.b2 = ACNet(c), ACNet(c)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b1(x)
        return self.b2(F.relu(y) if self.act else y)


class Dilated(nn.Module):
    """A 3x3 at dilation 2 plus a 3x3 at dilation 1 (a 5x5 with holes) and a 1x1."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.d2 = conv_bn(c, c, 3, dilation=2)
        self.d1 = conv_bn(c, c, 3)
        self.one = conv_bn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d2(x) + self.d1(x) + self.one(x)


class Grouped(nn.Module):
    """Grouped 3x3 (groups 2) + grouped 1x1 (groups 4, expanded block-diagonally) + BN skip."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.g2 = conv_bn(c, c, 3, groups=2)
        self.g4 = conv_bn(c, c, 1, groups=4)
        self.skip = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g2(x) + self.g4(x) + self.skip(x)


class Strided(nn.Module):
    """Stride-2 branches: 3x3+BN, 1x1+BN, and a 3x3 average pool that counts its padding."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.a = conv_bn(c, c, 3, stride=2)
        self.b = conv_bn(c, c, 1, stride=2)
        self.p = nn.AvgPool2d(3, 2, 1, count_include_pad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.p(x)


class SamePadding(nn.Module):
    """Even kernels with padding='same' pad asymmetrically; the fused conv pads explicitly."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 4, padding="same", bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 2, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x) + x


class PadThenConv(nn.Module):
    """An explicit F.pad before an unpadded conv+BN, plus a skip."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.cb = conv_bn(c, c, 3, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cb(F.pad(x, (1, 1, 1, 1))) + x


class Reflect(nn.Module):
    """Reflect-padded 3x3+BN summed with a 1x1 (which reads no padding) and a skip."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.b = conv_bn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x) + x


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.fc(x))))


# --------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    expected: dict[str, int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # a fragment the report's refusals must contain (None: no refusal at all)
    check_refusals: bool = True


CASES: dict[str, Case] = {
    "conv1d+bn": Case(lambda: conv_bn(C, 6, 3, nd=1, bias=True), (2, C, 9), counts(1)),
    "conv2d+bn": Case(lambda: conv_bn(C, 6, 3), (2, C, 7, 7), counts(1)),
    "conv3d+bn": Case(lambda: conv_bn(C, 6, 3, nd=3), (2, C, 5, 5, 5), counts(1)),
    "conv_transpose1d+bn": Case(lambda: nn.Sequential(nn.ConvTranspose1d(C, 6, 4, 2, 1), nn.BatchNorm1d(6)),
                                (2, C, 5), counts(1)),
    "conv_transpose2d+bn": Case(lambda: nn.Sequential(nn.ConvTranspose2d(C, 6, 3, 2, 1, output_padding=1,
                                                                         groups=2), nn.BatchNorm2d(6)),
                                (2, C, 5, 5), counts(1)),
    "conv_transpose3d+bn": Case(lambda: nn.Sequential(nn.ConvTranspose3d(C, 2, 2, 2, bias=False),
                                                      nn.BatchNorm3d(2)), (2, C, 3, 3, 3), counts(1)),
    "conv_transpose2d+bn_act": Case(lambda: nn.Sequential(nn.ConvTranspose2d(C, 6, 2, 2), BNAct(6)),
                                    (2, C, 4, 4), counts(1)),
    "conv_transpose2d+functional_bn": Case(lambda: FunctionalBN(transpose=True), (2, C, 4, 4), counts(1)),
    "conv_transpose2d+batch_stats_bn": Case(lambda: FunctionalBN(transpose=True, batch_stats=True), (2, C, 4, 4),
                                            counts(1, batch_norm=1), refused="training=True"),
    "linear+bn1d": Case(LinearBN, (5, 6), counts(linear=2)),
    "bn_subclass_plain": Case(lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1), PlainBNSub(C)),
                              (2, C, 6, 6), counts(1)),
    "bn_subclass_act": Case(lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1), BNAct(C)), (2, C, 6, 6),
                            counts(1)),
    "bn_subclass_super_act": Case(lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1), BNActSuper(C)),
                                  (2, C, 6, 6), counts(1)),
    "functional_bn": Case(FunctionalBN, (2, C, 6, 6), counts(1)),
    "repvgg": Case(RepVGG, (2, C, 6, 6), counts(1)),
    "repvgg_stride2": Case(lambda: RepVGG(stride=2), (2, C, 7, 7), counts(1)),
    "acnet": Case(ACNet, (2, C, 6, 6), counts(1)),
    # the avg branch's BN after its padded pool folds nowhere without a conv of its own: it stays
    "dbb": Case(DBB, (2, C, 6, 6), counts(4, batch_norm=1), refused="padded border"),
    "dbb_without_inner_bn": Case(lambda: DBB(inner_bn=False), (2, C, 6, 6), counts(1)),
    "mobileone": Case(MobileOne, (2, C, 6, 6), counts(2)),
    "chain_padded_refused": Case(lambda: Chain(1, parallel=False), (2, C, 6, 6), counts(2),
                                 refused="padded border"),
    "chain_padded_in_block": Case(lambda: Chain(1, parallel=True), (2, C, 6, 6), counts(3),
                                  refused="padded border"),
    "chain_unpadded": Case(lambda: Chain(0, parallel=False), (2, C, 6, 6), counts(1)),
    "chain_unpadded_in_block": Case(lambda: Chain(0, parallel=True), (2, C, 6, 6), counts(1)),
    "activation_in_branch": Case(ActInBranch, (2, C, 6, 6), counts(2)),
    "nested": Case(Nested, (2, C, 6, 6), counts(1)),
    "repeated_with_act": Case(lambda: Repeated(True), (2, C, 6, 6), counts(2)),
    "repeated_without_act": Case(lambda: Repeated(False), (2, C, 6, 6), counts(2), check_refusals=False),
    "dilated_allow_costlier": Case(Dilated, (2, C, 8, 8), counts(1), {"allow_costlier": True}),
    "dilated_default": Case(Dilated, (2, C, 8, 8), counts(3), refused="allow_costlier"),
    "grouped": Case(Grouped, (2, C, 6, 6), counts(1)),
    "strided_with_pool": Case(Strided, (2, C, 7, 8), counts(1)),
    "same_padding_even_kernels": Case(SamePadding, (2, C, 6, 7), counts(1)),
    "pad_then_conv": Case(PadThenConv, (2, C, 6, 6), counts(1)),
    "reflect_padding": Case(Reflect, (2, C, 6, 6), counts(1)),
}
for _extra in ("conv1x1", "bn", "identity", "scale", "avgpool"):
    CASES[f"branch_{_extra}"] = Case(lambda e=_extra: Branches(e, "plus"), (2, C, 6, 6), counts(1))
for _join in ("plus", "torch_add", "iadd", "sum", "method", "chain"):
    CASES[f"join_{_join}"] = Case(lambda j=_join: Branches("bn", j), (2, C, 6, 6), counts(1))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", sorted(CASES))
def test_pattern(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make().double()
    x = x_of(*case.shape, dtype=torch.float64)
    fused, rep = fuse_checked(model, x, rtol=1e-10, **case.kwargs)
    assert ops(fused, x) == case.expected, f"{name}: {ops(model, x)} -> {ops(fused, x)}\n{rep}"
    if not case.check_refusals:
        pass
    elif case.refused is None:
        assert not rep.refused, rep
    else:
        assert case.refused in refusals(rep), rep
    assert not fused.training


def test_batchnorm_act_keeps_its_activation() -> None:
    """The BN part of a BatchNormAct folds into the conv; the ReLU inside it still runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), BNAct(C))
    x = x_of(2, C, 6, 6)
    fused, _ = fuse_checked(model, x)
    executed = count_executed_ops(fused, x)
    assert executed["aten.relu.default"] == 1 and executed["batch_norm"] == 0


def test_activation_branch_conv_survives() -> None:
    """Nothing non-linear is merged: the ReLU branch's conv+BN is its own (folded) conv."""
    torch.manual_seed(0)
    model = ActInBranch().double()
    x = x_of(2, C, 6, 6, dtype=torch.float64)
    fused, rep = fuse_checked(model, x, rtol=1e-10)
    executed = count_executed_ops(fused, x)
    assert executed["conv"] == 2 and executed["aten.relu.default"] == 1
    assert any("b.0" in " ".join(r.ops) and "a.0" not in " ".join(r.ops) for r in rep.regions), rep
    assert any("a.0" in " ".join(r.ops) and "c.0" in " ".join(r.ops) for r in rep.regions), rep


def test_linear_bn1d_needs_example_inputs() -> None:
    """Without shapes a Linear's input rank is unknown: Linear+BN1d is left alone, with the reason."""
    torch.manual_seed(0)
    model = LinearBN()
    x = x_of(5, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == counts(batch_norm=1, linear=2)
    assert "example_inputs" in refusals(rep), rep


def test_float32_patterns_close() -> None:
    """The same patterns in float32: exact up to float32 rounding relative to the output scale."""
    for name in ("repvgg", "acnet", "dbb", "mobileone", "nested", "grouped", "strided_with_pool"):
        case = CASES[name]
        torch.manual_seed(1)
        model = case.make()
        x = x_of(*case.shape, seed=1)
        fused, _ = fuse_checked(model, x, rtol=1e-5, seed=1, **case.kwargs)
        assert ops(fused, x) == case.expected, name


def test_padded_chain_with_zero_bn_shift_folds() -> None:
    """1x1 -> BN -> padded 3x3 is exact when the BN adds nothing (zero mean and beta): one conv."""
    torch.manual_seed(0)
    model = Chain(1, parallel=True).double()
    randomize_bn_(model, 0)
    with torch.no_grad():
        model.bn.running_mean.zero_()
        model.bn.bias.zero_()
    x = x_of(2, C, 6, 6, dtype=torch.float64)
    fused, rep = fuse_checked(model, x, rtol=1e-10, randomize=False)
    assert ops(fused, x) == counts(1), rep


class ScaleThenConv(nn.Module):
    """``conv(x * p)`` with nothing in the graph that tells the rank of ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, C, 1, 1) + 0.5)
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x * self.scale


def test_per_channel_scale_rank_from_the_graph() -> None:
    """``x * p`` with a stored [1, C, 1, 1] tensor is per-channel only on a 4-D ``x``: the BatchNorm2d that reads
    the conv of ``x`` says so without example inputs; with no such fact it takes example inputs."""
    torch.manual_seed(0)
    model = Branches("scale", "plus").double()
    x = x_of(2, C, 6, 6, dtype=torch.float64)
    with_shapes, _ = fuse_checked(model, x, rtol=1e-10)
    without, _ = fuse_checked(model, x, rtol=1e-10, example=False)
    for fused in (with_shapes, without):
        assert count_executed_ops(fused, x)["mul"] == 0 and ops(fused, x) == counts(1)
    bare = ScaleThenConv().double()
    fused, rep = fuse_checked(bare, x, rtol=1e-10, example=False)
    assert count_executed_ops(fused, x)["mul"] == 1 and "example_inputs" in refusals(rep), rep
    fused, rep = fuse_checked(bare, x, rtol=1e-10)
    assert count_executed_ops(fused, x)["mul"] == 0 and ops(fused, x) == counts(1), rep
