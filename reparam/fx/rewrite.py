"""Apply a core plan to an fx graph: replace each worthwhile region by one conv per source."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import core
from ..core.errors import NotFusable
from ..torch_ops import (
    _BNS,
    _CONV_TRANSPOSES,
    _IDENTITIES,
    bn_from_module,
    numpy_dtype,
    plain_forward,
    to_module,
    to_numpy,
    to_tensor,
)
from .report import FuseReport, RegionReport
from .translate import _bn_function
from .workspace import Workspace


@dataclass
class Rewrite:
    """New modules by qualified name, and which existing targets the rewritten graph still uses."""

    modules: dict[str, nn.Module] = field(default_factory=dict)


def _op_label(node: fx.Node, gm: Workspace) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__}({node.target})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target}"


def _is_conv_node(node: fx.Node, gm: Workspace) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    return node.op == "call_function" and "conv" in getattr(node.target, "__name__", "")


def _mutates(node: fx.Node, gm: Workspace) -> fx.Node | None:
    """The input an in-place node overwrites, if any."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).endswith("__"):
        return first
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        out = node.kwargs.get("out")
        if isinstance(out, fx.Node):
            return out
        if node.kwargs.get("inplace") or node.target in _INPLACE_OPERATORS or (
                name.endswith("_") and not name.endswith("__")):  # torch.relu_, F.relu_, torch.clamp_, ...
            return first
    if node.op == "call_module" and getattr(gm.get_submodule(node.target), "inplace", False):
        return first
    return None


_INPLACE_OPERATORS = (operator.iadd, operator.imul, operator.isub, operator.itruediv)


def _params_and_place(region_nodes: list[fx.Node], gm: Workspace) -> tuple[torch.dtype, torch.device]:
    for n in region_nodes:
        if n.op == "call_module":
            for p in gm.get_submodule(n.target).parameters():
                return p.dtype, p.device
        if n.op == "call_function":
            for a in n.args:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    t = gm.attr(a.target)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        return t.dtype, t.device
    tm = region_nodes[0].meta.get("tensor_meta")
    if tm is not None:
        return tm.dtype, torch.device("cpu")
    return torch.float32, torch.device("cpu")


def _readers_by_path(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """The nodes calling each module path or reading an attribute under it."""
    out: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            out.setdefault(str(n.target), []).append(n)
        elif n.op == "get_attr":
            parts = str(n.target).split(".")
            for k in range(1, len(parts)):
                out.setdefault(".".join(parts[:k]), []).append(n)
    return out


def _module_name(region, convs, nodes, exit_node, term, gm, rw, readers: dict[str, list[fx.Node]]) -> str:
    """Reuse the region's conv path when that module serves nowhere else; else a fresh flat name."""
    single = sum(not t.identity for t in region.terms) == 1
    if single and convs and convs[0].op == "call_module":
        target = str(convs[0].target)
        inside = set(nodes)
        others = [n for n in readers.get(target, ()) if n not in inside and not getattr(n, "_erased", False)]
        if not others and target not in rw.modules:
            return target
    return _fresh_name(f"{exit_node.name}_{term.source}", gm, rw.modules)


def _fresh_name(base: str, gm: Workspace, taken: dict[str, nn.Module]) -> str:
    base = base.replace(".", "_") or "fused"
    name, k = base, 1
    while name in taken or gm.has_attr(name):
        name, k = f"{base}_{k}", k + 1
    return name


def apply_plan(gm: Workspace, plan: core.Plan, lg: core.LinearGraph, report: FuseReport,
               rw: Rewrite, prefix: str = "") -> int:
    """Rewrite ``gm.graph`` in place from ``plan``; returns the number of regions rewritten."""
    graph = gm.graph
    readers = _readers_by_path(graph)
    replaced: dict[str, fx.Node] = {}
    threads = torch.get_num_threads()
    done = 0
    for region in plan.regions:
        if not region.worthwhile:
            continue
        nodes = [lg.nodes[n].payload for n in region.nodes]
        exit_node = nodes[-1]
        where = prefix + exit_node.name
        try:
            _check_no_mutation(region, lg, exit_node, gm, replaced)
            dtype, device = _params_and_place(nodes, gm)
            modules = [(t, None if t.identity else to_module(_cast(t, dtype, device, threads), dtype=dtype,
                                                             device=device, checked=True))
                       for t in region.terms]
        except NotFusable as err:
            report.refused.append((where, str(err)))
            continue
        convs = [n for n in nodes if _is_conv_node(n, gm)]
        labels = [_op_label(n, gm) for n in nodes]
        with graph.inserting_before(exit_node):
            out = None
            for term, module in modules:
                src = lg.nodes[term.source].payload
                src = replaced.get(src.name, src)
                if module is not None:
                    name = _module_name(region, convs, nodes, exit_node, term, gm, rw, readers)
                    rw.modules[name] = module
                    gm.add_submodule(name, module)
                    src = graph.call_module(name, (src,))
                out = src if out is None else graph.call_function(operator.add, (out, src))
        exit_node.replace_all_uses_with(out)
        replaced[exit_node.name] = out
        for n in reversed(nodes):
            graph.erase_node(n)
        report.regions.append(RegionReport(where, labels, len(convs),
                                           sum(m is not None for _, m in modules)))
        done += 1
    for n in list(graph.nodes):
        if n.op == "get_attr" and not n.users:
            graph.erase_node(n)
    return done


def _cast(term: core.Term, dtype: torch.dtype, device: torch.device, threads: int) -> core.Conv:
    """The term's conv in ``dtype`` when numpy has it, else in float64.

    On the CPU the kernel is computed straight into a new tensor (torch's allocator hands out large blocks
    faster than numpy's, with fewer page faults), a large one on as many threads as torch uses.
    """
    np_dtype = numpy_dtype(dtype)
    if np_dtype is None:
        return term.conv
    out = torch.empty(term.shape, dtype=dtype).numpy() if torch.device(device).type == "cpu" else None
    return term.cast(np_dtype, out=out, threads=threads)


def _check_no_mutation(region: core.Region, lg: core.LinearGraph, exit_node: fx.Node, gm,
                       replaced: dict[str, fx.Node]) -> None:
    """Moving a source's reads to the exit is exact only if nothing overwrites the source in between."""
    inside = {lg.nodes[n].payload for n in region.nodes}
    for term in region.terms:
        src = lg.nodes[term.source].payload
        src = replaced.get(src.name, src)  # an earlier region's exit now lives in its replacement node
        for user in src.users:
            if user in inside or _mutates(user, gm) is not src:
                continue
            if _before(user, exit_node):
                raise NotFusable(f"{user.name} overwrites {src.name} in place before the region's exit")


def _before(a: fx.Node, b: fx.Node) -> bool:
    """``a`` runs before ``b`` in the graph (walks forward from ``a``; only called for in-place users)."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def drop_identities(gm: Workspace, report: FuseReport, prefix: str = "") -> int:
    """Remove eval-mode no-ops (nn.Identity, dropout modules and ``F.dropout(training=False)``)."""
    done = 0
    for node in list(gm.graph.nodes):
        if len(node.args) < 1 or not isinstance(node.args[0], fx.Node):
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if not (isinstance(m, _IDENTITIES) and plain_forward(m) and not m._forward_hooks
                    and not m._forward_pre_hooks and len(node.args) == 1 and not node.kwargs):
                continue
            label = type(m).__name__
        elif node.op == "call_function" and getattr(node.target, "__name__", "") in _DROPOUT_NAMES:
            if node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is not False:
                continue
            label = node.target.__name__
        else:
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        report.regions.append(RegionReport(prefix + node.name, [label], 0, 0))
        done += 1
    return done


_DROPOUT_NAMES = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout"}


def _bn_reading(node: fx.Node, gm: Workspace) -> tuple[fx.Node, str, Callable[[], core.BatchNorm]] | None:
    """``node``'s only user if it is a batch norm of ``node`` alone: a BN module, or ``F.batch_norm`` (also
    what a traced "BatchNormAct" layer calls); with its label and how to read it (which may refuse)."""
    (user,) = node.users
    if user.op == "call_module" and user.args == (node,) and not user.kwargs:
        bn = gm.get_submodule(user.target)
        if isinstance(bn, _BNS):
            return user, type(bn).__name__, lambda: bn_from_module(bn)
    if user.op == "call_function" and user.target is F.batch_norm and user.args and user.args[0] is node:
        return user, "batch_norm", lambda: _bn_function(user, gm)[0]
    return None


def fold_conv_transpose_bn(gm: Workspace, report: FuseReport, rw: Rewrite, prefix: str = "") -> int:
    """ConvTranspose followed by its only user, an eval-mode batch norm: one transposed conv."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        ct = gm.get_submodule(node.target)
        if not isinstance(ct, _CONV_TRANSPOSES) or not plain_forward(ct) or ct._forward_hooks:
            continue
        found = _bn_reading(node, gm)
        if found is None:
            continue
        bn_node, bn_label, read_bn = found
        try:
            folded = core.fold_bn_transpose(
                core.ConvTranspose(to_numpy(ct.weight), to_numpy(ct.bias), groups=ct.groups), read_bn())
            new = type(ct)(ct.in_channels, ct.out_channels, ct.kernel_size, ct.stride, ct.padding,
                           ct.output_padding, ct.groups, True, ct.dilation, ct.padding_mode, device="meta")
            new.weight = nn.Parameter(to_tensor(folded.weight, ct.weight))
            new.bias = nn.Parameter(to_tensor(folded.bias, ct.weight, what="fused bias"))
        except NotFusable as err:
            report.refused.append((prefix + bn_node.name, str(err)))
            continue
        name = _fresh_name(str(node.target), gm, rw.modules)
        rw.modules[name] = new
        gm.add_submodule(name, new)
        with gm.graph.inserting_before(bn_node):
            out = gm.graph.call_module(name, (node.args[0],))
        bn_node.replace_all_uses_with(out)
        gm.graph.erase_node(bn_node)
        gm.graph.erase_node(node)
        report.regions.append(RegionReport(prefix + bn_node.name, [type(ct).__name__, bn_label], 1, 1))
        done += 1
    return done
