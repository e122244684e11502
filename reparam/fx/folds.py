"""Batch-norm folds in other directions than the region collapse's (conv, then BN, into one conv).

Each rule is a pattern, a condition and a replacement; the condition's failure is the reason the report
gives.  All weight math is the core's (:func:`reparam.core.fold_bn`, :func:`reparam.core.fold_bn_input`,
:func:`reparam.core.fold_bn_transpose`); the rules only find where it applies:

- :func:`fold_into_opaque_convs`: a transposed conv, or a conv subclass whose forward cannot be traced
  (TF-"same" padding computed from ``x.shape``), followed by a BN.  Folding scales the output channels, which
  is exact whatever the conv does to its input, once a probe run shows the forward is one convolution with
  the module's own weight and bias.
- :func:`fold_through_reshape`: ``bn(linear(x).flatten(0, 1))`` (LeViT): a row-major reshape to ``[M, C]``
  keeps the Linear's last dim as the BN's channels.
- :func:`fold_after_concat`: ``bn(cat([conv_a(x0), conv_b(x1)], 1))`` (MixConv): each conv takes its slice.
- :func:`fold_on_slices`: ``a, b = conv(x).chunk(2, 1); bn_a(a), bn_b(b)``: the conv takes both.
- :func:`fold_forward`: a BN read by several unpadded convs or Linears: each one absorbs it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import core
from ..core.errors import NotFusable
from ..torch_ops import (
    _BNS,
    _CONV_TRANSPOSES,
    _CONVS,
    bn_from_module,
    conv_from_module,
    numpy_dtype,
    plain_forward,
    read_only,
    to_module,
    to_numpy,
    to_tensor,
)
from .facts import data_users, metadata_users
from .report import FuseReport, RegionReport
from .rewrite import Part, Rewrite, _layout, _mutates, kernel_buffer, redirect_metadata
from .tracing import brief, safe_deepcopy, setting_kind
from .translate import _CONV_FUNCS, _bn_function, _conv_function
from .workspace import Workspace

BnRead = Callable[[], core.BatchNorm]


# ----------------------------------------------------------------------------------------- helpers


def bn_of(node: fx.Node, gm: Workspace) -> tuple[BnRead, str, fx.Node] | None:
    """``node`` as a batch norm of one input: how to read it (which may refuse), its label and its input."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        m = gm.get_submodule(node.target)
        if isinstance(m, _BNS) and plain_forward(m):
            return (lambda: bn_from_module(m)), type(m).__name__, node.args[0]
    if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm) and node.args \
            and isinstance(node.args[0], fx.Node):
        return (lambda: _bn_function(node)[0]), "batch_norm", node.args[0]
    return None


def move_shape_reads(gm: Workspace) -> int:
    """Point the size reads of a BN's output (``B, C, H, W = x.shape`` in an attention block, ``y.view_as(x)``)
    at the value it normalizes, which has the same sizes, where every reader of the BN's data is a conv or
    Linear it may fold into: a value whose sizes are read stays materialized (see
    ``translate._anchor_shape_reads``), which kept such a BN.  Returns the number of reads moved."""
    moved = 0
    for node in reversed(gm.graph.nodes):  # (from the end: a read moves up a chain of BNs)
        found = bn_of(node, gm)
        reads = [u for u, kind in metadata_users(node).items() if kind == "shape"] if found else []
        if not reads or not all(u.args and u.args[0] is node and conv_of(u, gm) for u in data_users(node)):
            continue
        for u in reads:
            u.replace_input_with(node, found[2])
        moved += len(reads)
    return moved


def batch_norms(gm: Workspace) -> Iterator[tuple[fx.Node, BnRead, str, fx.Node]]:
    """Each batch norm of the graph (as it is when reached: rules may erase nodes as they go), with how to
    read it, its label and its input."""
    for node in list(gm.graph.nodes):
        found = bn_of(node, gm) if not getattr(node, "_erased", False) else None
        if found is not None:
            yield (node, *found)


def conv_of(node: fx.Node, gm: Workspace) -> core.Conv | None:
    """The core conv of a standard conv/Linear module call or a functional conv on stored tensors."""
    try:
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            m = gm.get_submodule(node.target)
            if isinstance(m, (*_CONVS, nn.Linear)) and not m.training:
                return conv_from_module(m)
        if node.op == "call_function" and node.target in _CONV_FUNCS:
            return _conv_function(node, _CONV_FUNCS[node.target])[0]
        if node.op == "call_function" and node.target is F.linear and len(node.args) >= 2:
            w, b = node.args[1], node.args[2] if len(node.args) > 2 else None
            if isinstance(w.meta.get("constant"), torch.Tensor) and (b is None or "constant" in b.meta):
                return core.Conv(to_numpy(w.meta["constant"]), None if b is None else to_numpy(b.meta["constant"]))
    except NotFusable:
        return None
    return None


def _weight_of(node: fx.Node, gm: Workspace) -> torch.Tensor:
    if node.op == "call_module":
        return gm.get_submodule(node.target).weight
    return node.args[1].meta["constant"] if len(node.args) > 1 else node.kwargs["weight"].meta["constant"]


def _new_conv(conv: core.Conv, like: torch.Tensor, checked: bool = False) -> nn.Module:
    """A fresh conv/Linear module computing ``conv``, in ``like``'s dtype, device and memory format
    (``checked``: ``conv``'s kernel is already in that dtype and known finite)."""
    m = to_module(conv, dtype=like.dtype, device=like.device, checked=checked)
    layout = _layout(like)
    if layout is not torch.contiguous_format:
        target = getattr(m, "conv", m)
        target.weight = nn.Parameter(target.weight.detach().contiguous(memory_format=layout))
    return m


def _fold_into(conv: core.Conv, norm: core.Affine | core.BatchNorm, like: torch.Tensor) -> tuple[core.Conv, bool]:
    """``core.fold_bn(conv, norm)``, the kernel computed straight into a new tensor of ``like``'s dtype where
    that is the conv's (as the region rewrite does), and whether it is (so in that dtype and checked finite)."""
    out = kernel_buffer(conv.weight.shape, like.dtype, like.device) if conv.dtype == numpy_dtype(like.dtype) \
        else None
    return core.fold_bn(conv, norm, out=out), out is not None


def _folded_conv(conv: core.Conv, norm: core.Affine | core.BatchNorm, like: torch.Tensor) -> nn.Module:
    """``norm(conv(x))`` as a fresh module like :func:`_new_conv`'s."""
    folded, checked = _fold_into(conv, norm, like)
    return _new_conv(folded, like, checked=checked)


def _affine(parts: list[tuple[int, core.Affine | None]]) -> core.Affine:
    """One per-channel affine from consecutive channel slices, each its own affine (None: identity)."""
    scale, shift = [], []
    for n, aff in parts:
        scale.append(np.ones(n) if aff is None else aff.scale_for(n))
        shift.append(np.zeros(n) if aff is None else aff.shift_for(n))
    return core.Affine(np.concatenate(scale), np.concatenate(shift))


class _Fold:
    """One application of a rule: modules to add, nodes to replace, BNs to drop, and the checks."""

    def __init__(self, gm: Workspace, rw: Rewrite, report: FuseReport, prefix: str, bn: fx.Node) -> None:
        self.gm, self.rw, self.report, self.prefix, self.bn = gm, rw, report, prefix, bn
        self.id = f"{prefix}fold:{bn.name}"

    def call(self, nodes: list[fx.Node], module: nn.Module, arg: fx.Node, before: fx.Node) -> fx.Node:
        """A call of ``module`` on ``arg``, inserted before ``before``, named after ``nodes``."""
        name = self.rw.add_module(self.gm, nodes, module)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.call_module(name, (arg,))

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        self.rw.origin[new.name] = self.rw.source_of(old)
        old.replace_all_uses_with(new)

    def drop_bn(self, into: fx.Node) -> None:
        """The BN's readers read ``into`` instead (which now computes the BN's value: checks of later parts
        that read ``into`` take the BN's traced value)."""
        self.rw.origin[into.name] = self.rw.source_of(self.bn)
        redirect_metadata([self.bn], into)
        self.bn.replace_all_uses_with(into)
        self.gm.graph.erase_node(self.bn)

    def check(self, inputs: list[fx.Node], output: fx.Node, run: Callable) -> None:
        self.rw.parts.append(Part(self.id, [self.rw.source_of(i) for i in inputs], self.rw.source_of(output), run))

    def done(self, ops: list[str], convs: int) -> None:
        self.report.regions.append(RegionReport(self.prefix + self.bn.name, ops, convs, convs))


def _erase_if_unused(gm: Workspace, *nodes: fx.Node) -> None:
    for n in nodes:
        if not n.users:
            gm.graph.erase_node(n)


# ------------------------------------------------------------------------------------ opaque convs


class _Calls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.overloadpacket.__name__, tuple(args), out))
        return out


def _same(a: object, b: torch.Tensor | None) -> bool:
    if b is None or not isinstance(a, torch.Tensor):
        return a is None and b is None
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


_PROBED: dict[tuple, str | None] = {}  # probe_key -> verdict (bounded: cleared when full)


def probe_key(m: nn.Module) -> tuple | None:
    """What a probe's verdict depends on: ``m``'s class (its forward code) and plain settings, and the layout
    of its tensors, never their values.  None when ``m`` holds anything else (submodules, hooks, objects),
    which could change what its forward does: such a module is probed every time."""
    if m._modules:
        return None
    plain = []
    for k, v in vars(m).items():
        if k in ("_parameters", "_buffers"):
            continue
        kind = setting_kind(v)
        if kind is None:
            return None
        if kind != "empty":
            plain.append((k, v if kind == "value" else frozenset(v)))
    tensors = tuple((k, None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device))
                    for table in (m._parameters, m._buffers) for k, t in table.items())
    return type(m), type(m).forward, tuple(plain), tensors


def probe_conv(m: nn.Module) -> str | None:
    """None when ``m``'s forward is one convolution with ``m.weight`` and ``m.bias`` whose result it
    returns (so BN folds into those tensors exactly); else why not.  Runs ``m`` on two small inputs, once
    for each :func:`probe_key` (a net's many TF-"same" convs share a few: each probe costs about 1 ms)."""
    key = probe_key(m)
    if key is not None and key in _PROBED:
        return _PROBED[key]
    why = _probe(m)
    if key is not None:
        if len(_PROBED) >= 1024:
            _PROBED.clear()
        _PROBED[key] = why
    return why


def _probe(m: nn.Module) -> str | None:
    w, b = m.weight, m.bias
    nd = w.dim() - 2
    k, s, d = m.kernel_size, m.stride, m.dilation
    for extra in (3, 4):
        size = [(k[i] - 1) * d[i] + 1 + 2 * s[i] + extra for i in range(nd)]
        x = torch.randn(1, m.in_channels, *size, dtype=w.dtype, device=w.device)
        rec = _Calls()
        try:
            with torch.no_grad(), rec:
                y = m(x)
        except Exception as err:
            return f"it failed on a probe input ({brief(err)})"
        convs = [c for c in rec.calls if c[0] in ("convolution", "_convolution", "conv1d", "conv2d", "conv3d")]
        if len(convs) != 1:
            return f"its forward runs {len(convs)} convolutions"
        _, args, out = convs[0]
        if not _same(args[1], w) or not _same(args[2] if len(args) > 2 else None, b):
            return "its convolution does not use the module's own weight and bias"
        if len(args) > 6 and args[6]:
            return "its convolution is transposed"
        readers = [c for c in rec.calls if c is not convs[0]
                   and any(isinstance(a, torch.Tensor) and (_same(a, w) or (b is not None and _same(a, b)))
                           for a in c[1])]
        if readers:
            return f"it reads its weight in a {readers[0][0]} op too"
        if not _same(y, out):
            return "it changes the convolution's result before returning it"
    return None


def fold_into_opaque_convs(gm: Workspace, report: FuseReport, rw: Rewrite, prefix: str = "") -> int:
    """A transposed conv, or a conv subclass whose forward is not a standard conv, followed by a BN."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if not ((isinstance(m, _CONV_TRANSPOSES) and plain_forward(m)) or (isinstance(m, _CONVS)
                                                                          and not plain_forward(m))):
            continue  # (a standard conv and its BN are the region collapse's)
        readers = data_users(node)
        found = bn_of(readers[0], gm) if len(readers) == 1 else None
        if found is None or found[2] is not node:
            continue
        prod = producer(node, gm)
        if prod is None:
            continue
        read_bn, label, _ = found
        fold = _Fold(gm, rw, report, prefix, readers[0])
        if fold.id in rw.skip:
            continue
        try:
            new = prod.folded(read_bn())
        except NotFusable as err:
            rw.reasons[readers[0].name] = (f"{node.target} ({type(prod.module).__name__}): {err}", "not-foldable")
            continue
        out = fold.call([node], new, node.args[0], readers[0])
        redirect_metadata([node], out)
        fold.replace(node, out)
        fold.drop_bn(out)
        gm.graph.erase_node(node)
        fold.check([out.args[0]], readers[0], lambda v, new=new: new(v[0]))
        fold.done([type(prod.module).__name__, label], 1)
        done += 1
    return done


def _folded_transpose(ct: nn.Module, bn: core.BatchNorm) -> nn.Module:
    folded = core.fold_bn_transpose(core.ConvTranspose(to_numpy(ct.weight), to_numpy(ct.bias), groups=ct.groups), bn)
    new = type(ct)(ct.in_channels, ct.out_channels, ct.kernel_size, ct.stride, ct.padding, ct.output_padding,
                   ct.groups, True, ct.dilation, ct.padding_mode, device="meta")
    new.weight = nn.Parameter(to_tensor(folded.weight, ct.weight))
    new.bias = nn.Parameter(to_tensor(folded.bias, ct.weight, what="fused bias"))
    return new


def _folded_custom(m: nn.Module, bn: core.BatchNorm) -> nn.Module:
    why = probe_conv(m)
    if why is not None:
        raise NotFusable(f"its forward is not a plain conv, and it cannot be shown to be one: {why}")
    folded, checked = _fold_into(core.Conv(read_only(m.weight), to_numpy(m.bias), groups=m.groups), bn, m.weight)
    weight = nn.Parameter(to_tensor(folded.weight, m.weight, checked=checked).contiguous(
        memory_format=_layout(m.weight)))
    bias = nn.Parameter(to_tensor(folded.bias, m.weight, what="fused bias"))
    # a copy of the module with the folded tensors in place of its own (those are not copied first)
    new = safe_deepcopy(m, {id(m.weight): weight} | ({} if m.bias is None else {id(m.bias): bias}))
    new.bias = bias
    why = probe_conv(new)
    if why is not None:
        raise NotFusable(f"with a folded bias, {why}")
    return new


class Producer:
    """A node whose output channels a per-channel affine can be folded into: a standard conv or Linear (module
    or functional), a transposed conv, or a conv subclass whose forward is one convolution (probed)."""

    def __init__(self, node: fx.Node, gm: Workspace, conv: core.Conv | None, module: nn.Module | None) -> None:
        self.node, self.gm, self.conv, self.module = node, gm, conv, module
        w = module.weight if module is not None else _weight_of(node, gm)
        self.weight = w
        self.ndim = w.dim() - 2
        self.out_channels = conv.out_channels if conv is not None else (
            module.out_channels if hasattr(module, "out_channels") else w.shape[0])

    def folded(self, affine: core.Affine | core.BatchNorm) -> nn.Module:
        """A new module computing ``affine(this node's output)``; NotFusable with the reason if it cannot."""
        if self.conv is not None:
            return _folded_conv(self.conv, affine, self.weight)
        if isinstance(self.module, _CONV_TRANSPOSES):
            return _folded_transpose(self.module, affine)
        return _folded_custom(self.module, affine)


def producer(node: fx.Node, gm: Workspace) -> Producer | None:
    conv = conv_of(node, gm)
    if conv is not None:
        return Producer(node, gm, conv, None)
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    m = gm.get_submodule(node.target)
    if m.training or m._forward_hooks or m._forward_pre_hooks:
        return None
    if (isinstance(m, _CONV_TRANSPOSES) and plain_forward(m)) or (isinstance(m, _CONVS) and not plain_forward(m)):
        return Producer(node, gm, None, m)
    return None


# ------------------------------------------------------------------------------- through a reshape

_RESHAPES = {("call_method", "view"), ("call_method", "reshape"), ("call_method", "flatten"),
             ("call_function", torch.flatten), ("call_function", torch.reshape)}


def fold_through_reshape(gm: Workspace, ranks: dict[fx.Node, int], report: FuseReport, rw: Rewrite,
                         prefix: str = "") -> int:
    """``bn(linear(x).flatten(0, 1))``: a row-major reshape of a Linear's output to ``[M, C]`` keeps its last
    dim as the 2-D BN's channels, so the BN folds into the Linear."""
    done = 0
    for node, read_bn, label, shaped in batch_norms(gm):
        if (shaped.op, shaped.target) not in _RESHAPES or len(data_users(shaped)) != 1:
            continue
        lin = shaped.args[0]  # a Linear module or F.linear on stored weights (an exported program's form)
        while isinstance(lin, fx.Node) and (lin.op, lin.target) in _RESHAPES and len(data_users(lin)) == 1:
            lin = lin.args[0]  # a decomposed linear is view -> linear -> view: row-major reshapes keep i % C
        if not isinstance(lin, fx.Node) or lin.op not in ("call_module", "call_function") \
                or len(data_users(lin)) != 1:
            continue
        conv = conv_of(lin, gm)
        if conv is None or conv.weight.ndim != 2 or (
                lin.op == "call_module" and not isinstance(gm.get_submodule(lin.target), nn.Linear)):
            continue
        fold = _Fold(gm, rw, report, prefix, node)
        if fold.id in rw.skip:
            continue
        if ranks.get(shaped) != 2:
            rw.reasons[node.name] = ("it reads a reshape of a Linear's output whose rank is not known to be 2 "
                                     "(pass example_inputs)", "needs-shapes")
            continue
        try:
            new = _folded_conv(conv, read_bn(), _weight_of(lin, gm))
        except NotFusable as err:
            rw.reasons[node.name] = (str(err), "algebra")
            continue
        out = fold.call([lin, node], new, lin.args[0], lin)
        redirect_metadata([lin], out)
        fold.replace(lin, out)
        fold.drop_bn(shaped)
        gm.graph.erase_node(lin)
        channels = conv.out_channels
        fold.check([out.args[0]], node, lambda v, new=new, c=channels: new(v[0]).reshape(-1, c))
        fold.done(["Linear", str(shaped.target), label], 1)
        done += 1
    return done


# ----------------------------------------------------------------------------- concat and slices


def _channel_dim(node: fx.Node, i: int, name: str, default: int, rank: int | None) -> int | None:
    dim = node.kwargs.get(name, node.args[i] if len(node.args) > i else default)
    if not isinstance(dim, int):
        return None
    if dim < 0:
        return None if rank is None else dim + rank
    return dim


def fold_after_concat(gm: Workspace, ranks: dict[fx.Node, int], report: FuseReport, rw: Rewrite,
                      prefix: str = "") -> int:
    """``bn(cat([conv_a(x0), conv_b(x1), ...], 1))``: each conv, read by the concat alone, takes its slice."""
    done = 0
    for node, read_bn, label, cat in batch_norms(gm):
        if cat.op != "call_function" or cat.target not in (torch.cat, torch.concat) or len(data_users(cat)) != 1:
            continue
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        rank = ranks.get(cat)
        if _channel_dim(cat, 1, "dim", 0, rank) != 1 or not isinstance(parts, (list, tuple)) \
                or len(set(parts)) != len(parts):
            continue
        prods = [producer(p, gm) if isinstance(p, fx.Node) and len(data_users(p)) == 1 else None for p in parts]
        if any(c is None for c in prods) or any(c.ndim + 2 != (rank or 0) for c in prods):
            continue
        fold = _Fold(gm, rw, report, prefix, node)
        if fold.id in rw.skip:
            continue
        try:
            bn = read_bn()
            if bn.channels != sum(c.out_channels for c in prods):
                continue
            aff, start, news = bn.to_affine(), 0, []
            for c in prods:
                n = c.out_channels
                news.append(c.folded(core.Affine(aff.scale[start:start + n], aff.shift[start:start + n])))
                start += n
        except NotFusable as err:
            rw.reasons[node.name] = (str(err), "algebra")
            continue
        modules = []
        for p, mod in zip(parts, news):
            out = fold.call([p, node], mod, p.args[0], p)
            redirect_metadata([p], out)
            fold.replace(p, out)
            gm.graph.erase_node(p)
            modules.append((mod, out))
        fold.drop_bn(cat)
        fold.check([o.args[0] for _, o in modules], node,
                   lambda v, ms=[m for m, _ in modules]: torch.cat([m(x) for m, x in zip(ms, v)], 1))
        fold.done(["cat", label], len(parts))
        done += 1
    return done


def _slice_sizes(split: fx.Node, channels: int) -> list[int] | None:
    """Channel counts of the pieces of a ``split``/``chunk`` along dim 1."""
    if split.op == "call_method":
        name = split.target
    elif split.target in (torch.split, torch.chunk):
        name = split.target.__name__
    else:
        return None
    arg = split.kwargs.get("split_size_or_sections" if name == "split" else "chunks",
                           split.kwargs.get("split_size", split.args[1] if len(split.args) > 1 else None))
    if name == "split":
        if isinstance(arg, int) and arg > 0:
            sizes = [arg] * (channels // arg) + ([channels % arg] if channels % arg else [])
        elif isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
            sizes = list(arg)
        else:
            return None
    elif name == "chunk" and isinstance(arg, int) and arg > 0:
        size = -(-channels // arg)
        sizes = [size] * (channels // size) + ([channels % size] if channels % size else [])
    else:
        return None
    return sizes if sum(sizes) == channels else None


def fold_on_slices(gm: Workspace, ranks: dict[fx.Node, int], report: FuseReport, rw: Rewrite,
                   prefix: str = "") -> int:
    """``a, b = conv(x).chunk(2, 1)`` (or ``split``) with a BN on some pieces: the conv takes them all."""
    done = 0
    for node in list(gm.graph.nodes):
        readers = data_users(node) if node.op in ("call_module", "call_function") else ()
        split = readers[0] if len(readers) == 1 else None
        if split is None or not ((split.op == "call_method" and split.target in ("split", "chunk"))
                                 or (split.op == "call_function" and split.target in (torch.split, torch.chunk))):
            continue
        prod = producer(node, gm)
        if prod is None or not prod.ndim:
            continue
        sizes = _slice_sizes(split, prod.out_channels)
        if sizes is None or _channel_dim(split, 2, "dim", 0, ranks.get(node)) != 1 \
                or ranks.get(node) != prod.ndim + 2:
            continue
        pieces: dict[int, tuple[fx.Node, fx.Node, BnRead, str]] = {}
        for g in list(split.users):
            if g.op != "call_function" or g.target is not operator.getitem or not isinstance(g.args[1], int):
                pieces = {}
                break
            users = data_users(g)
            found = bn_of(users[0], gm) if len(users) == 1 else None
            if found is not None and found[2] is g:
                pieces[g.args[1] % len(sizes)] = (g, users[0], found[0], found[1])
        if not pieces:
            continue
        first_bn = pieces[min(pieces)][1]
        fold = _Fold(gm, rw, report, prefix, first_bn)
        if fold.id in rw.skip:
            continue
        try:
            affs = [(n, pieces[i][2]().to_affine() if i in pieces else None) for i, n in enumerate(sizes)]
            new = prod.folded(_affine(affs))
        except NotFusable as err:
            rw.reasons[first_bn.name] = (str(err), "algebra")
            continue
        out = fold.call([node, first_bn], new, node.args[0], node)
        redirect_metadata([node], out)
        fold.replace(node, out)
        gm.graph.erase_node(node)
        starts = np.cumsum([0, *sizes])
        for i, (g, bn_node, _, _) in pieces.items():
            rw.origin[g.name] = rw.source_of(bn_node)
            redirect_metadata([bn_node], g)
            bn_node.replace_all_uses_with(g)
            gm.graph.erase_node(bn_node)
            fold.check([out.args[0]], bn_node, lambda v, new=new, a=int(starts[i]), b=int(starts[i + 1]):
                       new(v[0])[:, a:b])
        fold.done([type(new).__name__, str(split.target), *(p[3] for p in pieces.values())], 1)
        done += 1
    return done


# --------------------------------------------------------------------------------------- forward


def fold_forward(gm: Workspace, ranks: dict[fx.Node, int], report: FuseReport, rw: Rewrite,
                 prefix: str = "") -> int:
    """A BN read by several convs or Linears that do not pad: each one absorbs it (``conv(bn(x))`` is one
    conv), so the BN is gone.  A BN read by one conv is the region collapse's job, as is a BN right after a
    conv it folds into."""
    done = 0
    for node, read_bn, label, src in batch_norms(gm):
        readers = data_users(node)
        if len(readers) < 2 or (conv_of(src, gm) is not None and len(data_users(src)) == 1):
            continue
        convs = [conv_of(u, gm) if u.args and u.args[0] is node and _reads_once(u, node) else None for u in readers]
        if any(c is None for c in convs):
            continue
        rank = ranks.get(src)
        if any(rank is None or c.ndim + 2 != rank for c in convs):
            rw.reasons.setdefault(node.name, ("its readers are convs or Linears, but the rank of its input is not "
                                              "known to match theirs (pass example_inputs)", "needs-shapes"))
            continue
        fold = _Fold(gm, rw, report, prefix, node)
        if fold.id in rw.skip:
            continue
        writer = _overwritten(src, node, readers, gm)
        if writer is not None:
            rw.reasons[node.name] = (f"{writer.name} overwrites its input in place before its readers run", "algebra")
            continue
        try:
            bn = read_bn()
            news = [core.fold_bn_input(bn, c) for c in convs]
        except NotFusable as err:
            rw.reasons[node.name] = (f"it feeds several convs and one cannot absorb it: {err}", "padded-conv"
                                     if "pads" in str(err) else "algebra")
            continue
        for u, c in zip(readers, news):
            mod = _new_conv(c, _weight_of(u, gm))
            out = fold.call([u], mod, src, u)
            redirect_metadata([u], out)
            fold.check([src], u, lambda v, mod=mod: mod(v[0]))
            fold.replace(u, out)
            gm.graph.erase_node(u)
        if metadata_users(node):
            redirect_metadata([node], src)
        gm.graph.erase_node(node)
        fold.done([label, *(f"{len(readers)} convs",)], len(readers))
        done += 1
    return done


def _overwritten(src: fx.Node, start: fx.Node, readers: list[fx.Node], gm: Workspace) -> fx.Node | None:
    """A node after ``start`` and before the last of ``readers`` that writes ``src`` in place (moving the
    readers' reads of ``src`` past it would change what they read)."""
    last = max(readers, key=_position)
    for user in src.users:
        if _mutates(user, gm) is src and _position(start) < _position(user) < _position(last):
            return user
    return None


def _position(node: fx.Node) -> int:
    pos = node.meta.get("_position")
    if pos is None:
        for k, n in enumerate(node.graph.nodes):
            n.meta["_position"] = k
        pos = node.meta["_position"]
    return pos


def _reads_once(user: fx.Node, node: fx.Node) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg((user.args, user.kwargs), lambda a: found.append(a) if a is node else None)
    return len(found) == 1


def apply_folds(gm: Workspace, ranks: dict[fx.Node, int], report: FuseReport, rw: Rewrite, prefix: str = "") -> int:
    """Every rule of this module, in an order where each leaves the others' patterns intact."""
    return (fold_into_opaque_convs(gm, report, rw, prefix) + fold_through_reshape(gm, ranks, report, rw, prefix)
            + fold_after_concat(gm, ranks, report, rw, prefix) + fold_on_slices(gm, ranks, report, rw, prefix)
            + fold_forward(gm, ranks, report, rw, prefix))


__all__ = ["apply_folds", "bn_of", "conv_of", "fold_after_concat", "fold_forward", "fold_into_opaque_convs",
           "fold_on_slices", "fold_through_reshape", "move_shape_reads", "probe_conv"]
