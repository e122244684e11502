"""The pipeline behind ``reparam.onnx.fuse``: collapse the linear regions of an ONNX graph into convolutions.

Pipeline: load and validate -> shape inference (on a weight-free skeleton) -> onnx-graphsurgeon import
-> training-mode BatchNormalization to inference form -> ConvTranspose+BN/affine folding (the planner
handles Conv only) -> translation to a :class:`reparam.core.LinearGraph` -> :func:`reparam.core.plan`
-> rewrite of every region that gets cheaper -> export, ONNX checker.  The fusion math is the core's.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from reparam import core
from reparam.core.errors import NotFusable, ReparamError
from reparam.core.precision import cast_conv

from ._graph import Names, TensorInfo, all_names, infer_info, is_default_domain
from ._translate import Translation, Translator, _Opaque, is_training_bn
from .errors import OnnxModelError, one_line
from .io import PROTOBUF_LIMIT, Loaded, _copy_fields, default_opset, model_size, read_model, validate
from .report import FusedRegion, FuseReport, Refused

ModelLike = onnx.ModelProto | str | os.PathLike

GS_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
# a region made only of these stays as it is rather than becoming a conv (elementwise ops are cheaper)
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Identity", "Dropout"})


@overload
def fuse(model: ModelLike, *, report: Literal[False] = False, allow_costlier: bool = False,
         return_report: Literal[False] = False) -> onnx.ModelProto: ...


@overload
def fuse(model: ModelLike, *, report: Literal[True], allow_costlier: bool = False,
         return_report: bool = False) -> tuple[onnx.ModelProto, FuseReport]: ...


@overload
def fuse(model: ModelLike, *, report: bool = False, allow_costlier: bool = False,
         return_report: Literal[True]) -> tuple[onnx.ModelProto, FuseReport]: ...


def fuse(model: ModelLike, *, report: bool = False, allow_costlier: bool = False,
         return_report: bool = False) -> onnx.ModelProto | tuple[onnx.ModelProto, FuseReport]:
    """Fuse every exactly-foldable linear region of ``model`` (a ModelProto or a path) into convolutions.

    Returns a new ModelProto (``model`` is never modified) with the same graph inputs and outputs, or
    ``(model, report)`` when ``report=True`` (as in :func:`reparam.fuse`; ``return_report=True`` is an
    alias).  ``allow_costlier`` lets the planner take fusions that raise the MAC count (e.g. a 1x1 conv
    composed into a wider kxk one).  Raises :class:`~reparam.onnx.OnnxModelError` (a ``ReparamError``)
    for unreadable, invalid or unsupported models.
    """
    out, rep, _ = run(model, allow_costlier=allow_costlier)
    return (out, rep) if report or return_report else out


def inference_form(model: ModelLike) -> onnx.ModelProto:
    """Only convert training-mode BatchNormalization (with unused batch-statistics outputs) to inference form.

    This is the reference :func:`fuse` output should be compared with when the report lists conversions.
    """
    out, _, _ = run(model, fold=False)
    return out


def run(model: ModelLike | Loaded, *, allow_costlier: bool = False,
        fold: bool = True) -> tuple[onnx.ModelProto, FuseReport, Loaded]:
    """The whole pass; also returns how the model was loaded (path, external data) for the CLI."""
    loaded = model if isinstance(model, Loaded) else read_model(model)
    src = loaded.model
    opset = default_opset(src)
    strict = validate(src)
    report = FuseReport(ops_before=Counter(n.op_type for n in src.graph.node))
    infos, problem = infer_info(src)
    if problem:
        report.notes.append(f"shape inference failed ({problem}); values of unknown shape are not fused")
    try:
        graph = gs.import_onnx(src)
        graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    except ReparamError:
        raise
    except Exception as err:  # onnx-graphsurgeon raises plain exceptions (e.g. on cycles)
        raise OnnxModelError(f"cannot import the graph: {one_line(err)}") from None
    names = Names(all_names(src))
    rw = _Rewriter(graph, infos, opset, names, report)
    rw.convert_training_bn()
    if fold:
        rw.fold_conv_transpose()
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
        tr = Translator(graph, infos, opset).run()
        plan = core.plan(tr.graph, allow_costlier=allow_costlier)
        rw.record_refusals(tr, plan)
        rw.apply(tr, plan)
    graph.cleanup(recurse_subgraphs=False, recurse_functions=False)
    graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    out = _export(graph, src)
    report.ops_after = Counter(n.op_type for n in out.graph.node)
    _check_output(out, strict)
    return out, report, loaded


def _export(graph: gs.Graph, src: onnx.ModelProto) -> onnx.ModelProto:
    """The edited graph in a model carrying all of ``src``'s model-level fields (metadata, opsets, functions)."""
    out = gs.export_onnx(graph, do_type_check=False)
    del out.opset_import[:]
    del out.functions[:]
    _copy_fields(src, out, {"graph"})
    _restore_subgraphs(src.graph, out.graph)
    _restore_captured_initializers(src.graph, out.graph)
    return out


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name read by a node of a subgraph nested in ``graph`` (at any depth)."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names.update(i for n in sub.node for i in n.input)
                names |= _subgraph_reads(sub)
    return names


def _restore_captured_initializers(src: onnx.GraphProto, out: onnx.GraphProto) -> None:
    """onnx-graphsurgeon drops an initializer that only a subgraph reads; put the original back."""
    present = {t.name for t in out.initializer} | {i.name for i in out.input}
    present.update(o for n in out.node for o in n.output)
    wanted = _subgraph_reads(out) - present
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


def _check_output(model: onnx.ModelProto, strict: bool) -> None:
    if model_size(model) >= PROTOBUF_LIMIT:
        return
    try:
        onnx.checker.check_model(model, full_check=strict)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError) as err:
        raise ReparamError(f"internal error: the fused model fails the ONNX checker ({one_line(err)}); "
                           "nothing was written; please report this with the input model") from None


# -- the rewrite -------------------------------------------------------------------------------------------


@dataclass
class _Lowered:
    """How one term is written in ONNX: the op types it takes, and what to build."""

    term: core.Term
    conv: core.Conv | None  # cast to the model dtype; None for an identity term
    ops: list[str]


class _Rewriter:
    def __init__(self, graph: gs.Graph, infos: dict[str, TensorInfo], opset: int, names: Names,
                 report: FuseReport) -> None:
        self.graph = graph
        self.infos = infos
        self.opset = opset
        self.names = names
        self.report = report
        self.tl = Translator(graph, infos, opset)

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

    def apply(self, tr: Translation, plan: core.Plan) -> None:
        tensors = self.graph.tensors()
        removed: set[int] = set()
        added: list[gs.Node] = []
        for region in plan.regions:
            nodes = list({id(tr.producers[n]): tr.producers[n] for n in region.nodes}.values())
            dtype = self._dtype(region, nodes)
            try:
                lowered = [self._lower(t, dtype) for t in region.terms]
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
            if len(emitted) >= len(nodes):
                continue
            if all(n.op in ELEMENTWISE for n in nodes) and any(lw.conv is not None for lw in lowered):
                continue
            for n in nodes:
                n.inputs.clear()
                n.outputs.clear()
                removed.add(id(n))
            if rewire:
                src = tensors[lowered[0].term.source]
                for consumer in list(exit_var.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is exit_var:
                            consumer.inputs[i] = src
            else:
                added += self._build(lowered, exit_var, tensors)
            self.report.regions.append(FusedRegion(
                region.exit, tuple(n.op for n in nodes), tuple(n.name for n in nodes), tuple(emitted),
                tuple(t.source for t in region.terms)))
        self.graph.nodes = [n for n in self.graph.nodes if id(n) not in removed] + added

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

    def _lower(self, term: core.Term, dtype) -> _Lowered:
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
            return [self._node("Identity", base, [tensors[lowered[0].term.source]], [exit_var])]
        for lw in lowered:
            src = tensors[lw.term.source]
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
        bias = None if conv.bias is None else self._const(f"{base}/reparam/B", conv.bias)
        if lw.ops[0] == "Mul":
            scale = self._const(f"{base}/reparam/scale", conv.weight.reshape(-1))
            if len(lw.ops) == 1:
                return [self._node("Mul", base, [src, scale], [out])]
            mid = self._var(f"{base}/reparam/scaled")
            return [self._node("Mul", base, [src, scale], [mid]), self._node("Add", base, [mid, bias], [out])]
        weight = self._const(f"{base}/reparam/W", conv.weight)
        if lw.ops == ["Gemm"]:
            return [self._node("Gemm", base, [src, weight] + ([bias] if bias is not None else []), [out],
                               {"transB": 1})]
        nodes = []
        pads = [p[0] for p in conv.padding] + [p[1] for p in conv.padding]
        if lw.ops[0] == "Pad":
            nd = conv.ndim
            pad_values = [0, 0] + pads[:nd] + [0, 0] + pads[nd:]
            padded = self._var(f"{base}/reparam/padded")
            nodes.append(self._node("Pad", base, [src, self._const(f"{base}/reparam/pads",
                                                                    np.array(pad_values, np.int64))],
                                    [padded], {"mode": GS_PAD_MODES[conv.padding_mode]}))
            src, pads = padded, [0] * (2 * nd)
        attrs = {"kernel_shape": list(conv.kernel_size), "strides": list(conv.stride), "pads": pads,
                 "dilations": list(conv.dilation), "group": conv.groups}
        nodes.append(self._node("Conv", base, [src, weight] + ([bias] if bias is not None else []), [out], attrs))
        return nodes


__all__ = ["fuse", "inference_form", "run"]
