"""Facts about an fx graph's values that the translation needs without running the model.

- **Metadata reads.** ``x.shape``, ``x.size()``, ``x.ndim``, ``x.dtype``, ``torch._assert(x.ndim == 4)``... read
  facts a fused value shares with the value it replaces; they are not uses of ``x``'s data, so they never
  make ``x`` "read outside its region".  :func:`metadata_kind` says which fact a node reads of a value:
  ``"rank"`` (rank, dtype, device: the same for every value of a linear region) or ``"shape"`` (sizes:
  the same only along ops that keep the shape, such as BN).
- **Ranks.** A per-channel constant ``[C, 1, 1]`` or a ``Linear`` is linear per channel only at a known rank.
  :func:`infer_ranks` reads ranks off the graph: ops that keep the rank (convs, BN, activations, pools...)
  tie their input and output together, and facts pin a class (a ``BatchNorm2d`` input is 4-D, ``flatten(1)``
  gives 2-D, ``torch._assert(x.ndim == 4)``...).  Example inputs, when given, fill in every rank.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..torch_ops import _BNS, _CONV_TRANSPOSES, _CONVS, _IDENTITIES, _PADS, _POOLS
from .workspace import Workspace

_RANK_ATTRS = {"ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized", "is_meta",
               "requires_grad", "is_mkldnn", "is_nested", "is_cpu"}
_SHAPE_ATTRS = {"shape"}
_RANK_METHODS = {"dim", "ndimension", "is_contiguous", "is_floating_point", "is_complex", "element_size",
                 "get_device", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
_SHAPE_METHODS = {"size", "numel", "nelement"}
_RANK_FUNCS = {torch.is_floating_point, torch.is_complex}
_SHAPE_FUNCS = {torch.numel, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}


_ATEN_META = {torch.ops.aten.sym_size.int: "shape", torch.ops.aten.sym_numel.default: "shape",
              torch.ops.aten.sym_size.default: "shape"}


def metadata_kind(user: fx.Node, value: fx.Node) -> str | None:
    """``"rank"`` or ``"shape"`` when ``user`` reads only metadata of ``value``; None for a use of its data."""
    args = user.args
    if user.op == "call_function" and user.target in _ATEN_META:
        return _ATEN_META[user.target] if args and args[0] is value and not _elsewhere(user, value, 1) else None
    if user.op == "call_function":
        if user.target is getattr and len(args) == 2 and args[0] is value:
            return "rank" if args[1] in _RANK_ATTRS else "shape" if args[1] in _SHAPE_ATTRS else None
        if user.target in _RANK_FUNCS and args and args[0] is value:
            return "rank"
        if user.target in _SHAPE_FUNCS and args and args[0] is value and not _elsewhere(user, value, 1):
            return "shape"
        return None
    if user.op == "call_method" and args and args[0] is value and not _elsewhere(user, value, 1):
        if user.target in _RANK_METHODS:
            return "rank"
        if user.target in _SHAPE_METHODS:
            return "shape"
        return None
    if user.op == "call_method" and user.target in _OTHER_METHODS and len(args) == 2 and args[1] is value \
            and args[0] is not value:
        return _OTHER_METHODS[user.target]
    return None


# ``y.view_as(x)``: reads the shape of ``x`` (its second argument) only
_OTHER_METHODS = {"type_as": "rank", "view_as": "shape", "reshape_as": "shape", "expand_as": "shape"}


def _elsewhere(user: fx.Node, value: fx.Node, start: int) -> bool:
    """``value`` appears again among ``user``'s arguments from position ``start`` (or in its kwargs)."""
    found = []
    fx.node.map_arg((user.args[start:], user.kwargs), lambda a: found.append(a) if a is value else None)
    return bool(found)


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its data (metadata reads excluded)."""
    return [u for u in node.users if metadata_kind(u, node) is None]


def metadata_users(node: fx.Node) -> dict[fx.Node, str]:
    """The users of ``node`` that read only its metadata, with the kind of fact they read."""
    out = {}
    for u in node.users:
        kind = metadata_kind(u, node)
        if kind is not None:
            out[u] = kind
    return out


# ------------------------------------------------------------------------------------------- ranks

_KEEP_RANK_MODULES = (*_CONVS, *_CONV_TRANSPOSES, *_BNS, *_POOLS, *_PADS, *_IDENTITIES, nn.ReLU, nn.ReLU6,
                      nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.PReLU,
                      nn.ELU, nn.Mish, nn.Softplus, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Upsample,
                      nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
                      nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Hardtanh)
_KEEP_RANK_FUNCS = {F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid, torch.tanh,
                    F.leaky_relu, torch.relu, F.elu, F.mish, F.softplus, F.hardtanh, torch.clamp, F.conv1d, F.conv2d,
                    F.conv3d, torch.conv2d, torch.conv1d, torch.conv3d, F.batch_norm, torch.batch_norm, F.avg_pool1d,
                    F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool2d,
                    F.adaptive_avg_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pad, F.dropout, F.dropout2d,
                    F.linear, F.layer_norm, F.group_norm, F.normalize, torch.neg, operator.neg, torch.abs,
                    torch.exp, F.softmax, torch.softmax, F.conv_transpose2d, torch.nn.functional.hardsigmoid}
_KEEP_RANK_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "clamp", "clamp_",
                      "neg", "abs", "exp", "softmax", "float", "half", "double", "to", "type_as", "detach",
                      "mul_", "add_", "sub_", "div_", "hardswish", "hardswish_", "hardtanh", "hardtanh_"}
_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub,
                torch.div, operator.iadd, operator.imul, operator.isub, operator.itruediv}
_ELEMENTWISE_METHODS = {"add", "mul", "sub", "div", "add_", "mul_", "sub_", "div_"}


class _Ranks:
    """Union-find over values that share a rank, each class with its rank once known."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.rank: dict[fx.Node, int] = {}
        self.conflict: set[fx.Node] = set()

    def find(self, n: fx.Node) -> fx.Node:
        self.parent.setdefault(n, n)
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        self.parent[rb] = ra
        if rb in self.rank:
            self.fix(ra, self.rank.pop(rb))
        if rb in self.conflict:
            self.conflict.discard(rb)
            self.conflict.add(ra)

    def fix(self, n: fx.Node, r: int) -> None:
        root = self.find(n)
        known = self.rank.get(root)
        if known is not None and known != r:
            self.conflict.add(root)  # e.g. an unbatched and a batched use: trust neither
        self.rank[root] = r

    def get(self, n: fx.Node) -> int | None:
        root = self.find(n)
        return None if root in self.conflict else self.rank.get(root)


def infer_ranks(ws: Workspace) -> dict[fx.Node, int]:
    """The rank of every value whose rank the graph decides (shape-propagated ranks win when present)."""
    r = _Ranks()
    nodes = list(ws.graph.nodes)
    # later sweeps carry ranks found late (by a later BN) back through rank-changing ops: only the facts
    # that read ranks known so far can add anything; the first sweep has recorded all the others
    conditional = [n for n in nodes if _rank_facts(n, ws, r)]
    for _ in range(5):
        known = len(r.rank)
        for node in conditional:
            _rank_facts(node, ws, r)
        if len(r.rank) == known:
            break
    out = {}
    for node in nodes:
        shape = meta_shape(node)
        rank = len(shape) if shape is not None else r.get(node)
        if rank is not None:
            out[node] = rank
    return out


def meta_shape(node: fx.Node) -> tuple | None:
    """The shape recorded on a node: by shape propagation (``tensor_meta``) or, in an exported program, its
    fake value (``val``); sizes that are symbolic there are ``torch.SymInt``."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is None:
        val = node.meta.get("val")
        shape = val.shape if isinstance(val, torch.Tensor) else None
    return tuple(shape) if shape is not None else None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


def drop_implied_checks(ws: Workspace) -> int:
    """Remove each rank check (``torch._assert(x.ndim == k)``, timm's norm layers' own) that the checks and
    ops before it in the graph already guarantee; the number removed.

    The graph is read in its order, with only the facts established so far (an earlier check on a value of
    the same rank class, a ``BatchNorm2d`` that raises on other ranks, a reshape to a given rank; never
    example-input shapes): a removed check could not have failed, so the model raises where and when it
    did.  A model of timm's norm-act layers keeps its first check; the others are a third of its traced
    nodes, which every later pass and every call of the fused model would otherwise carry.  Nothing is
    removed from a graph that changes a tensor's rank in place (``x.unsqueeze_(0)``).
    """
    nodes = list(ws.graph.nodes)
    if any(n.op == "call_method" and n.target in _RANK_CHANGING_INPLACE for n in nodes):
        return 0
    r = _Ranks()
    dropped = 0
    for node in nodes:
        if node.op == "call_function" and node.target is torch._assert and node.args \
                and isinstance(node.args[0], fx.Node) and not node.users:
            fact = _rank_check(node.args[0])
            if fact is not None and r.get(fact[0]) == fact[1]:
                cond = node.args[0]
                ws.graph.erase_node(node)
                if not cond.users:  # (its rank read goes with the unread reads below)
                    ws.graph.erase_node(cond)
                dropped += 1
                continue
        _rank_facts(node, ws, r, shapes=False)
    for node in reversed(nodes):  # reads left without a reader (also the rank a check's message was formatted
        if not node.users and _metadata_read(node):  # with); an erased check or comparison is neither
            ws.graph.erase_node(node)
    return dropped


def _metadata_read(node: fx.Node) -> bool:
    """A read of a value's metadata (``getattr(x, "ndim")``, ``x.dim()``, ``x.size()``): pure, so it goes when
    nothing reads it."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in ("dim", "ndimension", "size")


_METADATA_ATTRS = _RANK_ATTRS | _SHAPE_ATTRS
_RANK_CHANGING_INPLACE = {"unsqueeze_", "squeeze_", "resize_", "resize_as_", "as_strided_", "set_", "t_",
                          "transpose_", "swapdims_", "swapaxes_"}


def _rank_facts(node: fx.Node, ws: Workspace, r: _Ranks, shapes: bool = True) -> bool:
    """Record what ``node`` says of ranks; True when that read ranks known so far (a sum of two tensors, a
    flatten of some dims, a reduction), so that a later sweep may find more."""
    shape = meta_shape(node) if shapes else None
    if shape is not None:
        r.fix(node, len(shape))
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        m = ws.get_submodule(node.target)
        if x is None or len(node.args) != 1:
            return False
        if isinstance(m, _KEEP_RANK_MODULES) and type(m) is not nn.Flatten:
            r.union(x, node)
        if isinstance(m, nn.BatchNorm2d):  # BatchNorm1d takes 2-D and 3-D input: no fact
            r.fix(x, 4)
        elif isinstance(m, nn.BatchNorm3d):
            r.fix(x, 5)
        elif isinstance(m, nn.Flatten) and m.end_dim == -1 and m.start_dim >= 0:
            r.fix(node, m.start_dim + 1)
        return False
    if node.op == "call_function":
        fn = node.target
        if fn in _KEEP_RANK_FUNCS and x is not None:
            r.union(x, node)
        elif fn in _ELEMENTWISE and len(node.args) == 2:
            _elementwise(node, r)
            return True
        elif fn is torch.flatten and x is not None:
            _flatten(node, r, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
            return True
        elif fn is torch._assert and node.args and isinstance(node.args[0], fx.Node):
            _assert_rank(node.args[0], r)
        elif fn in (torch.cat, torch.concat) and node.args and isinstance(node.args[0], (list, tuple)):
            for t in node.args[0]:
                if isinstance(t, fx.Node):
                    r.union(t, node)
        elif fn is torch.reshape and len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
            r.fix(node, len(node.args[1]))
        elif fn in (torch.transpose, torch.swapaxes) and x is not None:
            r.union(x, node)
        elif fn is operator.getitem and x is not None and isinstance(node.args[1], int) and _splits(x):
            r.union(x.args[0], node)  # a piece of a split keeps the rank of what was split
        return False
    if node.op == "call_method" and x is not None:
        name = node.target
        if name in _KEEP_RANK_METHODS or name in ("transpose", "swapaxes", "masked_fill"):
            r.union(x, node)
        elif name in _ELEMENTWISE_METHODS and len(node.args) == 2:
            _elementwise(node, r)
            return True
        elif name == "flatten":
            _flatten(node, r, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
            return True
        elif name in ("view", "reshape") and len(node.args) >= 2:
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            if not (len(dims) == 1 and isinstance(dims[0], fx.Node)):  # view(other.shape): a size object
                r.fix(node, len(dims))
        elif name in ("permute",) and len(node.args) >= 2:
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            r.fix(node, len(dims))
            r.fix(x, len(dims))
        elif name in ("view_as", "reshape_as", "expand_as") and len(node.args) == 2 \
                and isinstance(node.args[1], fx.Node):
            r.union(node.args[1], node)
        elif name in _REDUCTIONS:
            _reduction(node, r)
            return True
    if node.op == "call_function" and node.target in (torch.mean, torch.sum, torch.amax) and x is not None:
        _reduction(node, r)
        return True
    return False


_REDUCTIONS = {"mean", "sum", "amax", "amin"}


def _reduction(node: fx.Node, r: _Ranks) -> None:
    """``x.mean(dims, keepdim)``: the rank drops by the number of dims reduced (or stays, with keepdim)."""
    dims = _arg(node, 1, "dim", None)
    keep = _arg(node, 2, "keepdim", False)
    if dims is None or not isinstance(keep, bool):
        return
    if keep:
        r.union(node.args[0], node)
        return
    count = 1 if isinstance(dims, int) else len(dims) if isinstance(dims, (list, tuple)) else None
    rank = r.get(node.args[0])
    if count is not None and rank is not None:
        r.fix(node, rank - count)


def _splits(node: fx.Node) -> bool:
    """``node`` splits a tensor into pieces of the same rank (``split``, ``chunk``, ``tensor_split``)."""
    names = ("split", "chunk", "tensor_split")
    if node.op == "call_method":
        return node.target in names
    return node.op == "call_function" and getattr(node.target, "__name__", "") in names and node.args \
        and isinstance(node.args[0], fx.Node)


def _elementwise(node: fx.Node, r: _Ranks) -> None:
    """``a op b``: with a number, the rank is kept; with two tensors, the output has the larger rank."""
    a, b = node.args
    tensors = [t for t in (a, b) if isinstance(t, fx.Node)]
    if len(tensors) == 1:
        r.union(tensors[0], node)
        return
    consts = [t.meta["constant"].ndim for t in tensors if isinstance(t.meta.get("constant"), torch.Tensor)]
    values = [t for t in tensors if not isinstance(t.meta.get("constant"), torch.Tensor)]
    ranks = [r.get(t) for t in values] + consts
    if None not in ranks:
        r.fix(node, max(ranks))
    elif len(values) == 1 and consts:  # x (op) c: a known output rank above c's is x's rank
        out = r.get(node)
        if out is not None and out > max(consts):
            r.fix(values[0], out)


def _flatten(node: fx.Node, r: _Ranks, start: Any, end: Any) -> None:
    x = node.args[0]
    if not isinstance(start, int) or not isinstance(end, int):
        return
    if end == -1 and start >= 0:
        r.fix(node, start + 1)
        return
    rank = r.get(x)
    if rank is None:
        return
    s, e = start % rank if rank else 0, end % rank if rank else 0
    r.fix(node, rank - (e - s))


def _assert_rank(cond: fx.Node, r: _Ranks) -> None:
    """``torch._assert(x.ndim == k)`` / ``x.dim() == k``: ``x`` has rank ``k``."""
    fact = _rank_check(cond)
    if fact is not None:
        r.fix(*fact)


def _rank_check(cond: fx.Node) -> tuple[fx.Node, int] | None:
    """``(x, k)`` when ``cond`` is ``x.ndim == k`` or ``x.dim() == k`` (``k`` a number)."""
    if cond.op != "call_function" or cond.target is not operator.eq or len(cond.args) != 2:
        return None
    probe, k = cond.args
    if isinstance(k, fx.Node):
        probe, k = k, probe
    if type(k) is not int or not isinstance(probe, fx.Node) or not probe.args:
        return None
    value = probe.args[0]
    if not isinstance(value, fx.Node):
        return None
    if (probe.op == "call_function" and probe.target is getattr and probe.args[1] == "ndim") or (
            probe.op == "call_method" and probe.target in ("dim", "ndimension") and len(probe.args) == 1):
        return value, k
    return None




# --------------------------------------------------------------------------------------- constants

_RANDOM = ("rand", "normal", "bernoulli", "dropout", "multinomial", "poisson", "uniform", "exponential", "empty",
           "manual_seed", "seed")


def _pure(node: fx.Node) -> bool:
    """A torch or operator call without side effects or randomness (safe to evaluate once at fuse time)."""
    if "out" in node.kwargs or node.kwargs.get("inplace"):
        return False
    if node.op == "call_method":
        name = str(node.target)
        return not (name.endswith("_") and not name.endswith("__")) and not any(w in name for w in _RANDOM)
    if node.op != "call_function":
        return False
    fn = node.target
    name = getattr(fn, "__name__", "")
    if fn in (operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.setitem):
        return False
    if any(w in name for w in _RANDOM) or (name.endswith("_") and not name.endswith("__")):
        return False
    module = getattr(fn, "__module__", None) or ""
    return module.startswith("torch") or module in ("_operator", "operator") or fn is getattr


def fold_constants(ws: Workspace) -> None:
    """Evaluate what depends on stored tensors and literals only (``w * (var + eps).rsqrt()`` of a frozen BN,
    ``gamma.view(1, -1, 1, 1)`` of a layer scale): ``node.meta["constant"]`` holds the value."""
    for node in ws.graph.nodes:
        node.meta.pop("constant", None)
        if node.op == "get_attr":
            node.meta["constant"] = ws.attr(node.target)
            continue
        if node.op not in ("call_function", "call_method") or not _pure(node):
            continue
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        if not inputs or any("constant" not in i.meta for i in inputs):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["constant"])
        try:
            with torch.no_grad():
                fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
                value = fn(*args[1:], **kwargs) if node.op == "call_method" else fn(*args, **kwargs)
        except Exception:  # whatever it is, it is not a constant we can use
            continue
        node.meta["constant"] = value


_VIEWS = {"view", "reshape", "transpose", "permute", "t", "expand", "unsqueeze", "squeeze", "flatten", "contiguous",
          "detach", "view_as", "reshape_as", "expand_as"}


def _computes(node: fx.Node) -> bool:
    """``node`` does arithmetic (not only a view, a reshape or a basic slice of what it reads)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _VIEWS or node.target is getattr:
        return False
    if node.target is operator.getitem:
        index = node.args[1] if len(node.args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, fx.Node) for p in parts)  # indexing with a tensor gathers
    return True


def constant_frontier(ws: Workspace) -> list[fx.Node]:
    """Values computed at run time from stored tensors alone (weight standardization, a frozen BN's scale, a
    gathered attention bias) that the rest of the graph reads: storing them once saves the computation."""
    out = []
    for node in ws.graph.nodes:
        if node.op not in ("call_function", "call_method") or not isinstance(node.meta.get("constant"), torch.Tensor):
            continue
        if not any("constant" not in u.meta for u in node.users):
            continue
        seen, stack, computes = set(), [node], False
        while stack and not computes:
            n = stack.pop()
            if n in seen or n.op == "get_attr":
                continue
            seen.add(n)
            computes = _computes(n)
            stack.extend(n.all_input_nodes)
        if computes:
            out.append(node)
    return out


__all__ = ["constant_frontier", "data_users", "drop_implied_checks", "fold_constants", "infer_ranks", "meta_shape",
           "metadata_kind", "metadata_users"]
