"""Never wrong: sharing, values read outside a region, in-place ops, BN that cannot fold, the input model
left untouched, and the fused module's life afterwards (state_dict, ONNX export, torch.jit.trace)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from fx_helpers import RepVGG, conv_bn, fuse_checked, ops, refusals, x_of
from torch import nn

import reparam
from reparam.testing import assert_equivalent, randomize_bn_

C = 4


def _x() -> torch.Tensor:
    return x_of(2, C, 6, 6)


# ------------------------------------------------------------------------------------------ sharing


class SharedConv(nn.Module):
    """One conv module called twice: inside a conv+BN region and again on another value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(self.conv(x))))


class SharedBN(nn.Module):
    """One BN module after two different convs (each pair folds separately)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(C, C, 3, padding=1)
        self.c2 = nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c1(x)) + F.relu(self.bn(self.c2(x)))


class TiedParameter(nn.Module):
    """A second conv module holding the *same* weight Parameter as the first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.other = nn.Conv2d(C, C, 3, padding=1)
        self.other.weight = self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(F.relu(self.bn(self.conv(x))))


class WeightReadByAttr(nn.Module):
    """The conv's weight and bias are also read directly (``self.conv.weight``) after its region."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        return F.conv2d(y, self.conv.weight, self.conv.bias, padding=1)


class BiasReadByAttr(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))) + self.conv.bias.view(1, -1, 1, 1)


class ReadOutside(nn.Module):
    """The conv output is returned too, so it must exist on its own: BN cannot fold into it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(C, C, 3, padding=1)
        self.c2 = nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.c1(x)
        return self.bn(a) + self.c2(x), a


class ReadOutsideMid(nn.Module):
    """A branch's conv+BN value is also used by a later, unrelated op."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(C, C, 3)
        self.b = conv_bn(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya = self.a(x)
        y = F.relu(ya + self.b(x) + x)
        return y * torch.sigmoid(ya)


@pytest.mark.parametrize("model_cls, expected", [
    (SharedConv, {"conv": 2, "batch_norm": 0, "linear": 0}),
    (SharedBN, {"conv": 2, "batch_norm": 0, "linear": 0}),
    (TiedParameter, {"conv": 2, "batch_norm": 0, "linear": 0}),
    (ReadOutside, {"conv": 2, "batch_norm": 1, "linear": 0}),
    (ReadOutsideMid, {"conv": 2, "batch_norm": 0, "linear": 0}),
])
def test_sharing_and_outside_reads_stay_exact(model_cls, expected) -> None:
    torch.manual_seed(0)
    model = model_cls()
    x = _x()
    fused, rep = fuse_checked(model, x)
    assert ops(fused, x) == expected, rep


@pytest.mark.parametrize("model_cls", [WeightReadByAttr, BiasReadByAttr])
def test_module_parameters_read_elsewhere(model_cls) -> None:
    torch.manual_seed(0)
    fuse_checked(model_cls(), _x())


class SharedValueTwoPaths(nn.Module):
    """``y = pre(x); return b(y) + avgpool(h(y))``: y is read by two paths into one sum, and the pooled path
    is refused (cost, or a padded pool after a bias), which must cut y out as a value of its own."""

    def __init__(self, nd: int, c: int, with_bn: bool) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d)[nd - 1]
        self.bn = (nn.BatchNorm1d, nn.BatchNorm2d)[nd - 1](c) if with_bn else None
        self.a = conv(c, c, 1, bias=False)
        self.b = conv(c, c, 1, bias=False)
        self.h = conv(c, c, 1, bias=False)
        self.p = (nn.AvgPool1d, nn.AvgPool2d)[nd - 1](3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) if self.bn is None else self.bn(x) + self.a(x)
        return self.b(y) + self.p(self.h(y))


@pytest.mark.parametrize("nd, c, with_bn, allow", [(2, 4, False, False), (1, 1, True, True), (1, 1, True, False)])
def test_value_read_by_two_paths_one_refused(nd: int, c: int, with_bn: bool, allow: bool) -> None:
    torch.manual_seed(0)
    x = x_of(2, c, *([8] * nd))
    fuse_checked(SharedValueTwoPaths(nd, c, with_bn), x, allow_costlier=allow)


# ------------------------------------------------------------------------------------------ in place


class InplaceMethodOnSource(nn.Module):
    """``a = conv(x); x.relu_(); return a + x``: the sum must read x after the relu_."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x) - 0.5  # a fresh tensor (never write into the caller's input)
        a = self.conv(x)
        x.relu_()
        return a + x


class InplaceModuleOnSource(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(C, C, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(x) - 0.5
        a = self.conv(x)
        self.act(x)
        return a + x


class InplaceFunctionalOnSource(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(C, C, 3)
        self.one = conv_bn(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x)
        a = self.conv(x) + self.one(x)
        F.relu(x, inplace=True)
        return a + x


class InplaceAfterExit(nn.Module):
    """The in-place op runs after the region's exit: fusing is fine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x)
        y = self.conv(x) + x
        x.mul_(3.0)
        return y * x


class InplaceBetweenTwoReads(nn.Module):
    """``y = conv(x) + x; x.mul_(3); return y + x``: one region would read x before and after the mul_."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x)
        y = self.conv(x) + x
        x.mul_(3.0)
        return y + x


@pytest.mark.parametrize("model_cls", [InplaceMethodOnSource, InplaceModuleOnSource, InplaceFunctionalOnSource,
                                       InplaceBetweenTwoReads])
def test_inplace_on_source_before_exit(model_cls) -> None:
    torch.manual_seed(0)
    _, rep = fuse_checked(model_cls(), _x())
    assert "in place" in refusals(rep), rep


class InplaceCallOnSource(nn.Module):
    """``a = conv(x); <in-place function on x>; return a + x`` for function forms of in-place ops."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = conv_bn(C, C, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x)
        a = self.conv(x)
        if self.how == "torch.relu_":
            torch.relu_(x)
        elif self.how == "F.relu_":
            F.relu_(x)
        elif self.how == "torch.sigmoid_":
            torch.sigmoid_(x)
        elif self.how == "F.leaky_relu_":
            F.leaky_relu_(x)
        elif self.how == "torch.clamp_":
            torch.clamp_(x, 0.0, 0.1)
        elif self.how == "out=":
            torch.mul(x, 2.0, out=x)
        elif self.how == "setitem":
            x[:, 0] = 0.0
        return a + x


INPLACE_CALLS = ["torch.relu_", "F.relu_", "torch.sigmoid_", "F.leaky_relu_", "torch.clamp_", "out="]


@pytest.mark.parametrize("how", INPLACE_CALLS)
def test_inplace_function_forms_on_source(how: str) -> None:
    torch.manual_seed(0)
    fuse_checked(InplaceCallOnSource(how), _x())


def test_setitem_on_source() -> None:
    """``x[:, 0] = 0`` is not traceable by fx: the model is fused child by child, exactly."""
    torch.manual_seed(0)
    _, rep = fuse_checked(InplaceCallOnSource("setitem"), _x())
    assert "item assignment" in "\n".join(why for _, why in rep.skipped), rep


class InplaceInsideSum(nn.Module):
    """``conv(h) + h.mul_(2)``: the conv reads h before the write, the sum after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        return self.conv(h) + h.mul_(2)


def test_inplace_inside_sum() -> None:
    torch.manual_seed(0)
    fuse_checked(InplaceInsideSum(), _x())


def test_inplace_after_exit_still_fuses() -> None:
    torch.manual_seed(0)
    x = _x()
    fused, rep = fuse_checked(InplaceAfterExit(), x)
    assert ops(fused, x)["batch_norm"] == 0 and rep.regions, rep


class IaddAlias(nn.Module):
    """``y = a; y += b`` also changes ``a`` (same tensor); the module returns ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(C, C, 3)
        self.b = conv_bn(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        y = a
        y += self.b(x)
        return a


class IaddChainThenBlock(nn.Module):
    """``y = a(x); y += h(x); y += v(x)`` (1x1, 1x3, 3x1), then a block reading y three times.

    By default ``a + h`` fuses into one conv, the second ``+=`` is refused (costlier), and the block's terms
    read the first sum's tensor, which that ``+=`` overwrites in place before the block."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 1, bias=False)
        self.h = nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False)
        self.v = nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=False)
        self.b1, self.b2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.k = nn.Conv2d(c, c, 1, bias=False)
        self.kb = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y += self.h(x)
        y += self.v(x)
        return self.b1(y) + self.b2(y) + self.kb(self.k(y))


def test_iadd_chain_then_block() -> None:
    torch.manual_seed(0)
    model = IaddChainThenBlock().double()
    randomize_bn_(model, 1)
    fuse_checked(model, x_of(2, 3, 7, 7, dtype=torch.float64), rtol=1e-9, randomize=False)


class IaddIntoActivation(nn.Module):
    """``z = relu(x); w = z; w += conv(z)`` changes z, which is returned."""

    def __init__(self) -> None:
        super().__init__()
        self.c = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(x)
        w = z
        w += self.c(z)
        return z * 2


@pytest.mark.parametrize("model_cls", [IaddAlias, IaddIntoActivation])
def test_iadd_through_alias(model_cls) -> None:
    torch.manual_seed(0)
    fuse_checked(model_cls(), _x())


# ------------------------------------------------------------------------------------------ BN that cannot fold


class NoRunningStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_bn_without_running_stats_left_alone() -> None:
    torch.manual_seed(0)
    x = _x()
    fused, rep = fuse_checked(NoRunningStats(), x)
    assert ops(fused, x) == {"conv": 1, "batch_norm": 1, "linear": 0}
    assert "track_running_stats=False" in refusals(rep), rep


class AlwaysTraining(nn.Module):
    """A block that overrides train() so it stays in training mode (batch statistics) after eval()."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def train(self, mode: bool = True) -> AlwaysTraining:
        return super().train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class WithAlwaysTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stuck = AlwaysTraining()
        self.tail = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(F.relu(self.stuck(x)))


def test_training_mode_submodule_reported() -> None:
    torch.manual_seed(0)
    model = WithAlwaysTraining()
    randomize_bn_(model, 0)
    _, rep = reparam.fuse(model, _x(), report=True)
    assert "stuck" in refusals(rep) and "training" in refusals(rep), rep
    assert any("tail" in " ".join(r.ops) for r in rep.regions), rep


def test_training_mode_submodule_computes_as_before() -> None:
    torch.manual_seed(0)
    model = WithAlwaysTraining()
    randomize_bn_(model, 0)
    x = _x()
    fused = reparam.fuse(model, x)
    with torch.no_grad():
        model.eval()
        # the BN in training mode would update its running stats on every call: compare one call each,
        # from identical copies
        ref = copy.deepcopy(model)(x)
        out = fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class ChildrenOfAlwaysTraining(nn.Module):
    """The parent calls the children of a module that stays in training mode directly."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = AlwaysTraining()
        self.tail = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(F.relu(self.stuck.bn(self.stuck.conv(x))))


def test_children_of_training_mode_module_compute_as_before() -> None:
    torch.manual_seed(0)
    model = ChildrenOfAlwaysTraining()
    randomize_bn_(model, 0)
    x = _x()
    fused = reparam.fuse(model, x)
    with torch.no_grad():
        model.eval()
        ref = copy.deepcopy(model)(x)
        out = fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_training_mode_submodule_not_run_on_the_input() -> None:
    torch.manual_seed(0)
    model = WithAlwaysTraining()
    randomize_bn_(model, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reparam.fuse(model, _x())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, changed


# ------------------------------------------------------------------------------------------ the input model


def _snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            {n: type(m) for n, m in model.named_modules()})


def _mixed_flags_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(RepVGG(), RepVGG(), conv_bn(C, C, 3))
    randomize_bn_(model, 0)
    model.train()
    model[1].eval()  # mixed flags must come back exactly
    return model


def test_input_model_untouched() -> None:
    model = _mixed_flags_model()
    tensors, flags, types = _snapshot(model)
    fused = reparam.fuse(model, _x())
    after_tensors, after_flags, after_types = _snapshot(model)
    assert after_flags == flags and after_types == types
    assert tensors.keys() == after_tensors.keys()
    for k in tensors:
        assert torch.equal(tensors[k], after_tensors[k]), k
    assert all(a is not b for a in model.parameters() for b in fused.parameters())
    # and fusing did not tie the result to the input: changing the input leaves the result alone
    x = _x()
    with torch.no_grad():
        before = fused(x)
        for p in model.parameters():
            p.add_(1.0)
        torch.testing.assert_close(fused(x), before)


_GLOBAL_SCALE = torch.linspace(0.5, 2.0, 4).reshape(1, 4, 1, 1)


class ReadsAGlobal(nn.Module):
    """Reads a tensor that is not an attribute: fx would store it on the model as ``_tensor_constant0``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGG()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) * _GLOBAL_SCALE + _GLOBAL_SCALE


@pytest.mark.parametrize("example", [False, True])
def test_tracing_leaves_no_attribute_on_the_model(example: bool) -> None:
    torch.manual_seed(0)
    model = ReadsAGlobal()
    randomize_bn_(model, 0)
    model.eval()
    names = set(vars(model))
    fused = reparam.fuse(model, _x() if example else None)
    assert set(vars(model)) == names, set(vars(model)) - names
    assert_equivalent(model, fused, _x(), rtol=1e-5)


def test_result_is_eval_mode() -> None:
    model = _mixed_flags_model()
    fused = reparam.fuse(model)
    assert not any(m.training for m in fused.modules())


def test_inplace_reuses_the_model() -> None:
    model = _mixed_flags_model()
    model.append(nn.PReLU(C))  # not fusable: kept as is
    reference = copy.deepcopy(model).eval()
    fused = reparam.fuse(model, _x(), inplace=True)
    assert not any(m.training for m in fused.modules())
    assert_equivalent(reference, fused, _x(), rtol=1e-5)
    assert any(m is model[-1] for m in fused.modules()), "inplace=True should reuse the model's modules"
    copied = reparam.fuse(reference, _x())
    assert not any(m is reference[-1] for m in copied.modules())


# ------------------------------------------------------------------------------------------ afterwards


def _fused_repvgg(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(RepVGG(), RepVGG(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 3),
                          nn.BatchNorm1d(3))
    randomize_bn_(model, seed)
    model.eval()
    return model, reparam.fuse(model, _x())


def test_state_dict_round_trip() -> None:
    model, fused = _fused_repvgg(0)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    _, other = _fused_repvgg(1)  # same structure, different weights
    x = _x()
    with torch.no_grad():
        assert not torch.allclose(other(x), fused(x))
        buf.seek(0)
        other.load_state_dict(torch.load(buf))
        torch.testing.assert_close(other(x), fused(x), rtol=0, atol=0)
    assert_equivalent(model, other, x, rtol=1e-5)


def test_jit_trace() -> None:
    model, fused = _fused_repvgg()
    x = _x()
    traced = torch.jit.trace(fused, x)
    assert_equivalent(model, traced, x, rtol=1e-5)


def _onnx_run(data: bytes, x: torch.Tensor):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.filterwarnings("ignore")
def test_onnx_export_torchscript_exporter() -> None:
    pytest.importorskip("onnx")
    model, fused = _fused_repvgg()
    x = _x()
    buf = io.BytesIO()
    torch.onnx.export(fused, (x,), buf, dynamo=False)
    with torch.no_grad():
        torch.testing.assert_close(_onnx_run(buf.getvalue(), x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore")
def test_onnx_export_dynamo_exporter() -> None:
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = RepVGG()
    randomize_bn_(model, 0)
    model.eval()
    fused = reparam.fuse(model, _x())
    x = _x()
    program = torch.onnx.export(fused, (x,), dynamo=True, verbose=False)
    buf = io.BytesIO()
    program.save(buf) if hasattr(program, "save") else None
    data = buf.getvalue() or program.model_proto.SerializeToString()
    with torch.no_grad():
        torch.testing.assert_close(_onnx_run(data, x), model(x), rtol=1e-4, atol=1e-4)


class BufferWeights(nn.Module):
    """Functional conv and batch norm on buffers (not nn.Parameters): read through their get_attr paths."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(C, C, 3, 3))
        self.register_buffer("mean", torch.randn(C))
        self.register_buffer("var", torch.rand(C) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, padding=1)
        return F.batch_norm(y, self.mean, self.var, None, None, False, 0.1, 1e-5)


def test_functional_ops_on_buffers_fuse() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, C, 6, 6)
    fused, rep = fuse_checked(BufferWeights(), x)
    assert ops(fused, x)["conv"] == 1 and ops(fused, x)["batch_norm"] == 0, rep
