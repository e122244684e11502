"""Idioms of real third-party model code, written by us in the shape timm, torchvision and detection code
takes them: each against the unfused model, with executed op counts, and every BN left with a reason."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from fx_helpers import C, conv_bn, fuse_checked, ops, x_of
from torch import nn

import reparam
from reparam.core.errors import ReparamError
from reparam.testing import assert_equivalent, count_executed_ops, randomize_bn_


def explained(model: nn.Module, fused: nn.Module, x) -> None:
    """Every BN that still runs has a reason in the report (counted at the aten level, independently)."""
    left = count_executed_ops(fused, x)["batch_norm"]
    assert left == len(fused.reparam_report.bn_left), fused.reparam_report
    assert all(item.reason for item in fused.reparam_report.bn_left)


class BNAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: asserts the rank of its input, then F.batch_norm, then an activation."""

    def __init__(self, c: int, act: bool = True) -> None:
        super().__init__(c)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BNAct2d(cout, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


# ------------------------------------------------------------------------------------ metadata reads


class MobileOneBlock(nn.Module):
    """timm's MobileOne block: an identity BN, a scale branch and k kxk branches, each a ConvNormAct whose BN
    asserts the rank of the conv output; summed with ``+=``."""

    def __init__(self, c: int = C, k: int = 3) -> None:
        super().__init__()
        self.identity = BNAct2d(c, act=False)
        self.conv_scale = ConvNormAct(c, c, 1, act=False)
        self.conv_kxk = nn.ModuleList([ConvNormAct(c, c, 3, act=False) for _ in range(k)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_scale(x) + self.identity(x)
        for ck in self.conv_kxk:
            out += ck(x)
        return F.relu(out)


def test_rank_asserts_do_not_block_folds() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MobileOneBlock(), MobileOneBlock())
    x = x_of(2, C, 6, 6)
    before = ops(model, x)
    for example in (True, False):
        fused, rep = fuse_checked(model, x, example=example)
        assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}, rep
        assert before["conv"] == 8 and not rep.bn_left


class ShapeRead(nn.Module):
    """The conv output's size is read (``x.shape[-2:]``) and used after its BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.up = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        size = y.shape[-2:]
        y = self.bn(y)
        return F.interpolate(self.up(y), size=(size[0] * 2, size[1] * 2)) + y.mean()


def test_shape_reads_move_to_the_fused_value() -> None:
    torch.manual_seed(0)
    model = ShapeRead()
    x = x_of(2, C, 9, 9)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x)["batch_norm"] == 0, rep
    assert_equivalent(model, fused, x_of(1, C, 13, 7))  # the read follows the input size


# --------------------------------------------------------------------------------- parents and layout


class Layer(nn.Module):
    """A YOLO-style layer: its parent reads ``f`` (where its input comes from) and ``i`` (its index)."""

    def __init__(self, body: nn.Module, f: int | list[int], i: int) -> None:
        super().__init__()
        self.body, self.f, self.i, self.type = body, f, i, "Layer"

    def forward(self, x):
        return self.body(x)


class Concat(nn.Module):
    """ultralytics' Concat: its input is a list of the tensors its ``f`` names."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, xs):
        return self.body(torch.cat(xs, 1))


class Detect(nn.Module):
    """A detection head with shape-dependent code (untraceable), found by its parent with isinstance."""

    def __init__(self) -> None:
        super().__init__()
        self.cv = conv_bn(C, C, 1, padding=0)
        self.shape = None

    def forward(self, x):
        y = self.cv(x)
        if self.shape != y.shape:  # anchors are rebuilt when the size changes
            self.shape = y.shape
        return y.flatten(2).softmax(-1)


class YoloLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleList([
            Layer(conv_bn(C, C, 3), -1, 0), Layer(conv_bn(C, C, 3), -1, 1),
            Layer(Concat(conv_bn(2 * C, C, 1, padding=0)), [0, 1], 2),
            Layer(Detect(), -1, 3)])
        self.save = {0, 1}
        self.stride = torch.tensor([8.0])

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = [y[j] for j in m.f]
            x = m(x)
            if isinstance(m.body, Detect) and x.sum() > 1e9:  # data-dependent: the root cannot be traced
                x = x * 0
            y.append(x if m.i in self.save else None)
        return x


@pytest.mark.parametrize("example", [True, False])
def test_parent_reads_attributes_of_fused_children(example: bool) -> None:
    torch.manual_seed(0)
    model = YoloLike()
    x = x_of(2, C, 8, 8)
    fused, rep = fuse_checked(model, x, example=example)
    assert ops(fused, x)["batch_norm"] == 0, rep
    assert [(m.f, m.i, m.type) for m in fused.model] == [(m.f, m.i, m.type) for m in model.model]
    assert isinstance(fused.model[3].body, Detect) and torch.equal(fused.stride, model.stride)
    explained(model, fused, x)


class ChannelShuffle(nn.Module):
    """ShuffleNetV2's shuffle: a view after a transpose needs the ``.contiguous()`` in between."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 1, padding=0), conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        b, c, h, w = y.shape
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


@pytest.mark.parametrize("example", [True, False])
def test_contiguous_before_a_view_is_kept(example: bool) -> None:
    torch.manual_seed(0)
    model = ChannelShuffle()
    x = x_of(2, C, 6, 6)
    fused, _ = fuse_checked(model, x, example=example)
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}


# ------------------------------------------------------------------------------------------- costs


class SharedThenBN(nn.Module):
    """A conv output read twice: by a BN and by a ReLU.  The BN has no conv of its own to fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(y) * self.bn(y)


class PoolAfterContiguous(nn.Module):
    """ResNeSt's ``avg_pool(x.contiguous())`` on an activation: not a conv, and it must not become one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(x).contiguous(), 3, 1, 1) + x


@pytest.mark.parametrize("make", [SharedThenBN, PoolAfterContiguous, lambda: nn.Sequential(
    nn.ReLU(), nn.BatchNorm2d(C), nn.ReLU())])
def test_never_more_convs_or_macs(make) -> None:
    torch.manual_seed(0)
    model = make()
    x = x_of(2, C, 6, 6)
    before = ops(model, x)
    fused, rep = fuse_checked(model, x)
    after = ops(fused, x)
    assert after["conv"] <= before["conv"], rep
    explained(model, fused, x)


# ------------------------------------------------------------------------------------ other directions


class Conv2dSame(nn.Conv2d):
    """TF-"same" padding computed from the input size at run time (timm's Conv2dSame): not traceable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("bias", [False, True])
def test_runtime_padded_conv_then_bn(bias: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(C, C, 3, stride=2, bias=bias), BNAct2d(C), Conv2dSame(C, C, 3, bias=bias),
                          nn.BatchNorm2d(C))
    x = x_of(2, C, 7, 7)
    randomize_bn_(model, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused, rep = fuse_checked(model, x, example=False, randomize=False)
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}, rep
    assert_equivalent(model, fused, x_of(1, C, 10, 5))  # the padding still follows the input size
    same = [m for m in fused.modules() if isinstance(m, Conv2dSame)]
    assert len(same) == 2  # the subclass, with folded weights: its own tensors, the input's left as they were
    mine = {t.data_ptr() for t in model.parameters()}
    assert all(p.data_ptr() not in mine for m in same for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class CheatingConv(nn.Conv2d):
    """Scales its weight before use: BN cannot be folded into the stored weight; must stay, with a reason."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 1000:
            return x
        return F.conv2d(x, self.weight * 2, self.bias, self.stride, self.padding)


def test_custom_conv_that_is_not_a_plain_conv_keeps_its_bn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(CheatingConv(C, C, 3, padding=1), nn.BatchNorm2d(C))
    x = x_of(2, C, 6, 6)
    _, rep = fuse_checked(model, x)
    (left,) = rep.bn_left
    assert left.where == "1" and left.kind == "not-foldable" and "weight" in left.reason, rep


class SwitchedConv(Conv2dSame):
    """A run-time padded conv whose forward depends on a plain setting: doubled, it is no plain conv."""

    def __init__(self, *args, double: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.double = double

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * 2 if self.double else y


def test_probe_verdicts_follow_each_module_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe of a conv subclass runs once per class and setting (a net has many alike), never reused for a
    module whose plain settings differ."""
    from reparam.fx import folds

    runs = []
    probe = folds._probe
    monkeypatch.setattr(folds, "_probe", lambda m: runs.append(m) or probe(m))
    monkeypatch.setattr(folds, "_PROBED", {})
    torch.manual_seed(0)
    model = nn.Sequential(*[m for d in (False, False, True, False) for m in (
        SwitchedConv(C, C, 3, bias=False, double=d), nn.BatchNorm2d(C))])
    x = x_of(2, C, 9, 9)
    fused, rep = fuse_checked(model, x)
    assert ops(fused, x)["batch_norm"] == 1, rep
    (left,) = rep.bn_left
    assert left.where == "5" and "changes the convolution's result" in left.reason, rep
    # plain: the module, then its folded copy with a bias; doubled: the module; the other plain ones: cached
    assert len(runs) == 3, [type(m).__name__ for m in runs]


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d on tokens: the BN reads a flattened view, the result is reshaped back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(C, 8, 3, stride=2)
        self.a, self.b = LinearNorm(8, 12), LinearNorm(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.b(F.gelu(self.a(x)))


@pytest.mark.parametrize("example", [True, False])
def test_linear_then_bn_on_flattened_tokens(example: bool) -> None:
    torch.manual_seed(0)
    model = Tokens()
    x = x_of(2, C, 8, 8)
    fused, rep = fuse_checked(model, x, example=example)
    assert ops(fused, x)["batch_norm"] == 0, rep


class TokensToMap(nn.Module):
    """MaxViT's stage change: channels-last tokens (a Linear on them) permuted back to NCHW, read by a pooled
    1x1 shortcut and by a BatchNormAct then a 1x1 conv.  No conv reads the permuted value directly: only the
    BN's statistics say how many channels it has."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(C, 8, 1, bias=False))
        self.pre_norm = BNAct2d(C, act=False)
        self.conv = nn.Conv2d(C, 8, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)
        y = (t + self.fc(t)).permute(0, 3, 1, 2)
        return self.shortcut(y) + self.conv(self.pre_norm(y))


def test_bn_statistics_give_the_channel_count_of_its_input() -> None:
    torch.manual_seed(0)
    model = TokensToMap()
    x = x_of(2, C, 8, 8)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 1}, rep
    assert not rep.bn_left, rep


class StageChange(nn.Module):
    """InceptionNeXt's stage change: a block ends in ``x + gamma * fc2(act(fc1(x)))``, the next stage starts
    with BN then an unpadded 2x2/2 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(C, 4 * C, 1), nn.Conv2d(4 * C, C, 1)
        self.gamma = nn.Parameter(0.5 + torch.rand(C))
        self.down = nn.Sequential(nn.BatchNorm2d(C), nn.Conv2d(C, 2 * C, 2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected NCHW")  # (as timm's norm layers check: the layer scale is per-channel)
        y = self.fc2(F.gelu(self.fc1(x)))
        return self.down(x + y.mul(self.gamma.reshape(1, -1, 1, 1)))


def test_bn_after_a_residual_sum_folds_into_the_next_conv() -> None:
    torch.manual_seed(0)
    model = StageChange()
    x = x_of(2, C, 8, 8)
    fused, rep = fuse_checked(model, x, example=False)
    assert count_executed_ops(fused, x)["mul"] == 0, rep  # the layer scale is in fc2
    assert ops(fused, x) == {"conv": 3, "batch_norm": 0, "linear": 0}, rep


class ShapeReadingAttention(nn.Module):
    """Visformer's attention on a feature map: reads ``B, C, H, W = x.shape`` of its input, then one qkv conv."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Conv2d(C, 3 * C, 1, bias=False), nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, c, h * w).unbind(1)
        a = torch.softmax(q.transpose(1, 2) @ k / c**0.5, -1)
        return self.proj((v @ a.transpose(1, 2)).reshape(b, c, h, w))


class NormedAttention(nn.Module):
    """``x + attn(bn(x))`` (Visformer, CoAtNet's BN variant): the BN's output sizes are read, its data only by
    the qkv conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(C, C, 3)
        self.norm, self.attn = nn.BatchNorm2d(C), ShapeReadingAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + self.attn(self.norm(x))


def test_bn_whose_sizes_are_read_folds_into_the_conv_after_it() -> None:
    torch.manual_seed(0)
    model = NormedAttention()
    x = x_of(2, C, 6, 5)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == {"conv": 3, "batch_norm": 0, "linear": 0}, rep
    assert_equivalent(model, fused, x_of(1, C, 4, 7))  # the sizes read are still the input's


class PreNorm(nn.Module):
    """A BN read by three unpadded 1x1 convs (q, k, v of an attention-like block) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.q, self.k, self.v = (nn.Conv2d(C, C, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(F.relu(x))
        return self.q(y) * torch.sigmoid(self.k(y)) + self.v(y)


class PreNormPadded(PreNorm):
    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Conv2d(C, C, 3, padding=1)


def test_bn_folds_forward_into_several_convs() -> None:
    torch.manual_seed(0)
    model = PreNorm()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == {"conv": 3, "batch_norm": 0, "linear": 0}, rep
    padded = PreNormPadded()
    fused, rep = fuse_checked(padded, x)
    (left,) = rep.bn_left
    assert left.where == "norm" and left.kind == "padded-conv", rep


class SplitBN(nn.Module):
    """One conv's output split in two along the channels, each piece with its own BN."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(C, 2 * C + 2, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(C), nn.BatchNorm2d(C + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.how == "split":
            a, b = torch.split(y, [C, C + 2], dim=1)
        else:
            a, b = y.split([C, C + 2], 1)
        return torch.cat([F.relu(self.bn_a(a)), self.bn_b(b)], 1)


class Chunked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 2 * C, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return self.bn(a) * torch.sigmoid(b)


@pytest.mark.parametrize("make", [lambda: SplitBN("split"), lambda: SplitBN("method"), Chunked])
def test_bn_on_channel_slices_folds_into_the_conv(make) -> None:
    torch.manual_seed(0)
    model = make()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == {"conv": 1, "batch_norm": 0, "linear": 0}, rep


class MixConv(nn.Module):
    """timm's MixedConv2d (per-group kernels of different sizes, concatenated), then its BN."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.c3, self.c5 = nn.Conv2d(C, C, 3, padding=1, groups=C), nn.Conv2d(C, C, 5, padding=2, groups=C)
        self.bn = BNAct2d(2 * C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, x1 = torch.split(x, [C, C], 1)
        if self.functional:
            parts = [F.conv2d(x0, self.c3.weight, self.c3.bias, 1, 1, 1, C), self.c5(x1)]
        else:
            parts = [self.c3(x0), self.c5(x1)]
        return self.bn(torch.cat(parts, 1))


@pytest.mark.parametrize("functional", [False, True])
def test_bn_after_concat_of_convs(functional: bool) -> None:
    torch.manual_seed(0)
    model = MixConv(functional)
    x = x_of(2, 2 * C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}, rep


class LayerScale(nn.Module):
    """A ``[C, 1, 1]`` layer scale on a conv output and BN1d after Linear after ``flatten(1)``: the graph
    fixes every rank, so no example inputs are needed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(C)
        self.gamma = nn.Parameter(torch.rand(C, 1, 1) + 0.5)
        self.fc = nn.Linear(C * 4, 6)
        self.bn1 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.gamma * self.bn2(self.conv(x))
        return self.bn1(self.fc(F.adaptive_avg_pool2d(F.relu(y), 2).flatten(1)))


def test_ranks_from_the_graph_without_example_inputs() -> None:
    torch.manual_seed(0)
    model = LayerScale()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == {"conv": 1, "batch_norm": 0, "linear": 1}, rep
    assert count_executed_ops(fused, x)["mul"] == 0 and count_executed_ops(fused, x)["add"] == 0


class GatedResidual(nn.Module):
    """EfficientViM's gated FFN residual, ``x + a * (bn(conv(h)) - x)`` with ``h = relu(conv(x))``: the sum
    would make ``(1 - a) * x`` a conv of its own, so it stays elementwise; the BN still folds into its conv
    (timm's deploy form does the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(C, 2 * C, 1)
        self.fc2 = nn.Conv2d(2 * C, C, 1, bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.alpha = nn.Parameter(torch.randn(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.alpha).view(-1, 1, 1)
        return x + a * (self.bn(self.fc2(F.relu(self.fc1(x)))) - x)


@pytest.mark.parametrize("example", [True, False])
def test_gated_residual_with_a_subtraction_keeps_its_sum_and_folds_its_bn(example: bool) -> None:
    torch.manual_seed(0)
    model = GatedResidual()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=example)
    assert ops(fused, x) == {"conv": 2, "batch_norm": 0, "linear": 0}, rep
    explained(model, fused, x)


class ScaledBranch(nn.Module):
    """A scaled non-linear branch inside a sum of conv branches, ``a(x) + (hardswish(x) / 6 + b(x))`` (how an
    exported, decomposed hardswish branch reads): the scaled value joins the sum as it is, the convs merge."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + (F.hardswish(x) / 6 + self.b(x))


@pytest.mark.parametrize("example", [True, False])
def test_scaled_value_in_a_sum_of_convs_stays_a_plain_summand(example: bool) -> None:
    torch.manual_seed(0)
    model = ScaledBranch()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=example)
    assert ops(fused, x)["conv"] == 1, rep


class FrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d: buffers only, the affine computed in forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        for name, v in (("weight", torch.rand(c) + 0.5), ("bias", torch.randn(c)), ("running_mean", torch.randn(c)),
                        ("running_var", torch.rand(c) + 0.5)):
            self.register_buffer(name, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight is standardized with F.batch_norm (training=True) on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_values_computed_from_stored_tensors_are_stored_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), FrozenBN(C), nn.ReLU(), StdConv(C, C, 3, padding=1),
                          nn.BatchNorm2d(C)).eval()
    x = x_of(2, 4, 6, 6)
    fused, rep = fuse_checked(model, x)
    assert count_executed_ops(fused, x)["batch_norm"] == 0 and count_executed_ops(fused, x)["mul"] == 0, rep
    assert ops(fused, x)["conv"] == 2
    # without example inputs the weight standardization is still stored; whether the frozen BN's [1, C, 1, 1]
    # constants are per-channel depends on the input's rank (a Conv2d also takes 3-D input): left, with why
    fused, rep = fuse_checked(model, x, example=False)
    assert count_executed_ops(fused, x)["batch_norm"] == 0 and count_executed_ops(fused, x)["mul"] == 1
    assert {x.kind for x in rep.leftovers} == {"needs-shapes"}, rep


# ------------------------------------------------------------------------------------ right refusals


class PreAct(nn.Module):
    """DenseNet / ResNetV2: BN -> ReLU -> conv (the activation is between the BN and the conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(x))) + x


def test_preactivation_bn_left_with_its_reason() -> None:
    torch.manual_seed(0)
    model = PreAct()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x)
    (left,) = rep.bn_left
    assert left.where == "bn" and left.kind == "no-neighbour" and "relu" in left.reason.lower()
    explained(model, fused, x)


def test_script_traced_and_compiled_modules_are_refused_with_what_to_pass() -> None:
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)).eval()
    x = x_of(1, C, 6, 6)
    cases = {"TorchScript": torch.jit.script(model), "traced": torch.jit.trace(model, x),
             "torch.compile": torch.compile(model)}
    for what, wrapped in cases.items():
        with pytest.raises(ReparamError, match="pass the") as err:
            reparam.fuse(wrapped)
        assert what.split()[0].lower() in str(err.value).lower() or "torchscript" in str(err.value).lower()


# ----------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_bn_only_region_keeps_the_model_dtype(dtype: torch.dtype) -> None:
    """Regression: a BN-only region fused without example inputs became a float32 conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(C, affine=False),
                          nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)).to(dtype)
    randomize_bn_(model, 0)
    model.eval()
    fused = reparam.fuse(model)
    x = x_of(2, C, 6, 6, dtype=dtype)
    if dtype == torch.float16:
        return  # CPU half convs may be missing: building the module is the regression
    assert_equivalent(model, fused, x, rtol=1e-9)


class PromotingScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.register_buffer("k", torch.rand(1, C, 1, 1, dtype=torch.float64) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.k


@pytest.mark.parametrize("example", [True, False])
def test_type_promotion_is_kept(example: bool) -> None:
    """Regression: ``conv(x) * k`` with a float64 buffer on a float32 model gives float64; so must the result."""
    torch.manual_seed(0)
    model = PromotingScale().eval()
    x = x_of(1, C, 6, 6)
    fused = reparam.fuse(model, x if example else None)
    with torch.no_grad():
        assert fused(x).dtype == model(x).dtype == torch.float64
    assert count_executed_ops(fused, x)["mul"] == 1
    assert "promotes" in str(fused.reparam_report.refused) or not example


# ----------------------------------------------------------------------------- state and the report


class CachingAttention(nn.Module):
    """LeViT's attention-bias cache: forward stores a tensor in a dict attribute on first call."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = conv_bn(C, C, 1, padding=0)
        self.bias = nn.Parameter(torch.randn(C, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.proj(x) + self.cache[key]


def test_tracing_leaves_the_input_models_state_alone() -> None:
    torch.manual_seed(0)
    model = CachingAttention().eval()
    x = x_of(1, C, 6, 6)
    fused = reparam.fuse(model)
    assert model.cache == {}
    assert_equivalent(model, fused, x)


def test_fused_modules_have_names_of_their_own_and_keep_channels_last() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(C, C, 3), nn.ReLU(), conv_bn(C, C, 1, padding=0)).to(
        memory_format=torch.channels_last)
    randomize_bn_(model, 0)
    model.eval()
    fused = reparam.fuse(model)
    train_keys = set(model.state_dict())
    assert not train_keys & {k for k in fused.state_dict() if "fused" in k}
    result = fused.load_state_dict(model.state_dict(), strict=False)
    assert result.unexpected_keys and all("fused" in k for k in result.missing_keys)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fused.parameters() if p.dim() == 4)


def test_report_answers_what_remains_and_why() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MobileOneBlock(), PreAct(), PreAct())
    x = x_of(2, C, 6, 6)
    _, rep = fuse_checked(model, x)
    data = rep.to_dict()
    json.dumps(data)  # plain data
    assert data["counts_before"]["batch_norm"] == 7 and data["counts_after"]["batch_norm"] == 2
    assert rep.counted_on == "example inputs" and rep.check["max_rel"] < 1e-5
    assert list(rep.by_kind()) == ["no-neighbour"] and len(rep.by_kind()["no-neighbour"]) == 2
    text = str(rep)
    assert "2 left: no conv or linear layer" in text and "batch_norm 7 -> 2" in text
    assert all("Identity" not in r.ops[0] for r in rep.regions)
    nothing = reparam.fuse(nn.Sequential(nn.ReLU()))
    assert nothing.reparam_report.summary().startswith("reparam.fuse: nothing fused")


# ---------------------------------------------------------------------------------- checks and undo


class LooksAtTensors(nn.Module):
    """``isinstance(x, torch.Tensor)`` is False while tracing: the traced graph takes the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3), conv_bn(C, C, 1, padding=0)

    def forward(self, x):
        return self.a(x) if isinstance(x, torch.Tensor) else self.b(x)


def test_a_trace_that_differs_from_the_code_is_not_used() -> None:
    torch.manual_seed(0)
    model = LooksAtTensors()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x)
    assert any("does not reproduce" in why for _, why in rep.undone), rep
    assert ops(fused, x)["batch_norm"] == 0


class ReadsChildWeights(nn.Module):
    """An untraceable parent that reads a submodule of its child ``block`` in its source: ``block`` is fused
    inside rather than replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(C, C, 3)
        self.other = conv_bn(C, C, 1, padding=0)

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.other(self.block(x)) * self.block[0].weight.mean()


class ReadsChildWeightsByName(nn.Module):
    """The same read through a name the source does not show: only running the result finds that replacing
    ``block`` breaks it (the part is undone)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(C, C, 3)
        self.other = conv_bn(C, C, 1, padding=0)
        self.which = "bl" + "ock"

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.other(self.block(x)) * getattr(self, self.which)[0].weight.mean()


def test_a_parent_reaching_into_a_child_keeps_it() -> None:
    torch.manual_seed(0)
    model = ReadsChildWeights()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)  # nothing to run: the source says enough
    assert ops(fused, x)["batch_norm"] == 1, rep  # `other` fused, `block` only fused inside (its BN stays)
    explained(model, fused, x)


def test_a_part_that_breaks_the_model_is_undone() -> None:
    torch.manual_seed(0)
    model = ReadsChildWeightsByName()
    x = x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x)
    assert rep.undone and any("block" in where for where, _ in rep.undone), rep
    assert ops(fused, x)["batch_norm"] == 1  # `other` still fused, `block` kept as it was
    explained(model, fused, x)


def test_input_model_untouched() -> None:
    torch.manual_seed(0)
    model = YoloLike()
    randomize_bn_(model, 0)
    model.eval()
    snapshot = copy.deepcopy(model.state_dict())
    reparam.fuse(model, x_of(2, C, 8, 8))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
