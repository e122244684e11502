"""Constant subgraphs evaluated before translation (issue 11, point 3) and the tf2onnx layout pattern.

Exporters compute some parameters in the graph (the TorchScript exporter's ``F.pad`` pads, without constant
folding also slice bounds); once onnx's reference evaluator has computed them, the Pad and the branch sum
after it fold.  Values that depend on a runtime input or a dynamic size are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_testlib import Builder, fuse_checked, ops, reasons

import reparam.onnx

C = 4


def _pads_subgraph(b: Builder, pads: list[int]) -> str:
    """pads computed the TorchScript way: ConstantOfShape + Concat + Reshape + Slice + Transpose + Cast."""
    zeros = b.node("ConstantOfShape", [b.const(np.array([4], np.int64))],
                   value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))
    spatial = b.node("Cast", [b.const_node(np.array(pads, np.float32))], to=TensorProto.INT64)
    both = b.node("Concat", [spatial, zeros], axis=0)
    grid = b.node("Reshape", [both, b.const(np.array([-1, 2], np.int64))])
    flipped = b.node("Slice", [grid, b.const(np.array([-1], np.int64)), b.const(np.array([-9], np.int64)),
                               b.const(np.array([0], np.int64)), b.const(np.array([-1], np.int64))])
    return b.node("Reshape", [b.node("Transpose", [flipped], perm=[1, 0]), b.const(np.array([-1], np.int64))])


def test_pad_with_computed_pads_folds_into_the_branch_sum():
    """Regression: 'Pad's pads are not a constant' kept the Pad and then refused the branch sum after it."""
    b = Builder()
    padded = b.node("Pad", ["x", _pads_subgraph(b, [1, 1, 1, 1])], mode="constant")
    y = b.node("Relu", [b.node("Add", [b.bn(b.conv(padded, C, C, pad=0, bias=False), C),
                                       b.bn(b.conv("x", C, C, k=1, bias=False), C)])])
    fused, report = fuse_checked(b.model([("x", ["N", C, 8, 8])], [(y, None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}, report.format()
    assert report.constants_folded and "constant subgraphs evaluated with onnx.reference" in report.format()


def test_shape_of_a_fixed_size_value_is_folded_and_a_dynamic_one_is_not():
    b = Builder()
    h = b.node("Relu", ["x"])
    spatial = b.node("Shape", [h], start=2)  # static dims only, though the batch is dynamic
    size = b.node("ReduceSum", [b.node("Cast", [spatial], to=TensorProto.FLOAT)], keepdims=0)
    scale = b.node("Div", [b.const(np.float32(32.0)), size])
    y = b.node("Mul", [b.bn(b.conv(h, C, C), C), scale])  # 32 / (8 + 8): a scalar, so per channel
    fused, report = fuse_checked(b.model([("x", ["N", C, 8, 8])], [(y, None)]))
    assert ops(fused) == {"Relu": 1, "Conv": 1}, report.format()
    b2 = Builder()
    h2 = b2.node("Relu", ["x"])
    scale2 = b2.node("Cast", [b2.node("Shape", [h2], start=0, end=1)], to=TensorProto.FLOAT)  # the batch
    y2 = b2.node("Mul", [b2.bn(b2.conv(h2, C, C), C), scale2])
    fused2, report2 = fuse_checked(b2.model([("x", ["N", C, 8, 8])], [(y2, None)]))
    assert ops(fused2)["Mul"] == 1 and ops(fused2)["Shape"] == 1 and not report2.constants_folded


def test_folded_scalars_keep_rank_zero():
    """Regression: folded 0-d values came out 1-d (np.ascontiguousarray), breaking shape inference later."""
    b = Builder()
    k = b.node("Add", [b.const(np.array(1, np.int64)), b.const(np.array(0, np.int64))])  # a 0-d constant
    axes = b.node("Unsqueeze", [k, b.const(np.array([0], np.int64))])  # [1]: rank 1 only if k is 0-d
    pads = b.node("Concat", [b.const(np.zeros(2, np.int64)), axes, axes, b.const(np.zeros(2, np.int64)),
                             axes, axes], axis=0)
    padded = b.node("Pad", ["x", pads])
    y = b.node("Relu", [b.bn(b.conv(padded, C, C, pad=0), C)])
    fused, report = fuse_checked(b.model([("x", [1, C, 8, 8])], [(y, None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}, report.format()


def test_subgraph_reading_a_runtime_input_is_not_folded():
    b = Builder()
    scale = b.const(np.float32(2.0), "s")
    doubled = b.node("Mul", [scale, b.const(np.float32(1.5))])
    y = b.node("Mul", [b.bn(b.conv("x", C, C), C), doubled])
    model = b.model([("x", [1, C, 8, 8])], [(y, None)])
    model.graph.input.append(helper.make_tensor_value_info(scale, TensorProto.FLOAT, []))
    fused, report = fuse_checked(model)
    assert not report.constants_folded
    assert ops(fused)["Mul"] == 2 and [i.name for i in fused.graph.input] == ["x", scale]


# -- tf2onnx: an NHWC input behind a Transpose ---------------------------------------------------------------------


def _nhwc_repvgg(twin: bool = True) -> onnx.ModelProto:
    """What tf2onnx writes for a Keras RepVGG block on an NHWC input: the convs read Transpose(x), the BN-only
    branch is Mul/Add on x (per-channel on the last axis) followed by a Transpose of its own.  ``twin=False``:
    the convs read another value, so no Transpose of x is there to share."""
    b = Builder()
    t = b.node("Transpose", ["x" if twin else b.node("Relu", ["x"])], perm=[0, 3, 1, 2])
    k3 = b.conv(t, C, C)
    k1 = b.conv(t, C, C, k=1)
    ident = b.node("Add", [b.node("Mul", ["x", b.const(b.rng.uniform(0.5, 2, C).astype(np.float32))]),
                           b.const(b.weight(C))])
    y = b.node("Relu", [b.node("Add", [b.node("Add", [k3, k1]), b.node("Transpose", [ident], perm=[0, 3, 1, 2])])])
    return b.model([("x", ["N", 8, 8, C])], [(y, None)])


def test_nhwc_identity_branch_moves_after_the_shared_transpose():
    fused, report = fuse_checked(_nhwc_repvgg())
    assert ops(fused) == {"Transpose": 1, "Conv": 1, "Relu": 1}, report.format()
    assert report.transposes_shared == 1 and not report.refusals


def test_a_chain_without_a_twin_transpose_is_left_alone():
    fused, report = fuse_checked(_nhwc_repvgg(twin=False))
    assert report.transposes_shared == 0
    assert ops(fused)["Transpose"] == 2 and "per-channel" in reasons(report)


@pytest.mark.parametrize("do_constant_folding", [True, False])
def test_torchscript_pad_export_fuses_with_and_without_constant_folding(do_constant_folding, tmp_path):
    torch = pytest.importorskip("torch")
    import warnings

    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.k3, self.k1 = nn.Conv2d(C, C, 3, bias=False), nn.Conv2d(C, C, 1, bias=False)
            self.b3, self.b1, self.bid = nn.BatchNorm2d(C), nn.BatchNorm2d(C), nn.BatchNorm2d(C)

        def forward(self, x):
            return torch.relu(self.b3(self.k3(F.pad(x, (1, 1, 1, 1)))) + self.b1(self.k1(x)) + self.bid(x))

    net = nn.Sequential(Block(), Block()).eval()
    from reparam.testing.torch_checks import randomize_bn_

    randomize_bn_(net, seed=1)
    x = torch.randn(2, C, 8, 8)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          do_constant_folding=do_constant_folding, dynamic_axes={"x": {0: "N"}})
    model = onnx.load(str(path))
    fused, report = fuse_checked(model, tol=2e-5)
    assert ops(fused) == {"Conv": 2, "Relu": 2}, report.format()
    with torch.no_grad():
        expected = net(x).numpy()
    from onnx_testlib import session

    got = session(fused).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    assert reparam.onnx.compare(model, fused, dims={"N": 3}).ok


def test_a_subgraph_the_evaluator_cannot_run_is_kept_with_a_note(monkeypatch):
    from reparam.onnx import _fold

    def broken(*a, **k):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(_fold, "_evaluate", broken)
    b = Builder()
    padded = b.node("Pad", ["x", _pads_subgraph(b, [1, 1, 1, 1])], mode="constant")
    y = b.node("Relu", [b.bn(b.conv(padded, C, C, pad=0), C)])
    fused, report = fuse_checked(b.model([("x", [1, C, 8, 8])], [(y, None)]))
    assert ops(fused)["Pad"] == 1 and any("could not be evaluated" in n for n in report.notes)


def test_an_input_invalid_once_its_constants_are_evaluated_is_rejected():
    """Found by fuzzing: pads computed in the graph with the wrong count passed the checker (inference cannot
    see the value), and the fused output then failed it; now the input is rejected, naming the node."""
    b = Builder()
    padded = b.node("Pad", ["x", _pads_subgraph(b, [1] * 6)], mode="constant")  # 10 pads for a rank-4 input
    b.nodes[-1].name = "pad"
    y = b.node("Relu", [b.bn(b.conv(padded, C, C, pad=0), C)])
    model = b.model([("x", [1, C, 8, 8])], [(y, [1, C, 8, 8])])
    with pytest.raises(reparam.onnx.OnnxModelError,
                       match=r"^invalid ONNX model once its constant subgraphs are evaluated: node 'pad' \(Pad\)"):
        reparam.onnx.fuse(model)
