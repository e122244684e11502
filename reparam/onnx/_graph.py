"""Graph facts the translation needs: inferred shapes, constant values, uses (explicit and from subgraphs)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from .errors import one_line

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


@dataclass
class Inferred:
    """What shape inference tells about the main graph's values.

    ``infos``: element types and shapes, the model's declared value_info included; ``spatial``: the spatial
    sizes (dims 2..) that the graph itself fixes, inferred from the graph inputs alone (declared value_info
    and output shapes left out, so a size only written into the model's annotations is never trusted).
    """

    infos: dict[str, TensorInfo]
    spatial: dict[str, tuple[int, ...]]
    problem: str | None = None

    def info(self, name: str) -> TensorInfo:
        return self.infos.get(name, UNKNOWN)


def _infer(light: onnx.ModelProto) -> tuple[onnx.GraphProto, str | None]:
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=True, data_prop=True).graph, None
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as err:
        return light.graph, one_line(err, 200)


def infer_info(light: onnx.ModelProto) -> Inferred:
    """Run shape inference on a weight-free skeleton (see :func:`reparam.onnx.io.skeleton`), twice: with the
    declared value_info, and from the inputs alone for the sizes the graph fixes."""
    g, problem = _infer(light)
    infos: dict[str, TensorInfo] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        infos[vi.name] = _info_of(vi)
    for t in g.initializer:
        infos.setdefault(t.name, TensorInfo(t.data_type, tuple(int(d) for d in t.dims)))
    bare = onnx.ModelProto()
    bare.CopyFrom(light)
    del bare.graph.value_info[:]
    for out in bare.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    gb, _ = _infer(bare)
    spatial = {}
    for vi in list(gb.value_info) + list(gb.input) + list(gb.output):
        shape = _info_of(vi).shape
        if shape is not None and len(shape) > 2 and all(isinstance(d, int) for d in shape[2:]):
            spatial[vi.name] = tuple(shape[2:])
    return Inferred(infos, spatial, problem)


def tensor_view(t: onnx.TensorProto, raw: bytes | None = None) -> np.ndarray:
    """An initializer's values as a read-only array over its raw little-endian data (``raw``: those bytes,
    already read) without a further copy."""
    if t.data_location != TensorProto.EXTERNAL and sys.byteorder == "little" and (raw is not None
                                                                                 or t.HasField("raw_data")):
        raw = t.raw_data if raw is None else raw
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if dtype.kind in "fiub" and dtype.itemsize * int(np.prod(t.dims, dtype=np.int64)) == len(raw):
            return np.frombuffer(raw, dtype).reshape(tuple(t.dims))
    return onnx.numpy_helper.to_array(t)


def const_value(t: gs.Tensor, graph_inputs: set[str], cache: dict | None = None,
                payloads: dict[str, bytes] | None = None) -> np.ndarray | None:
    """The value of ``t`` if it is an initializer or a Constant node's output, possibly through Identity
    nodes (not a graph input, which the caller may override).  ``cache`` keeps arrays read by name;
    ``payloads`` holds raw data already read (see :func:`reparam.onnx.io.check_payloads`)."""
    if t.is_empty() or t.name in graph_inputs:
        return None
    if isinstance(t, gs.Constant):
        if cache is not None and t.name in cache:
            return cache[t.name]
        lazy = t._values
        value = (tensor_view(lazy.tensor, (payloads or {}).get(t.name)) if isinstance(lazy, LazyValues)
                 else np.asarray(t.values))
        if cache is not None:
            cache[t.name] = value
        return value
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.domain not in (None, *DEFAULT_DOMAINS):
        return None
    if node.op == "Identity" and node.inputs:  # the TorchScript exporter aliases equal initializers this way
        return const_value(node.inputs[0], graph_inputs, cache, payloads)
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


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name read by a node of a subgraph nested in ``graph`` (at any depth)."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names.update(i for n in sub.node for i in n.input)
                names |= subgraph_reads(sub)
    return names


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


__all__ = ["FLOAT_TYPES", "UNKNOWN", "Inferred", "Names", "TensorInfo", "all_names", "const_value", "free_names",
           "implicit_uses", "infer_info", "is_default_domain", "subgraph_reads", "tensor_view"]
