"""ONNX nodes -> :class:`reparam.core.LinearGraph`: each node becomes a linear core op or an opaque node.

Only translation lives here; every fusion decision is the core planner's.  A node that looks like a
linear candidate but cannot be proven linear per channel (a non-constant weight, a broadcasting add, a
constant that is not per-channel, ...) becomes opaque, with the reason recorded for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from reparam import core
from reparam.core.errors import ReparamError

from ._graph import UNKNOWN, Inferred, TensorInfo, const_value, implicit_uses, is_default_domain

PAD_MODES = {"constant": "zeros", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class _Opaque(Exception):
    """This node is not translated; ``reason`` (if any) explains why a linear-looking node was refused."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "")
        self.reason = reason


@dataclass
class Translation:
    """The neutral graph plus what the rewrite needs to map it back to ONNX."""

    graph: core.LinearGraph
    producers: dict[str, gs.Node] = field(default_factory=dict)  # value name -> ONNX node
    refusals: list[tuple[gs.Node, str, str]] = field(default_factory=list)  # (node, value, reason)


def is_training_bn(node: gs.Node, opset: int) -> bool:
    """BatchNormalization computing batch statistics (training_mode=1, or extra outputs before opset 14)."""
    if node.op != "BatchNormalization" or not is_default_domain(node):
        return False
    if int(node.attrs.get("training_mode", 0)):
        return True
    return opset < 14 and sum(not o.is_empty() for o in node.outputs) > 1


class Translator:
    def __init__(self, graph: gs.Graph, inferred: Inferred, opset: int, *, overridable: frozenset[str] = frozenset(),
                 cache: dict | None = None, payloads: dict[str, bytes] | None = None) -> None:
        self.graph = graph
        self.infos = inferred.infos
        self.spatial = inferred.spatial
        self.opset = opset
        self.overridable = overridable  # initializers that are also graph inputs: runtime inputs, never folded
        self.cache = {} if cache is None else cache
        self.payloads = payloads or {}
        self.graph_inputs = {t.name for t in graph.inputs}
        self.graph_outputs = {t.name for t in graph.outputs}
        self.implicit = implicit_uses(graph)
        self.sizes: dict[str, tuple | None] = {}  # symbolic dims of translated values (see _sizes_of)
        self.captured: set[str] = set().union(*self.implicit.values()) if self.implicit else set()

    # -- facts ---------------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        return self.infos.get(name, UNKNOWN)

    def const(self, t: gs.Tensor | None) -> np.ndarray | None:
        return None if t is None else const_value(t, self.graph_inputs, self.cache, self.payloads)

    def not_constant(self, t: gs.Tensor | None, what: str) -> str:
        """Why ``what`` (a parameter input) is not folded: a runtime input, or computed at run time."""
        name = _source_name(t)
        if name in self.overridable:
            return (f"{what} {name!r} is an initializer that is also a graph input: a caller may feed another "
                    "value, so it is a runtime input and is not folded")
        if name in self.graph_inputs:
            return f"{what} {name!r} is a graph input, not a constant"
        return f"{what} is not a constant (initializer or Constant node)"

    def is_used(self, t: gs.Tensor) -> bool:
        """Read by a node, a subgraph, or the graph's caller."""
        return (not t.is_empty()) and (bool(t.outputs) or t.name in self.graph_outputs or t.name in self.captured)

    @staticmethod
    def _input(node: gs.Node, i: int) -> gs.Tensor | None:
        return node.inputs[i] if len(node.inputs) > i and not node.inputs[i].is_empty() else None

    # -- the pass ------------------------------------------------------------------------------------
    def run(self) -> Translation:
        lg = core.LinearGraph()
        tr = Translation(lg)
        for t in self.graph.inputs:
            info = self.info(t.name)
            lg.input(t.name, info.channels, info.ndim, spatial=self.spatial.get(t.name))
        for node in self.graph.nodes:
            outs = [o for o in node.outputs if not o.is_empty()]
            if not outs:
                continue
            try:
                op, data, channels, ndim = self.translate(node)
                data_names = [t.name for t in data]
                if any(n not in lg.nodes for n in data_names):
                    raise _Opaque(None)  # reads a constant or an unknown value: a constant expression
                lg.add(outs[0].name, op, data_names, channels=channels, ndim=ndim, payload=node,
                       spatial=self.spatial.get(outs[0].name))
                tr.producers[outs[0].name] = node
                self.sizes[outs[0].name] = self._sizes_after(op, data_names[0])
                continue
            except _Opaque as why:
                if why.reason:
                    tr.refusals.append((node, outs[0].name, why.reason))
            except (ReparamError, ValueError, LookupError, TypeError) as err:  # malformed: stay opaque
                tr.refusals.append((node, outs[0].name, f"not translated: {err}"))
            ins = [t.name for t in node.inputs if not t.is_empty() and t.name in lg.nodes]
            ins += sorted(n for n in self.implicit.get(id(node), ()) if n in lg.nodes and n not in ins)
            for o in outs:
                info = self.info(o.name)
                lg.add(o.name, None, ins, channels=info.channels, ndim=info.ndim, payload=node,
                       spatial=self.spatial.get(o.name))
                tr.producers[o.name] = node
        lg.mark_output(*(t.name for t in self.graph.outputs if t.name in lg.nodes))
        return tr

    def translate(self, node: gs.Node) -> tuple[core.LinearOp, list[gs.Tensor], int | None, int | None]:
        """(core op, data inputs, out channels, out spatial dims) or raise _Opaque."""
        if not is_default_domain(node) or list(node.subgraphs()):
            raise _Opaque(None)
        handler = getattr(self, f"_op_{node.op}", None)
        if handler is None:
            raise _Opaque(None)
        return handler(node)

    def _float_input(self, node: gs.Node, t: gs.Tensor | None, quiet: bool = False) -> TensorInfo:
        if t is None or self.const(t) is not None:
            raise _Opaque(None)
        info = self.info(t.name)
        if info.elem_type is not None and not info.is_float:
            raise _Opaque(None)
        if info.rank is not None and info.rank < 2:
            raise _Opaque(None)
        if info.elem_type is None or info.rank is None:
            raise _Opaque(None if quiet else f"the type or rank of input {t.name!r} is unknown "
                                             "(shape inference gave none)")
        return info

    # -- ops -----------------------------------------------------------------------------------------
    def _op_Identity(self, node):
        x = self._input(node, 0)
        info = self._float_input(node, x, quiet=True)
        return core.Identity(), [x], info.channels, info.ndim

    def _op_Dropout(self, node):
        x = self._input(node, 0)
        info = self._float_input(node, x, quiet=True)
        mode = self._input(node, 2)
        if mode is not None:
            value = self.const(mode)
            if value is None:
                raise _Opaque("Dropout's training_mode is not a constant; it may be random at run time")
            if bool(np.asarray(value).reshape(-1)[0]):
                raise _Opaque("Dropout runs in training mode (random); only inference Dropout is an identity")
        if len(node.outputs) > 1 and self.is_used(node.outputs[1]):
            raise _Opaque("Dropout's mask output is used")
        return core.Identity(), [x], info.channels, info.ndim

    def _op_BatchNormalization(self, node):
        if is_training_bn(node, self.opset):
            raise _Opaque(None)  # the training-mode pass already reported it
        x = self._input(node, 0)
        info = self._float_input(node, x)
        params = [self.const(self._input(node, i)) for i in range(1, 5)]
        missing = [i for i, p in enumerate(params, start=1) if p is None]
        if missing:
            what = ("scale", "bias", "mean", "var")[missing[0] - 1]
            raise _Opaque(self.not_constant(self._input(node, missing[0]), f"BatchNormalization {what}"))
        scale, bias, mean, var = (np.asarray(p).reshape(-1) for p in params)
        bn = core.BatchNorm(mean, var, gamma=scale, beta=bias, eps=float(node.attrs.get("epsilon", 1e-5)))
        return bn, [x], bn.channels, info.ndim

    def _op_Conv(self, node):
        x = self._input(node, 0)
        info = self._float_input(node, x, quiet=True)
        w = self.const(self._input(node, 1))
        if w is None:
            raise _Opaque(self.not_constant(self._input(node, 1), "Conv weight"))
        b_t = self._input(node, 2)
        b = self.const(b_t)
        if b_t is not None and b is None:
            raise _Opaque(self.not_constant(b_t, "Conv bias"))
        nd = w.ndim - 2
        a = node.attrs
        stride = tuple(int(s) for s in a.get("strides", [1] * nd))
        dilation = tuple(int(d) for d in a.get("dilations", [1] * nd))
        padding = self._pads(node, a, w.shape[2:], stride, dilation, info)
        conv = core.Conv(w, b, stride=stride, padding=padding, dilation=dilation, groups=int(a.get("group", 1)))
        return conv, [x], conv.out_channels, nd

    def _pads(self, node, a, kernel, stride, dilation, info: TensorInfo) -> tuple[tuple[int, int], ...]:
        nd = len(kernel)
        auto = a.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("NOTSET", ""):
            p = [int(v) for v in a.get("pads", [0] * (2 * nd))]
            return tuple((p[i], p[i + nd]) for i in range(nd))
        if auto == "VALID":
            return ((0, 0),) * nd
        if auto not in ("SAME_UPPER", "SAME_LOWER"):
            raise _Opaque(f"{node.op} has unknown auto_pad {auto!r}")
        pads = []
        for i in range(nd):
            k, s, d = int(kernel[i]), stride[i], dilation[i]
            if s == 1:
                total = d * (k - 1)
            else:
                size = info.shape[2 + i] if info.shape is not None and len(info.shape) == nd + 2 else None
                if not isinstance(size, int):
                    raise _Opaque(f"{node.op} uses auto_pad={auto} with stride {s} on a dynamic spatial size; "
                                  "its padding depends on the input size")
                out = -(-size // s)
                total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return tuple(pads)

    def _op_Gemm(self, node):
        a = node.attrs
        x = self._input(node, 0)
        self._float_input(node, x, quiet=True)
        w = self.const(self._input(node, 1))
        if w is None:
            raise _Opaque(self.not_constant(self._input(node, 1), "Gemm weight")
                          if _source_name(self._input(node, 1)) in self.graph_inputs else None)
        if int(a.get("transA", 0)):
            raise _Opaque("Gemm has transA=1: its input's channels are on axis 0, not axis 1")
        w = np.asarray(w, np.float64)
        w = (w if int(a.get("transB", 0)) else w.T) * float(a.get("alpha", 1.0))
        c_t = self._input(node, 2)
        bias = None
        if c_t is not None:
            c = self.const(c_t)
            if c is None:
                raise _Opaque(self.not_constant(c_t, "Gemm's C"))
            c = np.asarray(c, np.float64)
            if c.ndim > 2 or any(d != 1 for d in c.shape[:-1]) or (c.ndim and c.shape[-1] not in (1, w.shape[0])):
                raise _Opaque(f"Gemm's C of shape {list(c.shape)} is not a per-output-channel bias")
            bias = np.broadcast_to(c.reshape(-1), (w.shape[0],)) * float(a.get("beta", 1.0))
        return core.Conv(w, bias), [x], w.shape[0], 0

    def _op_MatMul(self, node):
        x = self._input(node, 0)
        w = self.const(self._input(node, 1))
        if w is None or w.ndim != 2:
            raise _Opaque(None)
        info = self._float_input(node, x, quiet=True)
        if info.rank != 2:
            raise _Opaque(f"MatMul on a rank-{info.rank} input mixes its last axis, not the channel axis 1")
        return core.Conv(np.ascontiguousarray(np.asarray(w).T)), [x], w.shape[1], 0

    def _op_Pad(self, node):
        x = self._input(node, 0)
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in PAD_MODES:
            raise _Opaque(f"Pad mode {mode!r} is not linear per channel")
        info = self._float_input(node, x, quiet=True)
        pads = self.const(self._input(node, 1))
        if pads is None:
            raise _Opaque(self.not_constant(self._input(node, 1), "Pad's pads"))
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        if mode == "constant":
            value = self._input(node, 2)
            if value is not None:
                v = self.const(value)
                if v is None:
                    raise _Opaque(self.not_constant(value, "Pad's constant_value"))
                if np.any(np.asarray(v) != 0):
                    raise _Opaque(f"Pad with constant value {np.asarray(v).reshape(-1)[0]!r} is affine, "
                                  "not linear; only zero padding folds")
        rank = info.rank
        axes_t = self._input(node, 3)
        axes = list(range(rank))
        if axes_t is not None:
            av = self.const(axes_t)
            if av is None:
                raise _Opaque(self.not_constant(axes_t, "Pad's axes"))
            axes = [int(v) % rank for v in np.asarray(av).reshape(-1)]
        n = len(axes)
        if len(pads) != 2 * n:
            raise _Opaque(f"Pad has {len(pads)} pads for {n} axes")
        per_axis = {ax: (pads[i], pads[i + n]) for i, ax in enumerate(axes)}
        if any(per_axis.get(ax, (0, 0)) != (0, 0) for ax in (0, 1)):
            raise _Opaque("Pad pads the batch or channel axis; only spatial padding folds into a conv")
        padding = tuple(per_axis.get(ax, (0, 0)) for ax in range(2, rank))
        return core.Pad(padding, PAD_MODES[mode]), [x], info.channels, info.ndim

    def _op_AveragePool(self, node):
        x = self._input(node, 0)
        info = self._float_input(node, x, quiet=True)
        a = node.attrs
        k = tuple(int(v) for v in a["kernel_shape"])
        nd = len(k)
        if any(int(d) != 1 for d in a.get("dilations", [1] * nd)):
            raise _Opaque("AveragePool with dilations is not folded")
        stride = tuple(int(s) for s in a.get("strides", [1] * nd))
        padding = self._pads(node, a, k, stride, (1,) * nd, info)
        pool = core.AvgPool(k, stride=stride, padding=padding,
                            count_include_pad=bool(int(a.get("count_include_pad", 0))),
                            ceil_mode=bool(int(a.get("ceil_mode", 0))))
        return pool, [x], info.channels, info.ndim

    def _op_Sum(self, node):
        ins = [t for t in node.inputs if not t.is_empty()]
        if len(ins) == 1:
            return self._op_Identity(node)
        return self._tensor_sum(node, ins)

    # -- sizes ---------------------------------------------------------------------------------------------
    def _sizes_of(self, name: str) -> tuple | None:
        """Each dim of a value as an int, or as ``(origin, C, S)``: ``floor((size(origin) + C) / S)``.

        An origin is a named dim (``("param", "H")``: ONNX gives one size to one name) or a dim of an opaque
        value (``(value, dim)``).  Linear ops map ``(origin, C, S)`` exactly (:meth:`_sizes_after`), so two
        values with equal entries have equal sizes for every input size, which shape inference, inventing a
        new symbol per Conv output, cannot show.
        """
        if name in self.sizes:
            return self.sizes[name]
        shape = self.info(name).shape
        if shape is None:
            return None
        fixed = self.spatial.get(name)  # spatial ints only where the graph itself fixes them
        dims = []
        for i, d in enumerate(shape):
            if i >= 2 and fixed is not None and len(fixed) == len(shape) - 2:
                dims.append(fixed[i - 2])
            elif isinstance(d, int) and (i < 2 or fixed is not None):
                dims.append(d)
            else:
                dims.append((("param", d) if isinstance(d, str) and not d.startswith("unk__") else (name, i), 0, 1))
        return tuple(dims)

    def _sizes_after(self, op, data: str) -> tuple | None:
        dims = self._sizes_of(data)
        if dims is None or isinstance(op, core.Add):
            return dims
        if isinstance(op, core.Pad):
            geo = [(lo + hi, 1) for lo, hi in op.padding]  # (reach, stride)
        elif isinstance(op, core.AvgPool):
            geo = [(lo + hi - (k - 1), s) for (lo, hi), k, s in zip(op.padding, op.kernel_size, op.stride)]
        elif isinstance(op, core.Conv):
            if op.ndim == 0:
                return dims  # Gemm / MatMul on [N, C]: the batch dim is kept
            geo = [(lo + hi - d * (k - 1), s) for (lo, hi), k, s, d in
                   zip(op.padding, op.kernel_size, op.stride, op.dilation)]
        else:
            return dims  # per-channel ops and identities keep every size
        if len(geo) != len(dims) - 2:
            return None
        out = list(dims[:2])
        for d, (r, s) in zip(dims[2:], geo):
            c = r - 1 + s  # out = floor((m + c) / s) for input size m
            out.append((d + c) // s if isinstance(d, int) else (d[0], d[1] + c * d[2], d[2] * s))
        return tuple(out)

    def _tensor_sum(self, node, ins):
        infos = [self._float_input(node, t, quiet=True) for t in ins]
        ref = infos[0]
        ref_sizes = self._sizes_of(ins[0].name)
        for t, info in zip(ins[1:], infos[1:]):
            sizes = self._sizes_of(t.name)
            same = (info.rank == ref.rank and isinstance(info.channels, int) and info.channels == ref.channels
                    and sizes is not None and ref_sizes is not None and sizes[:1] + sizes[2:] == ref_sizes[:1]
                    + ref_sizes[2:])
            if not same:
                raise _Opaque(f"{node.op} of shapes {_fmt(ref.shape)} and {_fmt(info.shape)} is not provably a "
                              "same-shape branch sum (it may broadcast)")
        return core.Add(), list(ins), ref.channels, ref.ndim

    def _binary(self, node):
        a, b = self._input(node, 0), self._input(node, 1)
        ca, cb = self.const(a), self.const(b)
        runtime = [t for t in (a, b) if _source_name(t) in self.overridable]
        if runtime:
            raise _Opaque(self.not_constant(runtime[0], f"{node.op} operand"))
        if ca is None and cb is None:
            if node.op == "Add":
                return self._tensor_sum(node, [a, b])
            raise _Opaque(None)
        if ca is not None and cb is not None:
            raise _Opaque(None)
        const_first = ca is not None
        x, c = (b, ca) if const_first else (a, cb)
        info = self._float_input(node, x, quiet=True)
        vec = self._per_channel(node, info, np.asarray(c))
        if node.op == "Add":
            aff = core.Affine(shift=vec)
        elif node.op == "Mul":
            aff = core.Affine(scale=vec)
        elif node.op == "Sub":
            aff = core.Affine(scale=np.array([-1.0]), shift=vec) if const_first else core.Affine(shift=-vec)
        else:  # Div
            if const_first:
                raise _Opaque(None)
            if np.any(vec == 0) or not np.all(np.isfinite(vec)):
                raise _Opaque("Div by a constant with zero or non-finite entries")
            aff = core.Affine(scale=1.0 / vec)
        return aff, [x], info.channels, info.ndim

    _op_Add = _op_Mul = _op_Sub = _op_Div = _binary

    def _per_channel(self, node, info: TensorInfo, c: np.ndarray) -> np.ndarray:
        r = info.rank
        if c.dtype.kind != "f" and str(c.dtype) != "bfloat16":
            raise _Opaque(None)
        if c.ndim > r:
            raise _Opaque(f"{node.op} by a constant of shape {list(c.shape)} broadcasts the rank-{r} input up")
        shape = (1,) * (r - c.ndim) + tuple(c.shape)
        if any(d != 1 for i, d in enumerate(shape) if i != 1):
            raise _Opaque(f"{node.op} by a constant of shape {list(c.shape)} is not per-channel (a scalar, "
                          "[C,1,..] or [1,C,1,..] folds)")
        if shape[1] != 1 and info.channels != shape[1]:
            raise _Opaque(f"{node.op} by a constant with {shape[1]} channels on an input with "
                          f"{info.channels} channels")
        return np.asarray(c, np.float64).reshape(-1)


def _source_name(t: gs.Tensor | None) -> str | None:
    """The name behind Identity aliases (what a parameter really reads)."""
    while t is not None and len(t.inputs) == 1 and t.inputs[0].op == "Identity" and t.inputs[0].inputs:
        t = t.inputs[0].inputs[0]
    return None if t is None else t.name


def _fmt(shape) -> str:
    return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def translate(graph: gs.Graph, inferred: Inferred, opset: int) -> Translation:
    """Build the core graph of ``graph`` (a topologically sorted main graph)."""
    return Translator(graph, inferred, opset).run()


__all__ = ["Translation", "Translator", "is_training_bn", "translate"]
