"""Random multi-branch torch models, exported with both torch exporters, fused and compared in ORT.

Each block sums 1-4 branches read from one input (conv+BN of several kernels, BN only, identity,
average pooling, 1x1->kxk chains); blocks are separated by activations.  Every block must collapse to one
Conv, leave no BatchNormalization, and compute the same outputs as the export and as torch itself.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from onnx_testlib import io_signature, max_rel_error, ops, session

import reparam.onnx

torch = pytest.importorskip("torch")
nn = torch.nn

DENSE = ("conv3", "conv1", "conv5", "bn", "identity", "avgpool", "chain1x3", "conv3_nobn", "pad_conv3")
DEPTHWISE = ("dw3", "dw1", "bn", "identity", "avgpool", "pad_dw3")


class Branch(nn.Module):
    def __init__(self, kind: str, c: int, stride: int) -> None:
        super().__init__()
        self.kind = kind
        if kind in ("conv1", "conv3", "conv5", "dw1", "dw3", "conv3_nobn"):
            k = int(kind[-1]) if kind[-1].isdigit() else 3
            groups = c if kind.startswith("dw") else 1
            layers = [nn.Conv2d(c, c, k, stride, k // 2, groups=groups, bias=kind == "conv3_nobn")]
            if kind != "conv3_nobn":
                layers.append(nn.BatchNorm2d(c))
            self.body = nn.Sequential(*layers)
        elif kind in ("pad_conv3", "pad_dw3"):  # F.pad then an unpadded conv: TorchScript computes the pads
            self.pad = True
            groups = c if kind == "pad_dw3" else 1
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(c))
        elif kind == "chain1x3":
            self.body = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 3, stride, 1, bias=False),
                                      nn.BatchNorm2d(c))
        elif kind == "bn":
            self.body = nn.BatchNorm2d(c)
        elif kind == "avgpool":
            self.body = nn.AvgPool2d(3, 1, 1, count_include_pad=True)
        else:
            self.body = nn.Identity()

    def forward(self, x):
        if getattr(self, "pad", False):
            x = torch.nn.functional.pad(x, (1, 1, 1, 1))
        return self.body(x)


class Block(nn.Module):
    def __init__(self, kinds: list[str], c: int, stride: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(Branch(k, c, stride) for k in kinds)

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out


class Net(nn.Module):
    def __init__(self, blocks: list[Block], act: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "hardswish": nn.Hardswish()}[act]

    def forward(self, x):
        for b in self.blocks:
            x = self.act(b(x))
        return x


@st.composite
def nets(draw):
    c = draw(st.integers(2, 5))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        depthwise = draw(st.booleans())
        stride = draw(st.sampled_from([1, 1, 2]))
        pool = DEPTHWISE if depthwise else DENSE
        if stride == 2:  # identity, BN and stride-1 pooling cannot change the size
            pool = tuple(k for k in pool if k not in ("bn", "identity", "avgpool"))
        kinds = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
        lone = len(kinds) == 1 and kinds[0] in ("identity", "avgpool", "bn")  # a lone BN stays a BN
        if lone or set(kinds) == {"identity"}:
            kinds.append("conv3" if not depthwise else "dw3")
        blocks.append(Block(kinds, c, stride))
    net = Net(blocks, draw(st.sampled_from(["relu", "gelu", "hardswish"]))).eval()
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    # untouched BNs share equal parameters: the TorchScript exporter aliases them through Identity nodes, and
    # exporters merge equal parameter-free branches (two default BN-only branches, two pools) into one node
    keep_default = draw(st.booleans())
    with torch.no_grad():
        for m in net.modules():
            default = keep_default and bool(torch.rand(1, generator=g) < 0.5)
            if isinstance(m, nn.BatchNorm2d) and not default:
                m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.4)
    size = draw(st.integers(5, 9))
    return net, c, size


def export(net: nn.Module, x, path: Path, dynamo: bool, opset: int, dynamic_hw: bool = False,
           constant_folding: bool = True) -> None:
    kwargs = {"input_names": ["x"], "output_names": ["y"], "opset_version": opset, "dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", max=64)},)
    else:
        axes = {0: "batch", 2: "h", 3: "w"} if dynamic_hw else {0: "batch"}
        kwargs["dynamic_axes"] = {"x": axes, "y": {0: "batch", 2: "oh", 3: "ow"} if dynamic_hw else {0: "batch"}}
        kwargs["do_constant_folding"] = constant_folding
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), **kwargs)


def check_export_fuses(net, c: int, size: int, dynamo: bool, opset: int, **options) -> None:
    x = torch.randn(2, c, size, size)
    with torch.no_grad():
        expected = net(x).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        export(net, x, path, dynamo, opset, **options)
        model = onnx.load(str(path))
        fused, report = reparam.onnx.fuse(path, report=True)
        onnx.checker.check_model(fused, full_check=True)
        onnx.shape_inference.infer_shapes(fused, strict_mode=True)
    assert io_signature(fused) == io_signature(model)
    assert fused.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch still dynamic
    counts = ops(fused)
    assert counts["BatchNormalization"] == 0, report.format()
    # one Conv per block (an average pool is one); a block of only BN and identity branches is a per-channel
    # Mul/Add: the result never runs a conv where the input runs none
    with_conv = sum(any(isinstance(m, (nn.Conv2d, nn.AvgPool2d)) for m in blk.modules()) for blk in net.blocks)
    assert counts["Conv"] == with_conv, report.format()
    feeds = {"x": x.numpy()}
    got = session(fused).run(None, feeds)[0]
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(got - expected).max()) / scale < 2e-5
    assert max_rel_error(model, fused, feeds) < 2e-5
    odd = {"x": np.random.default_rng(1).standard_normal((3, c, size, size)).astype(np.float32)}
    assert max_rel_error(model, fused, odd) < 2e-5  # another batch size


SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "derandomize": True}
# a dynamo export takes seconds: report the failing example as found rather than shrink it for minutes
DYNAMO = {**SETTINGS, "phases": [Phase.explicit, Phase.reuse, Phase.generate]}


@settings(max_examples=20, **SETTINGS)
@given(nets(), st.sampled_from([13, 17]))
def test_torchscript_export_fuses(net_c_size, opset):
    check_export_fuses(*net_c_size, dynamo=False, opset=opset)


@settings(max_examples=8, **SETTINGS)
@given(nets(), st.booleans())
def test_torchscript_export_with_dynamic_spatial_sizes_fuses(net_c_size, constant_folding):
    """Regression: with dynamic H and W every branch sum was refused (sizes not provably equal)."""
    check_export_fuses(*net_c_size, dynamo=False, opset=17, dynamic_hw=True, constant_folding=constant_folding)


@settings(max_examples=6, **SETTINGS)
@given(nets())
def test_torchscript_export_without_constant_folding_fuses(net_c_size):
    check_export_fuses(*net_c_size, dynamo=False, opset=17, constant_folding=False)


@settings(max_examples=3, **DYNAMO)
@given(nets())
def test_dynamo_export_fuses(net_c_size):
    check_export_fuses(*net_c_size, dynamo=True, opset=18)


@pytest.mark.slow
@settings(max_examples=200, **SETTINGS)
@given(nets(), st.sampled_from([13, 15, 17, 19, 20]))
def test_torchscript_export_fuses_many(net_c_size, opset):
    check_export_fuses(*net_c_size, dynamo=False, opset=opset)


@pytest.mark.slow
@settings(max_examples=25, **DYNAMO)
@given(nets(), st.sampled_from([18, 20, 21]))
def test_dynamo_export_fuses_many(net_c_size, opset):
    check_export_fuses(*net_c_size, dynamo=True, opset=opset)


def test_training_mode_export_is_converted_and_fused():
    """A TrainingMode.TRAINING export: 3-output BatchNormalization with training_mode=1 is converted."""
    net = Net([Block(["conv3", "conv1", "bn"], 4, 1)], "relu").train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # running statistics stay what they are while the exporter traces
            m.running_var.fill_(1.5)
    x = torch.randn(2, 4, 6, 6)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=15, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.TRAINING, input_names=["x"])
        model = onnx.load(str(path))
        assert any(a.name == "training_mode" and a.i == 1 for n in model.graph.node for a in n.attribute)
        fused, report = reparam.onnx.fuse(path, report=True)
        reference = reparam.onnx.inference_form(path)
    assert len(report.bn_converted) == 3
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert max_rel_error(reference, fused, {"x": x.numpy()}) < 2e-5
    with torch.no_grad():
        expected = net.eval()(x).numpy()  # inference form == eval mode with the same running statistics
    np.testing.assert_allclose(session(fused).run(None, {"x": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)
