"""Constant subgraphs evaluated before translation, with onnx's reference evaluator.

Exporters compute some parameters in the graph: the TorchScript exporter writes ``F.pad``'s pads as a small
subgraph (ConstantOfShape, Concat, Slice, Transpose, Reshape, Cast) and, without constant folding, slice
bounds too.  Such a value depends only on initializers and on shapes the graph fixes; once it is a constant,
the Pad (and the branch sum after it) can be folded.  This module only *selects* those subgraphs: the values
are computed by :class:`onnx.reference.ReferenceEvaluator`, onnx's own implementation of every operator.

A node is constant when it is a default-domain op without subgraphs and not random, and every input is a
constant: an initializer that is not a graph input (a caller may override that one), a ``Constant`` node's
output, the output of another constant node, or, for ``Shape`` and ``Size``, a value whose (selected)
dimensions the graph fixes.  A constant value read by a non-constant node is replaced by an initializer,
unless it is a graph output, is read inside a subgraph, is larger than :data:`MAX_ELEMENTS`, or needs no
evaluation (only ``Constant``/``Identity`` nodes lead to it; the translation reads through those).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from ._graph import DEFAULT_DOMAINS, Inferred, subgraph_reads
from .errors import one_line

#: largest tensor (elements) a folded subgraph may read from an initializer or produce
MAX_ELEMENTS = 1 << 20
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli", "Dropout"})
PASSIVE_OPS = frozenset({"Constant", "Identity"})


@dataclass
class Folded:
    """Values to replace by initializers, and how many nodes their subgraphs had."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: int = 0
    problem: str | None = None  # why a subgraph could not be evaluated (it is then kept as it is)


def _elements(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64))


def _selected_dims(node: onnx.NodeProto, shape: tuple) -> tuple:
    """The dims a Shape node reports (its start/end attributes, clamped as the operator does)."""
    if node.op_type == "Size":
        return shape
    attrs = {a.name: a.i for a in node.attribute}
    r = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", r)
    start, end = (v + r if v < 0 else v for v in (start, end))
    return shape[max(0, min(r, start)):max(0, min(r, end))]


def fold_constants(light: onnx.ModelProto, src: onnx.ModelProto, inferred: Inferred, runtime: set[str],
                   infer, rounds: int = 100) -> tuple[Folded, onnx.ModelProto, Inferred]:
    """Fold constant subgraphs round by round: a folded Pad gives the next layer a known shape, whose
    ``Shape`` may then fold in turn.  Returns what was folded, the skeleton with it, and its inference."""
    inits = {t.name: t for t in src.graph.initializer if t.name not in runtime}
    total = Folded()
    current = light
    for _ in range(rounds):
        new = constant_subgraphs(current, inits, inferred)
        total.problem = total.problem or new.problem
        if not new.values:
            break
        total.values.update(new.values)
        total.nodes += new.nodes
        inits.update({k: onnx.numpy_helper.from_array(np.array(v, order="C"), k) for k, v in new.values.items()})
        current = with_constants(light, total.values)
        inferred = infer(current)
    return total, current, inferred


def constant_subgraphs(model: onnx.ModelProto, inits: dict[str, TensorProto], inferred: Inferred) -> Folded:
    """Select the constant subgraphs of ``model``'s main graph and evaluate the values they feed out
    (``inits``: the initializers that are not graph inputs, by name)."""
    g = model.graph
    outer = subgraph_reads(g)
    const: set[str] = {n for n, t in inits.items() if _elements(t) <= MAX_ELEMENTS}
    passive: set[str] = set(const)  # constants needing no evaluation
    cone: list[onnx.NodeProto] = []
    shape_feeds: dict[str, tuple[int, ...]] = {}
    for node in g.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type in RANDOM_OPS:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size") and len(ins) == 1 and ins[0] not in const:
            shape = inferred.info(ins[0]).shape
            if shape is None or not all(isinstance(d, int) for d in _selected_dims(node, shape)):
                continue
            shape_feeds[ins[0]] = tuple(d if isinstance(d, int) else 1 for d in shape)  # unselected: any size
        elif not all(i in const for i in ins):
            continue
        if not all(inferred.info(o).elem_type not in (None, TensorProto.UNDEFINED) for o in node.output if o):
            continue  # a sequence, optional or untyped output
        cone.append(node)
        const.update(o for o in node.output if o)
        if node.op_type in PASSIVE_OPS and all(i in passive for i in ins):
            passive.update(o for o in node.output if o)
    if not cone:
        return Folded()
    produced = {o for n in cone for o in n.output if o}
    single = {n.output[0] for n in cone if len([o for o in n.output if o]) == 1 and n.output[0]}
    readers: dict[str, bool] = {}
    cone_ids = {id(n) for n in cone}
    for node in g.node:
        if id(node) not in cone_ids:
            for i in node.input:
                if i in produced:
                    readers[i] = True
    graph_outputs = {o.name for o in g.output}
    wanted = [v for v in produced if readers.get(v) and v in single and v not in passive and v not in graph_outputs
              and v not in outer and _fits(inferred, v)]
    if not wanted:
        return Folded()
    try:
        values = _evaluate(model, cone, inits, shape_feeds, wanted, inferred)
    except Exception as err:  # the reference implementation raises plain exceptions; keep the subgraphs
        return Folded(problem=f"the constant subgraph computing {wanted[0]!r} could not be evaluated "
                              f"({one_line(err, 200)}); it is kept")
    needed = _needed(cone, set(values))
    return Folded(values, len(needed))


def _fits(inferred: Inferred, name: str) -> bool:
    shape = inferred.info(name).shape
    return shape is not None and all(isinstance(d, int) for d in shape) and int(np.prod(shape)) <= MAX_ELEMENTS


def _needed(cone: list[onnx.NodeProto], wanted: set[str]) -> list[onnx.NodeProto]:
    """The cone nodes the wanted values depend on, in graph order."""
    need, keep = set(wanted), []
    for node in reversed(cone):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    return keep[::-1]


def _evaluate(model: onnx.ModelProto, cone: list[onnx.NodeProto], inits: dict[str, TensorProto],
              shape_feeds: dict[str, tuple[int, ...]], wanted: list[str], inferred: Inferred) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    nodes = _needed(cone, set(wanted))
    reads = {i for n in nodes for i in n.input if i} - {o for n in nodes for o in n.output}
    feeds = {}
    inputs = []
    for name in sorted(reads):
        if name in inits:
            continue
        info = inferred.info(name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.elem_type)
        feeds[name] = np.broadcast_to(np.zeros((), dtype), shape_feeds[name])  # only its shape is read
        inputs.append(onnx.helper.make_tensor_value_info(name, info.elem_type, list(shape_feeds[name])))
    outputs = [onnx.helper.make_empty_tensor_value_info(v) for v in wanted]
    graph = onnx.helper.make_graph(nodes, "constants", inputs, outputs,
                                   initializer=[inits[n] for n in sorted(reads) if n in inits])
    sub = onnx.helper.make_model(graph, opset_imports=[o for o in model.opset_import if o.domain in DEFAULT_DOMAINS],
                                 ir_version=model.ir_version)
    results = ReferenceEvaluator(sub).run(None, feeds)
    out = {}
    for name, value in zip(wanted, results):
        value = np.asarray(value)
        info = inferred.info(name)
        if value.dtype != onnx.helper.tensor_dtype_to_np_dtype(info.elem_type) or value.shape != tuple(info.shape):
            continue  # disagrees with shape inference: leave the subgraph as it is
        out[name] = value
    return out


def with_constants(light: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the skeleton ``light`` with ``values`` as initializers and the nodes no longer needed removed."""
    new = onnx.ModelProto()
    new.CopyFrom(light)
    g = new.graph
    live = {o.name for o in g.output} | subgraph_reads(g)
    keep = []
    for node in reversed(list(g.node)):
        outs = [o for o in node.output if o]
        if any(o in live and o not in values for o in outs) or not outs:
            keep.append(node)
            live.update(i for i in node.input if i)
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    live.update(i for n in sub.node for i in n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    g.initializer.extend(onnx.numpy_helper.from_array(np.array(v, order="C"), k) for k, v in values.items())
    return new


__all__ = ["MAX_ELEMENTS", "Folded", "constant_subgraphs", "fold_constants", "with_constants"]
