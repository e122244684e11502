"""Mutated graphs (attributes, wiring, weights, runtime inputs, deleted or retyped nodes): whatever the pass
accepts it returns as a model that passes the full checker, anything else is a ReparamError that is not an
internal error, and the input is never modified.  (Found: pads computed with the wrong count.)"""

from __future__ import annotations

import random
import warnings

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx_testlib import Builder
from test_onnx_constants import _nhwc_repvgg, _pads_subgraph

import reparam.onnx
from reparam.core.errors import ReparamError

C = 4


def _base(r: random.Random) -> onnx.ModelProto:
    b = Builder(r.randrange(1000))
    kind = r.randrange(4)
    if kind == 0:
        k3, k1 = b.bn(b.conv("x", C, C, bias=False), C), b.bn(b.conv("x", C, C, k=1, bias=False), C)
        y = b.node("Relu", [b.node("Add", [b.node("Add", [k3, k1]), b.bn("x", C)])])
        return b.model([("x", ["N", C, 8, 8])], [(y, None)])
    if kind == 1:
        padded = b.node("Pad", ["x", _pads_subgraph(b, [1, 1, 1, 1])], mode="constant")
        y = b.node("Relu", [b.node("Add", [b.bn(b.conv(padded, C, C, pad=0), C), b.bn(b.conv("x", C, C, k=1), C)])])
        return b.model([("x", ["N", C, 8, 8])], [(y, None)])
    if kind == 2:
        return _nhwc_repvgg()
    same = b.bn(b.conv("x", C, C, k=3, pad=[0, 0, 1, 1], stride=2), C)
    y = b.node("Relu", [b.node("Add", [same, b.bn(b.conv("x", C, C, k=1, stride=2), C)])])
    return b.model([("x", ["N", C, "H", "W"] if r.random() < 0.5 else [1, C, 8, 8])], [(y, None)])


def _mutate(model: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for _ in range(r.randint(1, 3)):
        op = r.randrange(6)
        if not g.node:
            break
        n = r.choice(list(g.node))
        if op == 0 and n.attribute:
            a = r.choice(list(n.attribute))
            if a.ints:
                a.ints[r.randrange(len(a.ints))] = r.choice([-1, 0, 1, 2, 3, 100])
            elif a.type == onnx.AttributeProto.INT:
                a.i = r.choice([-1, 0, 1, 2, 5])
        elif op == 1 and n.input:
            names = [i.name for i in g.input] + [t.name for t in g.initializer] + [o for k in g.node for o in k.output]
            n.input[r.randrange(len(n.input))] = r.choice(names)
        elif op == 2 and g.initializer:
            t = r.choice(list(g.initializer))
            a = onnx.numpy_helper.to_array(t).copy()
            if a.size:
                flat = a.reshape(-1)
                flat[r.randrange(flat.size)] = r.choice([np.nan, np.inf, 0, -1, 1e30]) if a.dtype.kind == "f" else 0
                t.CopyFrom(onnx.numpy_helper.from_array(flat.reshape(a.shape), t.name))
        elif op == 3 and g.initializer:
            t = r.choice(list(g.initializer))
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        elif op == 4:
            g.node.remove(n)
        elif op == 5:
            n.op_type = r.choice(["Mul", "Sub", "Identity", "Transpose", "Shape", "Pad"])
    return m


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31))
def test_mutated_graphs_give_a_valid_model_or_a_clear_error(seed):
    r = random.Random(seed)
    model = _mutate(_base(r), r)
    before = model.SerializeToString()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fused = reparam.onnx.fuse(model)
        except ReparamError as err:
            assert "internal error" not in str(err) and "\n" not in str(err)
        else:
            onnx.checker.check_model(fused, full_check=True)
    assert model.SerializeToString() == before
