"""Helpers for the ONNX frontend tests: small hand-built graphs and an equivalence check through ORT."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import reparam.onnx

FLOAT = TensorProto.FLOAT


class Builder:
    """Accumulates nodes and initializers; ``model()`` wraps them with the given inputs/outputs."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def const(self, value, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def const_node(self, value, base: str = "k") -> str:
        """A constant through a Constant node (not an initializer)."""
        name = self.name(base)
        self.nodes.append(helper.make_node("Constant", [], [name],
                                           value=numpy_helper.from_array(np.asarray(value), name + "_v")))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_node"), **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, *shape, scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def conv(self, x: str, cin: int, cout: int, k: int | tuple = 3, pad: int | list | None = None, stride: int = 1,
             groups: int = 1, bias: bool = True, dilation: int = 1, nd: int = 2, const_node: bool = False,
             w: str | None = None, **attrs) -> str:
        ks = (k,) * nd if isinstance(k, int) else tuple(k)
        if pad is None:
            pad = [dilation * (kk - 1) // 2 for kk in ks] * 2
        elif isinstance(pad, int):
            pad = [pad] * (2 * nd)
        make = self.const_node if const_node else self.const
        w = w or make(self.weight(cout, cin // groups, *ks), "W")
        ins = [x, w] + ([make(self.weight(cout), "B")] if bias else [])
        if "auto_pad" in attrs:
            return self.node("Conv", ins, kernel_shape=list(ks), strides=[stride] * nd, group=groups,
                             dilations=[dilation] * nd, **attrs)
        return self.node("Conv", ins, kernel_shape=list(ks), pads=list(pad), strides=[stride] * nd, group=groups,
                         dilations=[dilation] * nd, **attrs)

    def bn_params(self, c: int) -> list[str]:
        r = self.rng
        return [self.const(r.uniform(0.5, 2, c).astype(np.float32), "gamma"),
                self.const(r.uniform(-1, 1, c).astype(np.float32), "beta"),
                self.const(r.uniform(-1, 1, c).astype(np.float32), "mean"),
                self.const(r.uniform(0.5, 2, c).astype(np.float32), "var")]

    def bn(self, x: str, c: int, eps: float = 1e-5, **attrs) -> str:
        return self.node("BatchNormalization", [x, *self.bn_params(c)], epsilon=eps, **attrs)

    def model(self, inputs: list[tuple], outputs: list[tuple[str, list | None]], opset: int = 17,
              dtype: int = FLOAT, value_info=()) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(i[0], i[2] if len(i) > 2 else dtype, i[1]) for i in inputs],
            [helper.make_tensor_value_info(n, dtype, s) for n, s in outputs],
            initializer=self.inits, value_info=list(value_info))
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = min(m.ir_version, 10)
        if any(s is None for _, s in outputs):  # fill in output shapes by inference
            inferred = onnx.shape_inference.infer_shapes(m)
            known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
            for out, (_, s) in zip(m.graph.output, outputs):
                if s is None and known[out.name].type.tensor_type.HasField("shape"):
                    out.type.CopyFrom(known[out.name].type)
        onnx.checker.check_model(m, full_check=True)
        return m


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, seed: int = 0, dims: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 2)
                 for d in inp.type.tensor_type.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def max_rel_error(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str,
                  feeds: dict[str, np.ndarray]) -> float:
    """max|a - b| / max(1, max|a|) over every output."""
    a = session(reference).run(None, feeds)
    b = session(candidate).run(None, feeds)
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x64 - y64).max() / max(1.0, np.abs(x64).max())))
    return worst


def io_signature(model: onnx.ModelProto) -> list:
    return [(v.name, v.type.SerializeToString()) for v in list(model.graph.input) + list(model.graph.output)]


def fuse_checked(model: onnx.ModelProto, *, tol: float = 1e-5, reference: onnx.ModelProto | None = None,
                 seed: int = 0, **kwargs):
    """Fuse, then assert: input untouched, checker (full) and strict inference pass, same I/O, same outputs."""
    before = model.SerializeToString()
    fused, report = reparam.onnx.fuse(model, report=True, **kwargs)
    assert model.SerializeToString() == before, "fuse modified its input"
    onnx.checker.check_model(fused, full_check=True)
    onnx.shape_inference.infer_shapes(fused, strict_mode=True)
    assert io_signature(fused) == io_signature(model)
    err = max_rel_error(reference or model, fused, random_feeds(model, seed))
    assert err <= tol, f"max relative error {err:.3g} > {tol}"
    return fused, report


def reasons(report) -> str:
    return " | ".join(r.reason for r in report.refusals)
