"""Strict input validation and runtime initializers (issue 11, points 1 and 2).

Inputs that pass ``onnx.checker.check_model`` but fail its full check (or strict shape inference) are
rejected with one line naming the node, from the API and the command line, and nothing is written.  An
initializer that is also a graph input is a runtime input: never folded, never removed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_testlib import Builder, fuse_checked, ops, random_feeds, reasons, session

import reparam.onnx
from reparam.cli import main
from reparam.onnx import OnnxModelError

C = 4


def _model(kind: str) -> onnx.ModelProto:
    """A graph that passes the plain checker but not the full one; the bad node is named ``bad``."""
    b = Builder()
    w = b.const(b.weight(C, C, 3, 3))
    out_type = TensorProto.FLOAT
    if kind == "stride0":
        y = b.node("Conv", ["x", w], kernel_shape=[3, 3], strides=[0, 1], pads=[1, 1, 1, 1])
    elif kind == "dilation0":
        y = b.node("Conv", ["x", w], kernel_shape=[3, 3], dilations=[0, 1], pads=[1, 1, 1, 1])
    elif kind == "negative_pads":
        y = b.node("Conv", ["x", w], kernel_shape=[3, 3], pads=[-1, 1, 1, 1])
    elif kind == "bn_scale_length":
        p = b.bn_params(C)
        p[0] = b.const(np.ones(C - 1, np.float32))
        y = b.node("BatchNormalization", [b.conv("x", C, C), *p])
    elif kind == "int64_mul":
        y = b.node("Mul", [b.conv("x", C, C), b.const(np.ones((C, 1, 1), np.int64))])
    elif kind == "add_mismatch":
        y = b.node("Add", [b.conv("x", C, C), b.conv("x", C, C, k=1, stride=2)])
    elif kind == "output_dtype":
        y = b.node("Relu", [b.conv("x", C, C)])
        out_type = TensorProto.INT64
    elif kind == "int64_weight":
        y = b.node("Conv", ["x", b.const(np.ones((C, C, 3, 3), np.int64))], kernel_shape=[3, 3], pads=[1] * 4)
    elif kind == "float16_weight":
        y = b.node("Conv", ["x", b.const(np.ones((C, C, 3, 3), np.float16))], kernel_shape=[3, 3], pads=[1] * 4)
    else:
        raise AssertionError(kind)
    b.nodes[-1].name = "bad"
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info(y, out_type, ["a", "b", "c", "d"])], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)  # the plain check passes ...
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(model, full_check=True)  # ... the full one does not
    return model


KINDS = ["stride0", "dilation0", "negative_pads", "bn_scale_length", "int64_mul", "add_mismatch", "output_dtype",
         "int64_weight", "float16_weight"]


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_graphs_are_rejected_naming_the_node(kind):
    with pytest.raises(OnnxModelError, match=r"^invalid ONNX model: node 'bad' \(\w+\): ") as exc:
        reparam.onnx.fuse(_model(kind))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("kind", ["stride0", "int64_weight", "output_dtype"])
def test_invalid_graphs_fail_the_command_with_one_line_and_no_output(kind, tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save_model(_model(kind), str(src))
    rc = main(["onnx", str(src), str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "node 'bad'" in err
    assert not (tmp_path / "out.onnx").exists()


def test_a_weight_of_another_dtype_is_an_error_not_a_cast():
    """Regression: a float16 Conv weight on float32 activations used to come out as a float32 graph."""
    with pytest.raises(OnnxModelError, match=r"inconsistent type tensor\(float16\)"):
        reparam.onnx.fuse(_model("float16_weight"))


def test_truncated_weight_data_is_rejected():
    b = Builder()
    y = b.bn(b.conv("x", C, 64), 64)  # a 64x4x3x3 weight: large enough to be left out of the skeleton
    model = b.model([("x", [1, C, 8, 8])], [(y, None)])
    w = next(t for t in model.graph.initializer if len(t.dims) == 4)
    w.raw_data = w.raw_data[:-4]
    with pytest.raises(OnnxModelError, match=f"initializer '{w.name}' has .* bytes of data"):
        reparam.onnx.fuse(model)


def test_output_that_would_fail_the_checker_is_never_returned(monkeypatch):
    """The output check is strict too: a broken rewrite is an internal error, not a written file."""
    import reparam.onnx.pipeline as pipeline

    real = pipeline._export

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out.graph.node[0].attribute.append(helper.make_attribute("strides", [0, 0]))
        return out

    monkeypatch.setattr(pipeline, "_export", broken)
    b = Builder()
    model = b.model([("x", [1, C, 8, 8])], [(b.node("Relu", [b.bn(b.conv("x", C, C), C)]), None)])
    with pytest.raises(reparam.core.ReparamError, match="internal error: the fused model fails the ONNX checker"):
        reparam.onnx.fuse(model)


# -- initializers that are graph inputs ------------------------------------------------------------------------


def _with_runtime_inputs(*which: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """conv(W) -> BN(var) -> relu, with the named parameters also declared as graph inputs."""
    b = Builder()
    w = b.const(b.weight(C, C, 3, 3), "W")
    gamma, beta, mean, var = b.bn_params(C)
    y = b.node("Relu", [b.node("BatchNormalization", [b.conv("x", C, C, w=w, bias=False), gamma, beta, mean, var])])
    model = b.model([("x", [1, C, 8, 8])], [(y, None)])
    names = {"W": w, "var": var}
    for key in which:
        t = next(t for t in model.graph.initializer if t.name == names[key])
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model, full_check=True)
    return model, names


@pytest.mark.parametrize("which", [("W",), ("var",), ("W", "var")])
def test_initializers_that_are_graph_inputs_stay_runtime_inputs(which):
    """Regression: a Conv weight or BN variance that a caller may feed was folded and its input removed."""
    model, names = _with_runtime_inputs(*which)
    fused, report = fuse_checked(model)
    assert [i.name for i in fused.graph.input] == [i.name for i in model.graph.input]
    assert ops(fused)["BatchNormalization"] == 1 and ops(fused)["Conv"] == 1
    assert "initializer that is also a graph input" in reasons(report)
    kept = {t.name: t for t in fused.graph.initializer}
    for key in which:
        orig = next(t for t in model.graph.initializer if t.name == names[key])
        assert kept[names[key]].SerializeToString() == orig.SerializeToString()
    # a caller feeding the input gets what the original computes with that value
    feeds = random_feeds(onnx.helper.make_model(onnx.helper.make_graph([], "g", [model.graph.input[0]], [])))
    rng = np.random.default_rng(3)
    for key in which:
        declared = next(i for i in model.graph.input if i.name == names[key])
        shape = [d.dim_value for d in declared.type.tensor_type.shape.dim]
        value = rng.uniform(0.5, 2.0, shape) if key == "var" else rng.standard_normal(shape)
        feeds[names[key]] = value.astype(np.float32)
    for a, c in zip(session(model).run(None, feeds), session(fused).run(None, feeds)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_other_regions_still_fuse_beside_a_runtime_input():
    model, _ = _with_runtime_inputs("W")
    b = Builder(7)
    b.k = 1000  # fresh names beside the first builder's
    extra = b.node("Relu", [b.bn(b.conv("x", C, C), C)])
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.inits)
    model.graph.output.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, [1, C, 8, 8]))
    fused, _ = fuse_checked(model)
    assert ops(fused)["BatchNormalization"] == 1 and ops(fused)["Conv"] == 2
