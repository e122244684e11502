"""The pipeline behind ``reparam.onnx.fuse``: collapse the linear regions of an ONNX graph into convolutions.

Pipeline: load and validate -> shape inference (on a weight-free skeleton) -> onnx-graphsurgeon import
-> training-mode BatchNormalization to inference form -> ConvTranspose+BN/affine folding (the planner
handles Conv only) -> translation to a :class:`reparam.core.LinearGraph` -> :func:`reparam.core.plan`
-> rewrite of every region that gets cheaper -> export, ONNX checker.  The fusion math is the core's.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from reparam import core
from reparam.core.errors import NotFusable, ReparamError
from reparam.core.precision import cast_conv

from ._fold import fold_constants
from ._graph import Inferred, Names, TensorInfo, all_names, infer_info, is_default_domain, subgraph_reads
from ._inputs import InputShapes, resolve_input_shapes, restore_runtime_inputs, with_input_shapes
from ._layout import share_transposes
from ._pools import fold_pads_into_max_pools
from ._translate import Translation, Translator, _Opaque, is_training_bn
from .errors import OnnxModelError, one_line
from .io import (
    Loaded,
    _copy_fields,
    check_payloads,
    check_skeleton,
    default_opset,
    read_model,
    runtime_initializers,
    skeleton,
    strict_problem,
    validate,
)
from .report import FusedRegion, FuseReport, Refused
from .simplify import run_simplifier, simplifier

ModelLike = onnx.ModelProto | str | os.PathLike

GS_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
# a region made only of these stays as it is rather than becoming a conv (elementwise ops are cheaper)
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Identity", "Dropout"})
# ops a region's emitted convs may stand for: a region never runs more convs than it had (a Pad stays a Pad)
CONV_LIKE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool"})


@overload
def fuse(model: ModelLike, *, report: Literal[False] = False, allow_costlier: bool = False,
         return_report: Literal[False] = False, input_shapes: InputShapes | None = None,
         simplify: str | bool = False) -> onnx.ModelProto: ...


@overload
def fuse(model: ModelLike, *, report: Literal[True], allow_costlier: bool = False,
         return_report: bool = False, input_shapes: InputShapes | None = None,
         simplify: str | bool = False) -> tuple[onnx.ModelProto, FuseReport]: ...


@overload
def fuse(model: ModelLike, *, report: bool = False, allow_costlier: bool = False,
         return_report: Literal[True], input_shapes: InputShapes | None = None,
         simplify: str | bool = False) -> tuple[onnx.ModelProto, FuseReport]: ...


def fuse(model: ModelLike, *, report: bool = False, allow_costlier: bool = False,
         return_report: bool = False, input_shapes: InputShapes | None = None,
         simplify: str | bool = False) -> onnx.ModelProto | tuple[onnx.ModelProto, FuseReport]:
    """Fuse every exactly-foldable linear region of ``model`` (a ModelProto or a path) into convolutions.

    Returns a new ModelProto (``model`` is never modified) with the same graph inputs and outputs, or
    ``(model, report)`` when ``report=True`` (as in :func:`reparam.fuse`; ``return_report=True`` is an
    alias).  ``allow_costlier`` lets the planner take fusions that raise the MAC count (e.g. a 1x1 conv
    composed into a wider kxk one).  ``input_shapes`` (``{"x": [1, 3, 224, 224]}``) fixes dynamic dims of
    graph inputs, as onnxsim's ``--overwrite-input-shape`` does; the result keeps those shapes.
    ``simplify`` (True, ``"onnxslim"`` or ``"onnxsim"``) runs that simplifier on the result.  Raises
    :class:`~reparam.onnx.OnnxModelError` (a ``ReparamError``) for unreadable, invalid or unsupported models.
    """
    out, rep, _ = run(model, allow_costlier=allow_costlier, input_shapes=input_shapes, simplify=simplify)
    return (out, rep) if report or return_report else out


def inference_form(model: ModelLike) -> onnx.ModelProto:
    """Only convert training-mode BatchNormalization (with unused batch-statistics outputs) to inference form.

    This is the reference :func:`fuse` output should be compared with when the report lists conversions.
    """
    out, _, _ = run(model, fold=False)
    return out


def _quiet(_message: str) -> None:
    pass


def run(model: ModelLike | Loaded, *, allow_costlier: bool = False, fold: bool = True,
        input_shapes: InputShapes | None = None, simplify: str | bool = False,
        progress: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, FuseReport, Loaded]:
    """The whole pass; also returns how the model was loaded (path, external data) for the CLI.

    ``progress`` is called with a short description at each stage (and while fused kernels are computed).
    """
    say = progress or _quiet
    loaded = model if isinstance(model, Loaded) else read_model(model)
    src = loaded.model
    opset = default_opset(src)
    say("checking the input")
    payloads = validate(src)
    report = FuseReport(ops_before=Counter(n.op_type for n in src.graph.node))
    runtime = runtime_initializers(src)
    light = skeleton(src)
    shapes = resolve_input_shapes(src, input_shapes, runtime)
    if shapes:
        light = with_input_shapes(light, shapes)
        check_skeleton(light, "with the input shapes given, the model is invalid")
        report.input_shapes = {k: list(v) for k, v in shapes.items()}
    say("shape inference")
    inferred = infer_info(light)
    if inferred.problem:
        report.notes.append(f"shape inference failed ({inferred.problem}); values of unknown shape are not fused")
    folded = None
    if fold:
        say("evaluating constant subgraphs")
        folded, light, inferred = fold_constants(light, src, inferred, set(runtime), infer_info)
        report.constants_folded = sorted(folded.values)
        if folded.values:  # an evaluated value may show what inference could not see (e.g. too few pads)
            check_skeleton(light, "invalid ONNX model once its constant subgraphs are evaluated")
        if folded.problem:
            report.notes.append(folded.problem)
    say("importing the graph")
    try:
        graph = gs.import_onnx(src)
        restore_runtime_inputs(graph, src, runtime)
        for name, dims in shapes.items():
            next(t for t in graph.inputs if t.name == name).shape = list(dims)
        if folded and folded.values:
            tensors = graph.tensors()
            for name, value in folded.values.items():
                tensors[name].inputs.clear()
                tensors[name].to_constant(value)
        graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    except ReparamError:
        raise
    except Exception as err:  # onnx-graphsurgeon raises plain exceptions (e.g. on cycles)
        raise OnnxModelError(f"cannot import the graph: {one_line(err)}") from None
    names = Names(all_names(src))
    tl = Translator(graph, inferred, opset, overridable=frozenset(runtime), payloads=payloads)
    rw = _Rewriter(graph, inferred, opset, names, report, tl)
    rw.convert_training_bn()
    if fold:
        report.transposes_shared = share_transposes(graph, tl, inferred, names)
        if report.transposes_shared:
            graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
        rw.fold_conv_transpose()
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
        say(f"planning {len(graph.nodes)} nodes")
        tr = Translator(graph, inferred, opset, overridable=frozenset(runtime), cache=tl.cache, payloads=payloads).run()
        plan = core.plan(tr.graph, allow_costlier=allow_costlier, per_channel_terms=True)  # written as Mul/Add
        rw.record_refusals(tr, plan)
        rw.apply(tr, plan, say)
        report.pads_into_pools = fold_pads_into_max_pools(
            graph, Translator(graph, inferred, opset, overridable=frozenset(runtime), cache=tl.cache,
                              payloads=payloads))
    graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
    graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    say("building the output model")
    out = _export(graph, src, runtime, shapes)
    report.ops_after = Counter(n.op_type for n in out.graph.node)
    say("checking the output")
    _check_output(out)
    if simplify:
        report.ops_fused = report.ops_after
        name = simplifier(simplify)
        say(f"simplifying with {name}")
        out, report.simplified_by = run_simplifier(out, name, runtime)
        report.ops_after = Counter(n.op_type for n in out.graph.node)
        _check_output(out, f"the model {name} returned fails the ONNX checker", payloads=True)
    return out, report, loaded


def _export(graph: gs.Graph, src: onnx.ModelProto, runtime: list[str], shapes: dict) -> onnx.ModelProto:
    """The edited graph in a model carrying all of ``src``'s model-level fields (metadata, opsets, functions);
    graph inputs exactly as declared (unless their shapes were set), runtime initializers kept.

    Initializers are written here rather than by onnx-graphsurgeon, which copies a new weight three times
    (``tobytes``, ``make_tensor``, ``make_graph``): an original weight is copied once, a new one twice.
    """
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)
                 and not isinstance(t._values, SparseValues)]
    values = [t._values for t in constants]
    for t in constants:
        t.to_variable(dtype=t.dtype, shape=list(t.shape))
        t.type = "tensor_type"
    out = gs.export_onnx(graph, do_type_check=False)
    names = {t.name for t in constants}
    kept_info = [vi for vi in out.graph.value_info if vi.name not in names]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    for t, value in zip(constants, values):
        _add_initializer(out.graph, t.name, value)
    del out.opset_import[:]
    del out.functions[:]
    _copy_fields(src, out, {"graph"})
    declared = {i.name: i for i in src.graph.input}
    for vi in out.graph.input:
        if vi.name in declared and vi.name not in shapes:
            vi.CopyFrom(declared[vi.name])
    kept = {i.name for i in out.graph.input} & set(runtime)
    out.graph.initializer.extend(t for t in src.graph.initializer if t.name in kept)
    _restore_subgraphs(src.graph, out.graph)
    _restore_captured_initializers(src.graph, out.graph)
    return out


def _add_initializer(graph: onnx.GraphProto, name: str, value) -> None:
    """Append ``value`` (onnx-graphsurgeon's lazy original tensor, or an array) as an initializer."""
    if isinstance(value, LazyValues):
        tp = graph.initializer.add()
        tp.CopyFrom(value.tensor)
        tp.name = name
        return
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub" or arr.dtype.byteorder == ">":
        graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
        return
    tp = graph.initializer.add()
    tp.name = name
    tp.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    tp.dims.extend(arr.shape)
    tp.raw_data = np.ascontiguousarray(arr).tobytes()


def _restore_captured_initializers(src: onnx.GraphProto, out: onnx.GraphProto) -> None:
    """onnx-graphsurgeon drops an initializer that only a subgraph reads; put the original back."""
    present = {t.name for t in out.initializer} | {i.name for i in out.input}
    present.update(o for n in out.node for o in n.output)
    wanted = subgraph_reads(out) - present
    if wanted:
        out.initializer.extend(t for t in src.initializer if t.name in wanted)


def _restore_subgraphs(src: onnx.GraphProto, out: onnx.GraphProto) -> None:
    """Put back the original attributes of nodes with subgraphs (an import/export round trip may reorder
    their contents); such nodes are opaque, so their attributes never change."""
    graph_attrs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    originals = {tuple(n.output): n for n in src.node if any(a.type in graph_attrs for a in n.attribute)}
    if not originals:
        return
    for node in out.node:
        orig = originals.get(tuple(node.output))
        if orig is not None:
            del node.attribute[:]
            node.attribute.extend(orig.attribute)


def _check_output(model: onnx.ModelProto, what: str = "the fused model fails the ONNX checker", *,
                  payloads: bool = False) -> None:
    """The output passes what the input had to pass (full check, strict shape inference), or nothing is written.

    ``payloads``: also check the weights' data (the fusion writes new weights from their arrays, and keeps
    the input's, already checked; another tool's output is checked whole)."""
    try:
        if payloads:
            check_payloads(model)
        problem = strict_problem(skeleton(model))
    except OnnxModelError as err:
        problem = str(err)
    if problem is not None:
        raise ReparamError(f"internal error: {what} ({problem}); nothing was written; please report this "
                           "with the input model")


# -- the rewrite -------------------------------------------------------------------------------------------


@dataclass
class _Lowered:
    """How one term is written in ONNX: the op types it takes, and what to build."""

    term: core.Term
    conv: core.Conv | None  # cast to the model dtype; None for an identity term
    ops: list[str]


class _Rewriter:
    def __init__(self, graph: gs.Graph, inferred: Inferred, opset: int, names: Names, report: FuseReport,
                 tl: Translator) -> None:
        self.graph = graph
        self.infos = inferred.infos
        self.opset = opset
        self.names = names
        self.report = report
        self.tl = tl
        self.wired: dict[str, str] = {}  # exit of a region wired through -> the value it passes on

    # -- training-mode BN ------------------------------------------------------------------------------
    def convert_training_bn(self) -> None:
        for node in self.graph.nodes:
            if not is_training_bn(node, self.opset):
                continue
            extra = [o for o in node.outputs[1:] if not o.is_empty()]
            used = [o.name for o in extra if self.tl.is_used(o)]
            if used:
                self.report.refusals.append(Refused(
                    node.name, node.op, node.outputs[0].name,
                    f"BatchNormalization in training mode whose batch-statistics outputs {used} are used; "
                    "it normalizes with batch statistics and cannot become an inference BN"))
                continue
            while len(node.outputs) > 1:
                node.outputs.pop()
            if self.opset >= 14:
                node.attrs["training_mode"] = 0
            self.report.bn_converted.append(node.name)

    # -- ConvTranspose followed by BN / per-channel affine --------------------------------------------------
    def fold_conv_transpose(self) -> None:
        """Fold BN or a per-channel affine into the preceding ConvTranspose (core.fold_bn_transpose)."""
        for node in list(self.graph.nodes):
            if node.op != "ConvTranspose" or not is_default_domain(node):
                continue
            ops, names, first = [], [], node
            while True:
                folded = self._fold_ct_once(node)
                if folded is None:
                    break
                ops.append(folded[1].op)
                names.append(folded[1].name)
                node = folded[0]
            if ops:
                self.report.regions.append(FusedRegion(
                    node.outputs[0].name, ("ConvTranspose", *ops), (first.name, *names), ("ConvTranspose",),
                    (node.inputs[0].name,)))

    def _fold_ct_once(self, node: gs.Node) -> tuple[gs.Node, gs.Node] | None:
        if len([o for o in node.outputs if not o.is_empty()]) != 1:
            return None
        out = node.outputs[0]
        if len(out.outputs) != 1 or out.name in self.tl.graph_outputs or out.name in self.tl.captured:
            return None
        user = out.outputs[0]
        try:
            op, data, _, _ = self.tl.translate(user)
        except (_Opaque, ReparamError, ValueError, LookupError, TypeError):
            return None  # the main pass reports it if it is a candidate
        if not isinstance(op, (core.BatchNorm, core.Affine)) or [t.name for t in data] != [out.name]:
            return None
        w = self.tl.const(node.inputs[1]) if len(node.inputs) > 1 else None
        b_t = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        b = self.tl.const(b_t)
        if w is None or (b_t is not None and b is None):
            self.report.refusals.append(Refused(node.name, node.op, out.name,
                                                "ConvTranspose weight or bias is not a constant"))
            return None
        try:
            ct = core.ConvTranspose(w, b, groups=int(node.attrs.get("group", 1)))
            fused = core.fold_bn_transpose(ct, op)
        except NotFusable as err:
            self.report.refusals.append(Refused(user.name, user.op, user.outputs[0].name, str(err)))
            return None
        base = user.outputs[0].name
        inputs = [node.inputs[0], gs.Constant(self.names.fresh(f"{base}/reparam/W"), fused.weight),
                  gs.Constant(self.names.fresh(f"{base}/reparam/B"), fused.bias)]
        target = user.outputs[0]
        new = gs.Node("ConvTranspose", self.names.fresh(f"{base}/reparam/ConvTranspose"), dict(node.attrs),
                      inputs, [])
        for n in (node, user):
            n.inputs.clear()
            n.outputs.clear()
        new.outputs.append(target)
        self.graph.nodes = [n for n in self.graph.nodes if n is not node and n is not user] + [new]
        return new, user

    # -- regions -------------------------------------------------------------------------------------------
    def record_refusals(self, tr: Translation, plan: core.Plan) -> None:
        seen = {(r.node, r.reason) for r in self.report.refusals}
        items = [(n, v, why) for n, v, why in tr.refusals]
        items += [(tr.producers[f.node], f.node, f.reason) for f in plan.refusals if f.node in tr.producers]
        for node, value, reason in items:
            key = (node.name, reason)
            if key not in seen:
                seen.add(key)
                self.report.refusals.append(Refused(node.name, node.op, value, reason))

    def apply(self, tr: Translation, plan: core.Plan, say: Callable[[str], None] = _quiet) -> None:
        tensors = self.graph.tensors()
        removed: set[int] = set()
        added: list[gs.Node] = []
        for k, region in enumerate(plan.regions):
            say(f"computing fused kernels: region {k + 1} of {len(plan.regions)}")
            nodes = list({id(tr.producers[n]): tr.producers[n] for n in region.nodes}.values())
            dtype = self._dtype(region, nodes)
            budget = sum(n.op in CONV_LIKE for n in nodes)  # never more convs than the region runs
            try:
                lowered = [self._lower(t, dtype, budget == 0) for t in region.terms]
                if sum(op in ("Conv", "Gemm") for lw in lowered for op in lw.ops) > budget:
                    lowered = [self._lower(t, dtype, True) for t in region.terms]  # per-channel terms as Mul/Add
            except NotFusable as err:
                exit_node = tr.producers[region.exit]
                self.report.refusals.append(Refused(exit_node.name, exit_node.op, region.exit, str(err)))
                continue
            exit_var = tensors[region.exit]
            rewire = (len(lowered) == 1 and lowered[0].conv is None and region.exit not in self.tl.graph_outputs
                      and region.exit not in self.tl.captured)
            emitted = [op for lw in lowered for op in lw.ops] + ["Add"] * (len(lowered) - 1)
            if len(lowered) == 1 and lowered[0].conv is None and not rewire:
                emitted = ["Identity"]
            removes_bn = any(n.op == "BatchNormalization" for n in nodes)
            if len(emitted) > len(nodes) or (len(emitted) == len(nodes) and not removes_bn):
                continue  # never more nodes; as many only to replace a BatchNormalization (x + BN(x): Mul, Add)
            if all(n.op in ELEMENTWISE for n in nodes) and any(lw.conv is not None for lw in lowered):
                continue
            if sum(op in ("Conv", "Gemm") for op in emitted) > budget:
                exit_node = tr.producers[region.exit]
                self.report.refusals.append(Refused(
                    exit_node.name, exit_node.op, region.exit,
                    f"collapsing {', '.join(n.op for n in nodes)} would run a conv where the graph runs none; "
                    "kept as it is"))
                continue
            for n in nodes:
                n.inputs.clear()
                n.outputs.clear()
                removed.add(id(n))
            if rewire:
                src = self._source(tensors, lowered[0].term.source)
                self.wired[region.exit] = src.name
                for consumer in list(exit_var.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is exit_var:
                            consumer.inputs[i] = src
            else:
                added += self._build(lowered, exit_var, tensors)
            sized = self._fixed_sizes(tr, region) if plan.sized.intersection(region.nodes) else ()
            self.report.regions.append(FusedRegion(
                region.exit, tuple(n.op for n in nodes), tuple(n.name for n in nodes), tuple(emitted),
                tuple(t.source for t in region.terms), tuple(sized)))
        self.graph.nodes = [n for n in self.graph.nodes if id(n) not in removed] + added

    def _source(self, tensors: dict, name: str) -> gs.Tensor:
        """The tensor a term reads: a region wired through earlier (an identity) stands for its own source."""
        while name in self.wired:
            name = self.wired[name]
        return tensors[name]

    @staticmethod
    def _fixed_sizes(tr: Translation, region: core.Region) -> tuple[str, ...]:
        """The fixed input sizes (``"16x16"``) a region's branch sum is exact for (and only for)."""
        sizes = {tr.graph.nodes[t.source].spatial for t in region.terms} - {None}
        return tuple(sorted("x".join(map(str, s)) for s in sizes))

    def _dtype(self, region: core.Region, nodes: list[gs.Node]):
        dt = self.infos.get(region.exit, TensorInfo(None, None)).np_dtype
        if dt is not None:
            return dt
        for n in nodes:
            if n.op in ("Conv", "Gemm", "MatMul"):
                w = self.tl.const(n.inputs[1])
                if w is not None and w.dtype.kind == "f":
                    return w.dtype
        return np.float32

    def _lower(self, term: core.Term, dtype, convless: bool = False) -> _Lowered:
        """How a term is written; ``convless``: per-channel terms as Mul/Add rather than depthwise 1x1 convs
        (the region runs no conv, or not enough convs to pay for one)."""
        if term.identity:
            return _Lowered(term, None, [])
        if term.kernel.geometry.ndim == 0:
            conv = term.conv
            if conv.groups > 1 and not (conv.groups == conv.out_channels == conv.in_channels):
                conv = core.regroup(conv, 1)
            conv = cast_conv(conv, dtype)
            if conv.groups > 1:  # a per-channel scale of a [N, C] value: Mul (+ Add), not a dense Gemm
                has_bias = conv.bias is not None and bool(np.any(conv.bias != 0))
                return _Lowered(term, conv, ["Mul"] + (["Add"] if has_bias else []))
            return _Lowered(term, conv, ["Gemm"])
        geo = term.kernel.geometry
        channelwise = (geo.groups == geo.out_channels == geo.in_channels and geo.is_pointwise
                       and all(v == 1 for v in geo.stride))
        if convless and channelwise and geo.is_padded:  # x * 1 + 0 then Pad (an identity affine): just the Pad
            conv = term.cast(dtype)
            if np.all(conv.weight == 1) and (conv.bias is None or not np.any(conv.bias)) and not (
                    conv.padding_mode == "circular" and self.opset < 19):
                return _Lowered(term, conv, ["Pad"])
        if convless and channelwise and not geo.is_padded:  # BN-only branches
            conv = term.cast(dtype)
            has_bias = conv.bias is not None and bool(np.any(conv.bias != 0))
            return _Lowered(term, conv, ["Mul"] + (["Add"] if has_bias else []))
        conv = term.cast(dtype)
        if conv.is_padded and conv.padding_mode != "zeros":
            if conv.padding_mode == "circular" and self.opset < 19:
                raise NotFusable("circular padding needs Pad mode 'wrap' (opset 19 or later)")
            return _Lowered(term, conv, ["Pad", "Conv"])
        return _Lowered(term, conv, ["Conv"])

    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names.fresh(base), np.ascontiguousarray(value))

    def _node(self, op: str, base: str, inputs, outputs, attrs=None) -> gs.Node:
        return gs.Node(op, self.names.fresh(f"{base}/reparam/{op}"), attrs or {}, inputs, outputs)

    def _var(self, base: str) -> gs.Variable:
        return gs.Variable(self.names.fresh(base))

    def _build(self, lowered: list[_Lowered], exit_var: gs.Variable, tensors) -> list[gs.Node]:
        base = exit_var.name
        new: list[gs.Node] = []
        values: list[gs.Tensor] = []
        last = len(lowered) == 1
        if last and lowered[0].conv is None:  # the region is the identity: keep the exit's name
            return [self._node("Identity", base, [self._source(tensors, lowered[0].term.source)], [exit_var])]
        for lw in lowered:
            src = self._source(tensors, lw.term.source)
            if lw.conv is None:
                values.append(src)
                continue
            out = exit_var if last else self._var(f"{base}/reparam/term")
            new += self._emit_term(lw, src, out, base)
            values.append(out)
        acc = values[0]
        for k, v in enumerate(values[1:], start=1):
            out = exit_var if k == len(values) - 1 else self._var(f"{base}/reparam/sum")
            new.append(self._node("Add", base, [acc, v], [out]))
            acc = out
        return new

    def _emit_term(self, lw: _Lowered, src: gs.Tensor, out: gs.Variable, base: str) -> list[gs.Node]:
        conv = lw.conv
        if lw.ops[0] == "Mul":
            per_channel = (-1,) + (1,) * conv.ndim  # [C] on a [N, C] matrix, [C, 1, ..] on an image
            scale = self._const(f"{base}/reparam/scale", conv.weight.reshape(per_channel))
            if len(lw.ops) == 1:
                return [self._node("Mul", base, [src, scale], [out])]
            mid = self._var(f"{base}/reparam/scaled")
            bias = self._const(f"{base}/reparam/B", conv.bias.reshape(per_channel))
            return [self._node("Mul", base, [src, scale], [mid]), self._node("Add", base, [mid, bias], [out])]
        bias = None if conv.bias is None else self._const(f"{base}/reparam/B", conv.bias)
        weight = self._const(f"{base}/reparam/W", conv.weight)
        if lw.ops == ["Gemm"]:
            return [self._node("Gemm", base, [src, weight] + ([bias] if bias is not None else []), [out],
                               {"transB": 1})]
        nodes = []
        pads = [p[0] for p in conv.padding] + [p[1] for p in conv.padding]
        if lw.ops[0] == "Pad":
            nd = conv.ndim
            pad_values = [0, 0] + pads[:nd] + [0, 0] + pads[nd:]
            padded = out if lw.ops == ["Pad"] else self._var(f"{base}/reparam/padded")
            nodes.append(self._node("Pad", base, [src, self._const(f"{base}/reparam/pads",
                                                                    np.array(pad_values, np.int64))],
                                    [padded], {"mode": GS_PAD_MODES.get(conv.padding_mode, "constant")}))
            if lw.ops == ["Pad"]:
                return nodes
            src, pads = padded, [0] * (2 * nd)
        attrs = {"kernel_shape": list(conv.kernel_size), "strides": list(conv.stride), "pads": pads,
                 "dilations": list(conv.dilation), "group": conv.groups}
        nodes.append(self._node("Conv", base, [src, weight] + ([bias] if bias is not None else []), [out], attrs))
        return nodes


__all__ = ["fuse", "inference_form", "run"]
