"""Hand-built ONNX graphs: every fused pattern and every refusal, checked through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_testlib import Builder, fuse_checked, max_rel_error, ops, random_feeds, reasons, session

import reparam.onnx

C = 4
X = ("x", ["N", C, 8, 8])


def _relu_out(b: Builder, v: str) -> str:
    return b.node("Relu", [v])


# -- Conv + BN and friends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [13, 15, 17, 19, 21])
def test_conv_bn(opset):
    b = Builder()
    y = b.bn(b.conv("x", C, 6), 6)
    fused, report = fuse_checked(b.model([X], [(y, None)], opset=opset))
    assert ops(fused) == {"Conv": 1}
    assert fused.graph.output[0].name == y
    assert [r.ops for r in report.regions] == [("Conv", "BatchNormalization")]


def test_conv_bn_weights_from_constant_nodes():
    b = Builder()
    y = _relu_out(b, b.bn(b.conv("x", C, C, const_node=True), C))
    fused, _ = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def test_parameters_through_identity_nodes():
    """The TorchScript exporter aliases equal initializers (e.g. two default BNs) through Identity nodes."""
    b = Builder()
    params = [b.node("Identity", [p]) for p in b.bn_params(C)]
    y = b.node("BatchNormalization", [b.conv("x", C, C, w=b.node("Identity", [b.const(b.weight(C, C, 3, 3))])),
                                      *params])
    fused, _ = fuse_checked(b.model([X], [(_relu_out(b, y), None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_bn_1d_3d(nd):
    b = Builder()
    y = b.bn(b.conv("x", C, 3, nd=nd), 3)
    fused, _ = fuse_checked(b.model([("x", [2, C] + [5] * nd)], [(y, None)]))
    assert ops(fused) == {"Conv": 1}


@pytest.mark.parametrize("auto_pad,stride", [("SAME_UPPER", 1), ("SAME_LOWER", 1), ("SAME_UPPER", 2),
                                             ("VALID", 1)])
def test_conv_auto_pad_bn(auto_pad, stride):
    b = Builder()
    y = b.bn(b.conv("x", C, C, k=(3, 2), stride=stride, auto_pad=auto_pad), C)
    fused, _ = fuse_checked(b.model([("x", [1, C, 7, 7])], [(y, None)]))
    assert ops(fused) == {"Conv": 1}


def test_bn_then_conv_bn_chain_and_mul_add():
    """Conv -> BN -> per-channel Mul/Add/Sub/Div constants of every accepted shape -> one conv."""
    b = Builder()
    v = b.bn(b.conv("x", C, C), C)
    v = b.node("Mul", [v, b.const(b.weight(C, 1, 1))])
    v = b.node("Add", [b.const(b.weight(1, C, 1, 1)), v])
    v = b.node("Sub", [v, b.const(np.float32(0.3))])
    v = b.node("Sub", [b.const(np.float32(1.5)), v])
    v = b.node("Div", [v, b.const(np.array([2.0], np.float32))])
    y = _relu_out(b, v)
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert report.regions[0].ops[-1] == "Div"


@pytest.mark.parametrize("shape", [(8,), (1, 1, 1, 8), (1, C, 8, 1), (2, C, 1, 1)])
def test_mul_by_non_per_channel_constant_is_refused(shape):
    b = Builder()
    v = b.node("Mul", [b.bn(b.conv("x", C, C), C), b.const(b.weight(*shape))])
    fused, report = fuse_checked(b.model([("x", [2, C, 8, 8])], [(v, None)]))
    assert ops(fused)["Mul"] == 1 and ops(fused)["Conv"] == 1 and "BatchNormalization" not in ops(fused)
    assert "per-channel" in reasons(report) or "broadcasts" in reasons(report)


def test_elementwise_only_region_is_left_alone():
    b = Builder()
    v = b.node("Mul", [_relu_out(b, "x"), b.const(np.float32(2))])
    y = b.node("Add", [v, b.const(np.float32(1))])
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Relu": 1, "Mul": 1, "Add": 1}
    assert not report.regions


# -- multi-branch blocks ------------------------------------------------------------------------------------


def _repvgg(b: Builder, x: str, c: int, use_sum: bool = False) -> str:
    k3 = b.bn(b.conv(x, c, c, bias=False), c)
    k1 = b.bn(b.conv(x, c, c, k=1, bias=False), c)
    idb = b.bn(x, c)
    if use_sum:
        return b.node("Sum", [k3, k1, idb])
    return b.node("Add", [b.node("Add", [k3, k1]), idb])


@pytest.mark.parametrize("use_sum", [False, True])
def test_repvgg_block(use_sum):
    b = Builder()
    y = _relu_out(b, _repvgg(b, _relu_out(b, _repvgg(b, "x", C, use_sum)), C, use_sum))
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Conv": 2, "Relu": 2}
    assert report.convs_before == 4 and report.convs_after == 2 and not report.refusals


def test_identity_branch_and_avgpool_branch():
    b = Builder()
    pool = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    v = b.node("Add", [b.node("Add", [b.conv("x", C, C), "x"]), pool])
    fused, _ = fuse_checked(b.model([X], [(_relu_out(b, v), None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def test_avgpool_without_counting_padding_is_refused():
    b = Builder()
    pool = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    v = b.node("Add", [b.conv("x", C, C), pool])
    fused, report = fuse_checked(b.model([X], [(v, None)]))
    assert ops(fused)["AveragePool"] == 1
    assert "count_include_pad" in reasons(report)


def test_identity_and_dropout_nodes_are_identities():
    b = Builder()
    d = b.node("Dropout", [b.node("Identity", ["x"]), b.const(np.float32(0.5)), b.const(np.array(False))])
    y = _relu_out(b, b.node("Add", [b.conv("x", C, C), d]))
    fused, _ = fuse_checked(b.model([X], [(y, None)], opset=13))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def test_identity_chain_is_wired_through():
    b = Builder()
    y = _relu_out(b, b.node("Identity", [b.node("Identity", [_relu_out(b, "x")])]))
    fused, _ = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Relu": 2}


def test_identity_chain_to_graph_output_keeps_the_name():
    b = Builder()
    y = b.node("Identity", [b.node("Identity", [_relu_out(b, "x")])])
    fused, _ = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Relu": 1, "Identity": 1}


def test_one_by_one_then_kxk_chain():
    b = Builder()
    y = _relu_out(b, b.bn(b.conv(b.conv("x", C, C, k=1, bias=False), C, C), C))
    fused, _ = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def test_one_by_one_with_bias_before_padded_conv_is_refused():
    b = Builder()
    y = _relu_out(b, b.conv(b.bn(b.conv("x", C, C, k=1), C), C, C))
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Conv": 2, "Relu": 1}
    assert "bias" in reasons(report)


def test_bn_before_padded_conv_is_refused():
    b = Builder()
    y = _relu_out(b, b.conv(b.bn("x", C), C, C))
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"BatchNormalization": 1, "Conv": 1, "Relu": 1}
    assert any(r.op == "Conv" and "pads" in r.reason for r in report.refusals)


def test_bn_before_unpadded_conv_folds():
    b = Builder()
    y = _relu_out(b, b.conv(b.bn("x", C), C, C, k=1))
    fused, _ = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def test_broadcasting_add_is_not_a_branch_sum():
    b = Builder()
    gap = b.conv(b.node("GlobalAveragePool", ["x"]), C, C, k=1)
    y = _relu_out(b, b.node("Add", [b.bn(b.conv("x", C, C), C), gap]))
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Conv": 2, "GlobalAveragePool": 1, "Add": 1, "Relu": 1}
    assert "broadcast" in reasons(report)


def test_grouped_and_dilated_branches():
    b = Builder()
    a = b.bn(b.conv("x", C, C, groups=2, bias=False), C)
    d = b.bn(b.conv("x", C, C, k=3, dilation=2, bias=False), C)
    e = b.bn(b.conv("x", C, C, k=1, groups=C, bias=False), C)
    y = _relu_out(b, b.node("Sum", [a, d, e]))
    fused, _report = fuse_checked(b.model([X], [(y, None)]), allow_costlier=True)
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def _misaligned(shape) -> onnx.ModelProto:
    """k=3 pad 1 and k=2 pad 0 at stride 2: output sizes agree for even input sizes only."""
    b = Builder()
    y = _relu_out(b, b.node("Add", [b.conv("x", C, C, k=3, pad=1, stride=2), b.conv("x", C, C, k=2, pad=0, stride=2)]))
    out = [shape[0], C] + [None if isinstance(d, str) else (d + 1) // 2 for d in shape[2:]]
    return b.model([("x", shape)], [(y, [d if d is not None else f"o{k}" for k, d in enumerate(out)])])


def test_misaligned_windows_are_refused_on_dynamic_sizes():
    """Output sizes floor((H+1)/2) and floor(H/2) differ for odd H: not provably one shape, not summed."""
    fused, report = fuse_checked(_misaligned(["N", C, "H", "W"]))
    assert ops(fused)["Conv"] == 2
    assert "not provably a same-shape branch sum" in reasons(report)


def test_dynamic_spatial_sizes_still_fuse_aligned_branches():
    """Regression: with symbolic H, W shape inference names each Conv output anew, so every RepVGG sum was
    refused as 'not provably the same shape'; the frontend now follows sizes through the linear ops."""
    b = Builder()
    y = _relu_out(b, _repvgg(b, _relu_out(b, _repvgg(b, "x", C)), C))
    fused, report = fuse_checked(b.model([("x", ["N", C, "H", "W"])], [(y, ["N", C, "H", "W"])]))
    assert ops(fused) == {"Conv": 2, "Relu": 2}, report.format()
    assert not report.fixed_size_regions
    assert max_rel_error(b.model([("x", ["N", C, "H", "W"])], [(y, ["N", C, "H", "W"])]), fused,
                         {"x": np.random.default_rng(0).standard_normal((2, C, 7, 5)).astype(np.float32)}) < 1e-5


def test_windows_aligned_at_the_fixed_size_are_summed():
    """Static shapes: at input size 8 both branches give 4 outputs, so the sum is one conv there."""
    fused, report = fuse_checked(_misaligned(["N", C, 8, 8]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert report.regions[0].fixed_sizes == ("8x8",) and report.fixed_size_regions == report.regions
    assert "exact at the fixed input size 8x8" in report.format()


# -- Pad ------------------------------------------------------------------------------------------------------


def _pad(b: Builder, x: str, mode: str, pads=(0, 0, 1, 1, 0, 0, 1, 1), value=None) -> str:
    ins = [x, b.const(np.array(pads, np.int64))]
    if value is not None:
        ins.append(b.const(np.float32(value)))
    return b.node("Pad", ins, mode=mode)


def test_zero_pad_folds_into_conv():
    b = Builder()
    y = _relu_out(b, b.bn(b.conv(_pad(b, "x", "constant", value=0.0), C, C, pad=0), C))
    fused, _ = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


@pytest.mark.parametrize("mode,opset", [("reflect", 17), ("edge", 17), ("wrap", 19)])
def test_non_zero_pad_modes_fold_into_branch_sum(mode, opset):
    b = Builder()
    k3 = b.bn(b.conv(_pad(b, "x", mode), C, C, pad=0), C)
    k1 = b.bn(b.conv("x", C, C, k=1), C)
    y = _relu_out(b, b.node("Add", [k3, k1]))
    fused, _ = fuse_checked(b.model([X], [(y, None)], opset=opset))
    assert ops(fused) == {"Pad": 1, "Conv": 1, "Relu": 1}
    pad = next(n for n in fused.graph.node if n.op_type == "Pad")
    assert helper.get_attribute_value(pad.attribute[0]).decode() == mode


def test_pad_with_nonzero_value_or_on_channels_is_refused():
    b = Builder()
    v1 = b.conv(_pad(b, "x", "constant", value=1.0), C, C, pad=0)
    v2 = b.conv(_pad(b, "x", "constant", pads=(0, 1, 0, 0, 0, 0, 0, 0)), C + 1, C, k=1, pad=0)
    fused, report = fuse_checked(b.model([X], [(v1, None), (v2, None)]))
    assert ops(fused)["Pad"] == 2
    assert "constant value" in reasons(report) and "channel axis" in reasons(report)


def test_pad_with_axes_input():
    b = Builder()
    p = b.node("Pad", ["x", b.const(np.array([1, 1, 1, 1], np.int64)), b.const(np.float32(0)),
                       b.const(np.array([2, 3], np.int64))])
    y = _relu_out(b, b.bn(b.conv(p, C, C, pad=0), C))
    fused, _ = fuse_checked(b.model([X], [(y, None)], opset=18))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


# -- BatchNormalization modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [14, 15, 21])
def test_training_bn_with_unused_statistics_is_converted(opset):
    b = Builder()
    y, _m, _v = b.node("BatchNormalization", [b.conv("x", C, C), *b.bn_params(C)], n_out=3, training_mode=1)
    y = _relu_out(b, y)
    model = b.model([X], [(y, None)], opset=opset)
    ref = reparam.onnx.inference_form(model)
    assert ops(ref)["BatchNormalization"] == 1
    fused, report = fuse_checked(model, reference=ref)
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert len(report.bn_converted) == 1 and "training-mode" in report.format()


def test_training_bn_opset13_five_outputs():
    b = Builder()
    outs = b.node("BatchNormalization", [b.conv("x", C, C), *b.bn_params(C)], n_out=5)
    model = b.model([X], [(_relu_out(b, outs[0]), None)], opset=13)
    fused, report = fuse_checked(model, reference=reparam.onnx.inference_form(model))
    assert ops(fused) == {"Conv": 1, "Relu": 1} and report.bn_converted


def test_training_bn_with_used_statistics_is_refused():
    b = Builder()
    y, m, _v = b.node("BatchNormalization", [b.conv("x", C, C), *b.bn_params(C)], n_out=3, training_mode=1)
    model = b.model([X], [(_relu_out(b, y), None), (m, [C])], opset=15)
    fused, report = reparam.onnx.fuse(model, report=True)
    onnx.checker.check_model(fused, full_check=True)
    assert ops(fused) == ops(model)
    assert not report.bn_converted and "training mode" in reasons(report)
    feeds = random_feeds(model)
    for a, c in zip(session(model).run(None, feeds), session(fused).run(None, feeds)):
        np.testing.assert_array_equal(a, c)


def test_bn_with_non_constant_parameters_is_refused():
    b = Builder()
    _g, beta, mean, var = b.bn_params(C)
    y = b.node("BatchNormalization", [b.conv("x", C, C), "scale", beta, mean, var])
    model = b.model([X, ("scale", [C])], [(y, None)])
    fused, report = fuse_checked(model)
    assert ops(fused)["BatchNormalization"] == 1 and "'scale' is a graph input, not a constant" in reasons(report)


# -- ConvTranspose, Gemm, MatMul ------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_bn(groups):
    b = Builder()
    w = b.const(b.weight(C, 6 // groups, 3, 3))
    ct = b.node("ConvTranspose", ["x", w, b.const(b.weight(6))], kernel_shape=[3, 3], strides=[2, 2],
                pads=[1, 1, 1, 1], output_padding=[1, 1], group=groups)
    y = _relu_out(b, b.node("Mul", [b.bn(ct, 6), b.const(b.weight(6, 1, 1))]))
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"ConvTranspose": 1, "Relu": 1}
    assert report.regions[0].ops == ("ConvTranspose", "BatchNormalization", "Mul")


@pytest.mark.parametrize("trans_b,alpha,beta,c_shape", [(0, 1.0, 1.0, (5,)), (1, 0.5, 2.0, (1, 5)),
                                                        (1, 1.0, 1.0, None)])
def test_gemm_bn(trans_b, alpha, beta, c_shape):
    b = Builder()
    w = b.weight(*((5, C) if trans_b else (C, 5)))
    ins = ["x", b.const(w)] + ([b.const(b.weight(*c_shape))] if c_shape else [])
    g = b.node("Gemm", ins, transB=trans_b, alpha=alpha, beta=beta)
    y = _relu_out(b, b.bn(g, 5))
    fused, _ = fuse_checked(b.model([("x", ["N", C])], [(y, None)]))
    assert ops(fused) == {"Gemm": 1, "Relu": 1}


def test_matmul_add_bn_becomes_one_gemm():
    b = Builder()
    v = b.node("Add", [b.node("MatMul", ["x", b.const(b.weight(C, 5))]), b.const(b.weight(5))])
    y = _relu_out(b, b.bn(v, 5))
    fused, _ = fuse_checked(b.model([("x", ["N", C])], [(y, None)]))
    assert ops(fused) == {"Gemm": 1, "Relu": 1}


def test_gemm_with_identity_branch():
    b = Builder()
    y = _relu_out(b, b.node("Add", [b.bn(b.node("Gemm", ["x", b.const(b.weight(C, C))]), C), b.bn("x", C)]))
    fused, _ = fuse_checked(b.model([("x", ["N", C])], [(y, None)]))
    assert ops(fused) == {"Gemm": 1, "Relu": 1}


def test_per_channel_affine_of_a_matrix_stays_elementwise():
    """BN -> Mul -> Add on [N, C] is one per-channel affine: written as Mul + Add, not a dense C x C Gemm."""
    b = Builder()
    v = b.node("Add", [b.node("Mul", [b.bn("x", C), b.const(b.weight(C))]), b.const(b.weight(1, C))])
    fused, _ = fuse_checked(b.model([("x", ["N", C])], [(_relu_out(b, v), None)]))
    assert ops(fused) == {"Mul": 1, "Add": 1, "Relu": 1}


def test_matmul_on_rank3_and_gemm_trans_a_are_refused():
    b = Builder()
    m = b.node("Mul", [b.node("MatMul", ["x", b.const(b.weight(C, C))]), b.const(np.float32(2))])
    g = b.bn(b.node("Gemm", ["z", b.const(b.weight(C, C))], transA=1), C)
    fused, report = fuse_checked(b.model([("x", [2, 3, C]), ("z", [C, 2])], [(m, None), (g, None)]))
    assert ops(fused) == ops(b.model([("x", [2, 3, C]), ("z", [C, 2])], [(m, None), (g, None)]))
    assert "last axis" in reasons(report) and "transA" in reasons(report)


# -- sharing, subgraphs, immutability -------------------------------------------------------------------------


def test_shared_weight_is_not_mutated():
    b = Builder()
    w = b.const(b.weight(C, C, 3, 3), "shared")
    y1 = _relu_out(b, b.bn(b.conv("x", C, C, w=w), C))
    y2 = _relu_out(b, b.conv("x", C, C, w=w))
    model = b.model([X], [(y1, None), (y2, None)])
    fused, _ = fuse_checked(model)
    inits = {t.name: t for t in fused.graph.initializer}
    orig = next(t for t in model.graph.initializer if t.name == w)
    assert inits[w].SerializeToString() == orig.SerializeToString()
    users = [n for n in fused.graph.node if w in n.input]
    assert len(users) == 1
    assert ops(fused) == {"Conv": 2, "Relu": 2}


def test_value_captured_by_subgraph_is_kept():
    """An If branch reads the conv output inside a Conv->BN region: the conv must stay materialized."""
    b = Builder()
    conv = b.conv("x", C, C)
    y = _relu_out(b, b.bn(conv, C))
    then_g = helper.make_graph([helper.make_node("Relu", [conv], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", [y], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    b.nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g))
    model = b.model([X, ("cond", [], TensorProto.BOOL)], [(y, None), ("z", None)])
    fused, _report = reparam.onnx.fuse(model, report=True)
    onnx.checker.check_model(fused, full_check=True)
    if_node = next(n for n in fused.graph.node if n.op_type == "If")
    orig_if = next(n for n in model.graph.node if n.op_type == "If")
    assert if_node.SerializeToString() == orig_if.SerializeToString()
    feeds = random_feeds(model)
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        for a, c in zip(session(model).run(None, feeds), session(fused).run(None, feeds)):
            np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_region_inside_if_branch_is_left_untouched():
    inner = Builder(1)
    iy = inner.bn(inner.conv("x", C, C), C)
    then_g = helper.make_graph(inner.nodes, "then", [], [helper.make_tensor_value_info(iy, TensorProto.FLOAT, None)],
                               initializer=inner.inits)
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    b = Builder()
    b.nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g))
    model = b.model([X, ("cond", [], TensorProto.BOOL)], [("z", None)])
    fused = reparam.onnx.fuse(model)
    assert fused.graph.node[0].SerializeToString() == model.graph.node[0].SerializeToString()


def test_loop_body_reading_outer_initializer_and_value():
    """A Loop body captures an outer initializer and a value inside a fusable region; both must survive."""
    b = Builder()
    k = b.const(np.float32(0.5), "outer_k")
    conv = b.conv("x", C, C)
    y = _relu_out(b, b.bn(conv, C))
    body = helper.make_graph(
        [helper.make_node("Mul", [conv, k], ["prod"]), helper.make_node("Add", ["acc_in", "prod"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)])
    trips, init = b.const(np.array(3, np.int64)), b.node("Identity", [y])
    b.nodes.append(helper.make_node("Loop", [trips, "", init], ["acc"], body=body))
    model = b.model([X], [(y, None), ("acc", ["N", C, 8, 8])])
    fused, _ = fuse_checked(model)
    assert ops(fused)["Conv"] == 1  # the conv output is still needed by the body: BN stays after it
    assert k in {t.name for t in fused.graph.initializer}  # onnx-graphsurgeon alone would drop it


def test_model_local_functions_are_kept():
    b = Builder()
    y = b.bn(b.conv("x", C, C), C)
    b.nodes.append(helper.make_node("Twice", [y], ["z"], domain="local"))
    fn = helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, C, 8, 8])],
                              initializer=b.inits)
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                     helper.make_opsetid("local", 1)])
    model.ir_version = 10
    fused, _ = fuse_checked(model)
    assert ops(fused) == {"Conv": 1, "Twice": 1}
    assert fused.functions[0].SerializeToString() == fn.SerializeToString()


def test_dynamic_batch_stays_dynamic():
    b = Builder()
    y = _relu_out(b, _repvgg(b, "x", C))
    fused, _ = fuse_checked(b.model([X], [(y, ["N", C, 8, 8])]))
    dims = fused.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"
    assert fused.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    feeds = random_feeds(fused, dims={"N": 3})
    assert session(fused).run(None, feeds)[0].shape == (3, C, 8, 8)


def test_model_metadata_is_kept():
    b = Builder()
    model = b.model([X], [(b.bn(b.conv("x", C, C), C), None)])
    model.producer_name = "me"
    model.doc_string = "doc"
    helper.set_model_props(model, {"k": "v"})
    fused = reparam.onnx.fuse(model)
    assert (fused.producer_name, fused.doc_string, fused.ir_version) == ("me", "doc", model.ir_version)
    assert {p.key: p.value for p in fused.metadata_props} == {"k": "v"}
    assert list(fused.opset_import) == list(model.opset_import)


def test_float64_model():
    b = Builder()
    b.weight = lambda *s, scale=0.5: (b.rng.standard_normal(s) * scale)  # float64 weights
    b.bn_params = lambda c: [b.const(b.rng.uniform(0.5, 2, c)) for _ in range(4)]
    y = b.node("Add", [b.bn(b.conv("x", C, C, k=1), C), b.bn("x", C)])
    model = b.model([X], [(y, None)], dtype=TensorProto.DOUBLE)
    try:
        session(model)
    except Exception:  # pragma: no cover - depends on the ORT build
        pytest.skip("this ONNX Runtime build has no float64 Conv")
    fused, _ = fuse_checked(model, tol=1e-12)
    assert ops(fused) == {"Conv": 1}
    assert fused.graph.initializer[0].data_type == TensorProto.DOUBLE


def test_float16_model():
    b = Builder()
    b.weight = lambda *s, scale=0.5: (b.rng.standard_normal(s) * scale).astype(np.float16)
    b.bn_params = lambda c: [b.const(b.rng.uniform(0.5, 2, c).astype(np.float16)) for _ in range(4)]
    y = _relu_out(b, _repvgg(b, "x", C))
    fused, _ = fuse_checked(b.model([X], [(y, None)], dtype=TensorProto.FLOAT16), tol=5e-3)
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert {t.data_type for t in fused.graph.initializer} == {TensorProto.FLOAT16}


def test_report_formats():
    b = Builder()
    y = _relu_out(b, b.conv(b.bn(_repvgg(b, "x", C), C), C, C))
    _, report = reparam.onnx.fuse(b.model([X], [(y, None)]), report=True)
    text = report.format()
    assert "fused regions (1)" in text and "refused (1)" in text
    assert report.refused == [(r.node, r.reason) for r in report.refusals]
    _, report2 = reparam.onnx.fuse(b.model([X], [(y, None)]), return_report=True)  # the alias
    assert report2.summary() == report.summary()
    d = report.to_dict()
    assert d["regions"][0]["convs_before"] == 2 and d["regions"][0]["convs_after"] == 1
    assert report.ops_after["BatchNormalization"] == 0


def test_sizes_declared_only_in_value_info_are_not_trusted():
    """A dynamic input with value_info claiming 4x4 conv outputs: the graph does not fix the size, so the
    size-dependent sum stays refused (at H = 9 the branches would give 5 and 4 outputs)."""
    b = Builder()
    a = b.conv("x", C, C, k=3, pad=1, stride=2)
    c = b.conv("x", C, C, k=2, pad=0, stride=2)
    y = b.node("Relu", [b.node("Add", [a, c])])
    declared = [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["N", C, 4, 4]) for v in (a, c)]
    model = b.model([("x", ["N", C, "H", "W"])], [(y, ["N", C, 4, 4])], value_info=declared)
    fused, report = reparam.onnx.fuse(model, report=True)
    assert ops(fused)["Conv"] == 2 and not report.fixed_size_regions


def _identity_affine(b: Builder, x: str) -> str:
    """timm's LearnableAffineBlock at its initial values: x * 1 + 0 (an identity region)."""
    return b.node("Add", [b.node("Mul", [x, b.const(np.ones(1, np.float32))]), b.const(np.zeros(1, np.float32))])


def test_region_reading_an_identity_region_wired_through_earlier():
    """Regression (timm hgnetv2_b0): an identity region was wired through, then a later region's new conv
    still read its removed exit and the output was not a valid graph."""
    b = Builder()
    a = _identity_affine(b, b.node("Relu", ["x"]))
    y = b.node("Add", [b.node("Relu", [a]), b.bn(b.conv(a, C, C), C)])
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused)["Conv"] == 1 and "Mul" not in ops(fused), report.format()


def test_pad_region_without_a_conv_stays_a_pad():
    """Regression (hgnetv2_b0's stem): Mul(1), Add(0), Pad before a MaxPool became a padding Conv; it is the
    Pad alone (the affine is the identity), which then folds into the MaxPool (a Relu output); with a real
    scale the region is kept, with the reason."""
    b = Builder()
    pads = b.const(np.array([0, 0, 1, 1] * 2, np.int64))
    padded = b.node("Pad", [_identity_affine(b, b.node("Relu", ["x"])), pads])
    fused, report = fuse_checked(b.model([X], [(b.node("MaxPool", [padded], kernel_shape=[2, 2]), None)]))
    assert ops(fused) == {"Relu": 1, "MaxPool": 1}, report.format()
    assert report.pads_into_pools == 1
    b = Builder()
    scaled = b.node("Mul", [b.node("Relu", ["x"]), b.const(np.full(1, 2.0, np.float32))])
    padded = b.node("Pad", [scaled, b.const(np.array([0, 0, 1, 1] * 2, np.int64))])
    fused, report = fuse_checked(b.model([X], [(b.node("MaxPool", [padded], kernel_shape=[2, 2]), None)]))
    assert ops(fused)["Conv"] == 0 and ops(fused)["Pad"] == 1 and ops(fused)["Mul"] == 1
    assert "would run a conv where the graph runs none" in reasons(report)


def test_bn_only_and_identity_branches_become_mul_add_not_a_conv():
    """x + BN(x) (and BN-only sums): a per-channel affine; written as Mul/Add, since a depthwise conv would
    run a conv where the graph runs none, and the BatchNormalization goes."""
    b = Builder()
    y = b.node("Relu", [b.node("Add", [b.node("Add", ["x", b.bn("x", C)]), b.bn("x", C)])])
    fused, report = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Mul": 1, "Add": 1, "Relu": 1}, report.format()
    b = Builder()
    y = b.node("Relu", [b.node("Add", ["x", b.bn("x", C)])])
    fused, _ = fuse_checked(b.model([X], [(y, None)]))
    assert ops(fused) == {"Mul": 1, "Add": 1, "Relu": 1}
