"""Translate an fx graph into the core's neutral :class:`~reparam.core.LinearGraph`.

Every fx node becomes one graph node (``payload`` is the fx node): a core op when the node is provably
linear in its tensor input, opaque otherwise.  Layers that *could* be linear but are refused here (BN in
training mode or without running stats, hooked or overridden modules, Linear on an input not known to
be 2-D) are recorded with their reason.  Metadata reads (``x.shape``, ``x.ndim``...) are not uses of a
value's data (:mod:`.facts`); values computed from stored tensors alone are constants; ranks come from the
graph (:func:`.facts.infer_ranks`) or from shape propagation.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from numbers import Number
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import core
from ..core.errors import NotFusable
from ..torch_ops import _BNS, _CONVS, read_only, to_core, to_numpy
from .facts import data_users, fold_constants, infer_ranks, meta_shape, metadata_kind, metadata_users
from .workspace import Workspace

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid,
                        nn.Tanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish, nn.Softplus)
_ELEMENTWISE_FUNCS = {F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid,
                      torch.tanh, F.leaky_relu, torch.relu, F.elu, F.mish}
_ADDS = {operator.add, torch.add, operator.iadd}
_MULS = {operator.mul, torch.mul, operator.imul}
_SUBS = {operator.sub, torch.sub, operator.isub}
_DIVS = {operator.truediv, torch.div, operator.itruediv}
_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_POOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, torch.avg_pool1d: 1}
_DROPOUT_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_IDENTITY_METHODS = {"clone"}  # not ``contiguous``: a view after it depends on the memory layout it makes


@dataclass
class Translation:
    graph: core.LinearGraph
    refused: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    ranks: dict[fx.Node, int] = field(default_factory=dict)


@dataclass
class _Ctx:
    gm: Workspace
    users: dict[fx.Node, int]  # data users of each node (metadata reads do not count)
    info: dict[str, tuple[int | None, int | None]]  # node name -> (channels, spatial dims)
    ranks: dict[fx.Node, int]
    dtype: torch.dtype | None  # the model's floating dtype, for values of unknown dtype


def translate(gm: Workspace, ranks: dict[fx.Node, int] | None = None) -> Translation:
    """Build the neutral graph of ``gm``; shapes come from ``node.meta['tensor_meta']`` when present.

    ``ranks``: the graph's ranks with its constants already folded (when nothing changed the graph since);
    computed here otherwise."""
    if ranks is None:
        fold_constants(gm)
        ranks = infer_ranks(gm)
    out = Translation(core.LinearGraph(), ranks=ranks)
    ctx = _Ctx(gm, {n: len(data_users(n)) for n in gm.graph.nodes}, {}, ranks, _model_dtype(gm))
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output") or "constant" in node.meta:
            if node.op == "output":
                out.graph.mark_output(*[a.name for a in _tensor_args(node, out.graph)])
            continue
        try:
            op, inputs = _classify(node, ctx)
        except NotFusable as err:
            out.refused.append((node.name, str(err)))
            op, inputs = None, None
        if op is None or inputs is None:
            inputs = _tensor_args(node, out.graph)
        channels, ndim = _shape(node, ctx, op, inputs)
        ctx.info[node.name] = (channels, ndim)
        out.graph.add(node.name, op, [i.name for i in inputs], channels=channels, ndim=ndim, payload=node)
    _anchor_shape_reads(gm, out.graph)
    return out


def _model_dtype(gm: Workspace) -> torch.dtype | None:
    """The dtype of the model's first floating parameter, else of its first floating buffer."""
    for tensors in (gm.root.parameters(), gm.root.buffers()):  # (generators: stops at the first found)
        for t in tensors:
            if t.is_floating_point():
                return t.dtype
    return None


def _tensor_args(node: fx.Node, g: core.LinearGraph) -> list[fx.Node]:
    """The graph values ``node`` reads the data of (not those it only reads metadata of)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if a.name in g.nodes else None)
    return [a for a in dict.fromkeys(found) if metadata_kind(node, a) is None]


_SHAPE_KEEPING = (core.BatchNorm, core.Affine, core.Identity, core.Add)


def _anchor_shape_reads(gm: Workspace, g: core.LinearGraph) -> None:
    """A value whose sizes are read (``x.shape``) is fused away only along ops that keep its shape: follow
    its single data reader through BN, per-channel ops and sums; where that chain ends, the value is
    materialized, so the read can move to a value of the same shape (see ``rewrite.redirect_metadata``)."""
    for node in gm.graph.nodes:
        if node.name not in g.nodes or "shape" not in metadata_users(node).values():
            continue
        end = node
        while True:
            readers = data_users(end)
            if len(readers) != 1 or readers[0].name not in g.nodes \
                    or not isinstance(g.nodes[readers[0].name].op, _SHAPE_KEEPING):
                break
            end = readers[0]
        g.mark_output(end.name)


def _meta_shape(node: fx.Node) -> tuple | None:
    """The recorded shape, with a symbolic size (an exported program's dynamic dim) as None."""
    shape = meta_shape(node)
    return None if shape is None else tuple(s if isinstance(s, int) else None for s in shape)


def _shape(node, ctx: _Ctx, op, inputs) -> tuple[int | None, int | None]:
    gm, info = ctx.gm, ctx.info
    shape = _meta_shape(node)
    if shape is not None:
        return (shape[1] if len(shape) >= 2 else None), (len(shape) - 2 if len(shape) >= 2 else None)
    rank = ctx.ranks.get(node)
    if isinstance(op, core.Conv):
        return op.out_channels, op.ndim
    # a batch norm's statistics fix dim 1 of what it reads: a BN module (also one refused here), or
    # F.batch_norm (timm's norm-act layers)
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(m, _BNS) or isinstance(op, core.BatchNorm):
        nd = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(m))
        if nd is None and rank is not None:
            nd = rank - 2
        if nd is None and inputs:
            nd = info.get(inputs[0].name, (None, None))[1]
        return (m.num_features if isinstance(m, _BNS) else op.channels), nd
    keeps_shape = (op is not None and not isinstance(op, (core.AvgPool, core.Pad))) or (
        node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ELEMENTWISE_MODULES)) or (
        node.op == "call_function" and node.target in _ELEMENTWISE_FUNCS)
    if keeps_shape:
        for i in inputs:
            c, nd = info.get(i.name, (None, None))
            if c is not None:
                return c, nd
    if isinstance(op, (core.AvgPool, core.Pad)) and inputs:
        return info.get(inputs[0].name, (None, None))
    return None, (rank - 2 if rank is not None and rank >= 2 else None)


def _const(arg: Any) -> np.ndarray | None:
    """A python number, or a floating tensor computed from stored tensors alone, as a float64 array."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, Number):
        return np.asarray([float(arg)])
    if isinstance(arg, fx.Node):
        t = arg.meta.get("constant")
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return to_numpy(t)
    return None


def _is_value(arg: Any) -> bool:
    """A tensor the graph computes from its inputs (not a stored tensor or one computed from stored ones)."""
    return isinstance(arg, fx.Node) and arg.op != "get_attr" and "constant" not in arg.meta


def _promotes(arg: Any, x: fx.Node, ctx: _Ctx) -> torch.dtype | None:
    """The dtype ``x (op) arg`` would have when a stored tensor ``arg`` promotes ``x`` (a float64 buffer on a
    float32 model), else None: folding the op would keep ``x``'s dtype."""
    t = arg.meta.get("constant") if isinstance(arg, fx.Node) else None
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    tm = x.meta.get("tensor_meta")
    own = getattr(tm, "dtype", None) or ctx.dtype
    if own is None:
        return None
    result = torch.promote_types(own, t.dtype)
    return result if result != own else None


def _per_channel(c: np.ndarray, ndim: int | None, rank: int | None) -> np.ndarray | None:
    """The per-channel vector of a constant broadcast against a value with ``ndim`` spatial dims (batched or
    not) and, when known, ``rank``.

    A scalar always qualifies; ``[C, 1, ..]`` with exactly ``ndim`` trailing ones does on ``[N, C, *spatial]``
    and on ``[C, *spatial]``; ``[1, C, 1, ..]`` only on a value known to be batched (on an unbatched one it
    would add a dim).  With another rank the constant would broadcast along other axes.
    """
    if c.size == 1 and c.ndim <= 1 and (c.ndim == 0 or rank is not None or ndim is not None):
        return c.reshape(1)
    if ndim is None:
        return None
    shape = c.shape
    if len(shape) == ndim + 2 and shape[0] == 1 and rank == ndim + 2:
        shape = shape[1:]
    if len(shape) == ndim + 1 and all(s == 1 for s in shape[1:]):
        return c.reshape(-1)
    return None


def _shaped_per_channel(c: np.ndarray) -> bool:
    """``[C, 1, ...]`` or ``[1, C, 1, ...]``: per-channel for a value of the matching rank."""
    return any(_per_channel(c, nd, nd + 2) is not None for nd in (c.ndim - 1, c.ndim - 2) if nd >= 1)


def _param(arg: Any, what: str, view: bool = False) -> np.ndarray | None:
    """The stored tensor ``arg`` as float64 numpy, or with ``view`` (a kernel: the core only reads it) as a
    read-only view where numpy has its dtype, not a float64 copy of a large weight."""
    if arg is None:
        return None
    t = arg.meta.get("constant") if isinstance(arg, fx.Node) else None
    if isinstance(t, torch.Tensor):
        return read_only(t) if view else to_numpy(t)
    raise NotFusable(f"{what} is computed at run time, not a stored tensor")


def _classify(node: fx.Node, ctx: _Ctx) -> tuple[core.LinearOp | None, list | None]:
    """The core op of ``node`` and its tensor inputs, or (None, None) when it is not linear."""
    if node.op == "placeholder":
        return None, None
    if node.op == "call_module":
        return _classify_module(node, ctx)
    if node.op == "call_function":
        return _classify_function(node, node.target, ctx)
    if node.op == "call_method":
        return _classify_method(node, ctx)
    return None, None


def _classify_module(node: fx.Node, ctx: _Ctx):
    gm = ctx.gm
    m = gm.get_submodule(node.target)
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None, None
    if isinstance(m, nn.Linear):
        rank = ctx.ranks.get(node.args[0])
        if rank != 2:
            if not _feeds_bn(node, gm):
                return None, None
            known = "unknown" if rank is None else f"{rank}-D"
            raise NotFusable(f"Linear {node.target!r} is folded only on a 2-D input; its input is {known}"
                             + (" (pass example_inputs so shapes are known)" if rank is None else ""))
    if isinstance(m, (*_CONVS, *_BNS, nn.Linear)) and getattr(m, "training", False):
        raise NotFusable(f"{type(m).__name__} {node.target!r} stays in training mode after eval()")
    try:
        return to_core(m), [node.args[0]]
    except NotFusable as err:
        if isinstance(m, (*_CONVS, *_BNS, nn.Linear)):
            raise NotFusable(f"{node.target!r}: {err}") from None
        return None, None


def _feeds_bn(node: fx.Node, gm: Workspace) -> bool:
    for u in node.users:
        if u.op == "call_module" and isinstance(gm.get_submodule(u.target), _BNS):
            return True
        if u.op == "call_function" and u.target in (F.batch_norm, torch.batch_norm):
            return True
    return False


def _binary(node, ctx: _Ctx, a, b, kind: str):
    """Affine forms of ``a (op) b`` where one side is a per-channel constant; Add for tensor +/- tensor."""
    ca, cb = _const(a), _const(b)
    a_t = _is_value(a) and ca is None
    b_t = _is_value(b) and cb is None
    if kind == "add" and a_t and b_t:
        return core.Add(), [a, b]
    if kind == "sub" and a_t and b_t:
        return (core.Add((1.0, -1.0)), [a, b]) if a is not b else (None, None)
    if a_t == b_t:
        return None, None
    x, c, carg = (a, cb, b) if a_t else (b, ca, a)
    if c is None:  # the other side is neither a graph value nor a float constant (an int tensor, a size)
        return None, None
    ndim = ctx.info.get(x.name, (None, None))[1]
    rank = ctx.ranks.get(x)
    pc = _per_channel(c, ndim, rank)
    if pc is None:
        if _shaped_per_channel(c) and (ndim is None or rank is None):
            raise NotFusable(f"whether a constant of shape {list(c.shape)} is per-channel depends on the rank of "
                             f"{x.name}, unknown here (give example_inputs)")
        return None, None
    promoted = _promotes(carg, x, ctx)
    if promoted is not None:
        raise NotFusable(f"the constant promotes {x.name} to {promoted}; a fused conv would keep the input's dtype")
    if kind == "add":
        return core.Affine(shift=pc), [x]
    if kind == "mul":
        return core.Affine(scale=pc), [x]
    if kind == "sub":
        return (core.Affine(shift=-pc) if a_t else core.Affine(scale=np.array([-1.0]), shift=pc)), [x]
    if kind == "div" and a_t and np.all(pc != 0):
        return core.Affine(scale=1.0 / pc), [x]
    return None, None


def _mutates_shared(node: fx.Node, users: dict) -> bool:
    target = node.args[0] if node.args else None
    return isinstance(target, fx.Node) and users.get(target, 0) > 1


def _classify_function(node: fx.Node, fn, ctx: _Ctx):
    args, kw = node.args, node.kwargs
    if fn in _ADDS or fn in _MULS or fn in _SUBS or fn in _DIVS:
        if len(args) != 2 or set(kw) - {"alpha"} or kw.get("alpha", 1) != 1:
            return None, None
        if fn in (operator.iadd, operator.imul, operator.isub, operator.itruediv) \
                and _mutates_shared(node, ctx.users):
            return None, None
        kind = "add" if fn in _ADDS else "mul" if fn in _MULS else "sub" if fn in _SUBS else "div"
        return _binary(node, ctx, args[0], args[1], kind)
    if fn in (operator.neg, torch.neg):
        return core.Affine(scale=np.array([-1.0])), [args[0]]
    if fn in _CONV_FUNCS:
        return _conv_function(node, _CONV_FUNCS[fn])
    if fn is F.linear:
        return _linear_function(node, ctx)
    if fn in (F.batch_norm, torch.batch_norm):
        return _bn_function(node)
    if fn in _POOL_FUNCS:
        return _pool_function(node, _POOL_FUNCS[fn])
    if fn is F.pad:
        from ..torch_ops import pad_from_torch

        pad = kw.get("pad", args[1] if len(args) > 1 else None)
        mode = kw.get("mode", args[2] if len(args) > 2 else "constant")
        value = kw.get("value", args[3] if len(args) > 3 else None)
        if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
            return None, None
        return pad_from_torch(pad, mode, value or 0.0), [args[0]]
    if fn in _DROPOUT_FUNCS:
        training = kw.get("training", args[2] if len(args) > 2 else True)
        return (core.Identity(), [args[0]]) if training is False else (None, None)
    return None, None


def _opt(node, i, name, default):
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


def _conv_function(node, nd):
    w = _param(_opt(node, 1, "weight", None), "conv weight", view=True)
    b = _param(_opt(node, 2, "bias", None), "conv bias")
    stride, padding = _opt(node, 3, "stride", 1), _opt(node, 4, "padding", 0)
    dilation, groups = _opt(node, 5, "dilation", 1), _opt(node, 6, "groups", 1)
    dil = (dilation,) * nd if isinstance(dilation, int) else tuple(dilation)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        k = w.shape[2:]
        pads = []
        for i in range(nd):
            total = dil[i] * (k[i] - 1)
            pads.append((total // 2, total - total // 2))
        padding = tuple(pads)
    return core.Conv(w, b, stride=stride, padding=padding, dilation=dil, groups=groups), [node.args[0]]


def _linear_function(node, ctx: _Ctx):
    """``F.linear(x, w, b)`` on stored tensors: a 0-d conv, on a 2-D input only (like the module)."""
    if ctx.ranks.get(node.args[0]) != 2:
        return None, None
    w = _param(_opt(node, 1, "weight", None), "linear weight", view=True)
    b = _param(_opt(node, 2, "bias", None), "linear bias")
    return core.Conv(w, b), [node.args[0]]


def _bn_function(node):
    training = _opt(node, 5, "training", False)
    if training is not False:
        raise NotFusable("functional batch_norm runs with training=True (batch statistics)")
    mean = _param(_opt(node, 1, "running_mean", None), "batch_norm running_mean")
    var = _param(_opt(node, 2, "running_var", None), "batch_norm running_var")
    if mean is None or var is None:
        raise NotFusable("functional batch_norm without running statistics")
    gamma = _param(_opt(node, 3, "weight", None), "batch_norm weight")
    beta = _param(_opt(node, 4, "bias", None), "batch_norm bias")
    eps = _opt(node, 7, "eps", 1e-5)
    return core.BatchNorm(mean, var, gamma, beta, float(eps)), [node.args[0]]


def _pool_function(node, nd):
    def tup(v):
        return (v,) * nd if isinstance(v, int) else tuple(v)

    k = tup(_opt(node, 1, "kernel_size", None))
    stride = _opt(node, 2, "stride", None) or k
    pad = tup(_opt(node, 3, "padding", 0))
    return core.AvgPool(k, tup(stride), tuple((p, p) for p in pad), bool(_opt(node, 5, "count_include_pad", True)),
                        bool(_opt(node, 4, "ceil_mode", False)), _opt(node, 6, "divisor_override", None)), \
        [node.args[0]]


def _classify_method(node, ctx: _Ctx):
    name = node.target
    args = node.args
    if name in _IDENTITY_METHODS and len(args) == 1 and not node.kwargs:
        return core.Identity(), [args[0]]
    base = name[:-1] if name.endswith("_") else name
    if base in ("add", "mul", "sub", "div") and len(args) == 2 and (set(node.kwargs) <= {"alpha"}) \
            and node.kwargs.get("alpha", 1) == 1:
        if name.endswith("_") and _mutates_shared(node, ctx.users):
            return None, None
        return _binary(node, ctx, args[0], args[1], base)
    if base == "neg" and len(args) == 1:
        return core.Affine(scale=np.array([-1.0])), [args[0]]
    return None, None
