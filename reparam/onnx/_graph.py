"""Graph facts the translation needs: inferred shapes, constant values, uses (explicit and from subgraphs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .errors import one_line
from .io import skeleton

DEFAULT_DOMAINS = ("", "ai.onnx")
# element types a fused value may have: Conv and Gemm exist for these in opsets 13-21 (not for bfloat16,
# so bfloat16 values stay opaque rather than be rewritten into an invalid Conv)
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """Element type (ONNX enum, None if unknown) and shape (None if the rank is unknown)."""

    elem_type: int | None
    shape: tuple[Dim, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES

    @property
    def channels(self) -> int | None:
        if self.shape is None or len(self.shape) < 2 or not isinstance(self.shape[1], int):
            return None
        return self.shape[1]

    @property
    def ndim(self) -> int | None:
        """Spatial dims under the NC... layout (0 for a [N, C] matrix)."""
        return None if self.shape is None or len(self.shape) < 2 else len(self.shape) - 2

    @property
    def np_dtype(self):
        return FLOAT_TYPES.get(self.elem_type)


UNKNOWN = TensorInfo(None, None)


def _info_of(vi: onnx.ValueInfoProto) -> TensorInfo:
    if not vi.type.HasField("tensor_type"):
        return UNKNOWN
    tt = vi.type.tensor_type
    elem = tt.elem_type or None
    if not tt.HasField("shape"):
        return TensorInfo(elem, None)
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(elem, tuple(dims))


def infer_info(model: onnx.ModelProto) -> tuple[dict[str, TensorInfo], str | None]:
    """Types and shapes of the main graph's values after ONNX shape inference (on a weight-free skeleton).

    Returns the map and, when inference failed, why (the map then holds only what the model declared).
    """
    light = skeleton(model)
    problem = None
    try:
        light = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as err:
        problem = one_line(err, 200)
    infos: dict[str, TensorInfo] = {}
    g = light.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        infos[vi.name] = _info_of(vi)
    for t in g.initializer:
        infos.setdefault(t.name, TensorInfo(t.data_type, tuple(int(d) for d in t.dims)))
    return infos, problem


def const_value(t: gs.Tensor, graph_inputs: set[str]) -> np.ndarray | None:
    """The value of ``t`` if it is an initializer or a Constant node's output, possibly through Identity
    nodes (not a graph input, which the caller may override)."""
    if t.is_empty() or t.name in graph_inputs:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.domain not in (None, *DEFAULT_DOMAINS):
        return None
    if node.op == "Identity" and node.inputs:  # the TorchScript exporter aliases equal initializers this way
        return const_value(node.inputs[0], graph_inputs)
    if node.op != "Constant":
        return None
    a = node.attrs
    if "value" in a and isinstance(a["value"], gs.Constant):
        return np.asarray(a["value"].values)
    if "value_float" in a:
        return np.asarray(a["value_float"], np.float32)
    if "value_floats" in a:
        return np.asarray(a["value_floats"], np.float32)
    if "value_int" in a:
        return np.asarray(a["value_int"], np.int64)
    if "value_ints" in a:
        return np.asarray(a["value_ints"], np.int64)
    return None


def free_names(graph: gs.Graph) -> set[str]:
    """Names a (sub)graph reads without defining them: outer-scope values it captures."""
    defined = {t.name for t in graph.inputs} | {o.name for n in graph.nodes for o in n.outputs}
    used: set[str] = set()
    for n in graph.nodes:
        used.update(t.name for t in n.inputs if not t.is_empty())
        for sub in n.subgraphs():
            used |= free_names(sub)
    return used - defined


def implicit_uses(graph: gs.Graph) -> dict[int, set[str]]:
    """For each node with subgraphs (by id): the outer values its subgraphs capture."""
    out = {}
    for n in graph.nodes:
        subs = list(n.subgraphs())
        if subs:
            names: set[str] = set()
            for sub in subs:
                names |= free_names(sub)
            out[id(n)] = names
    return out


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every value and node name in the model, subgraphs and functions included (to make fresh names)."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
            names.add(n.name)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        visit(sub)

    visit(model.graph)
    for f in model.functions:
        for n in f.node:
            names.update(n.output)
    return names


class Names:
    """Fresh, collision-free names for the tensors and nodes the rewrite creates."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = set(taken)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, *DEFAULT_DOMAINS)


__all__ = ["FLOAT_TYPES", "UNKNOWN", "Names", "TensorInfo", "all_names", "const_value", "free_names",
           "implicit_uses", "infer_info", "is_default_domain"]
