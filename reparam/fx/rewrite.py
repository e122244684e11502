"""Apply a core plan to an fx graph: replace each worthwhile region by one conv per source."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import core
from ..core.errors import NotFusable
from ..core.report import Leftover
from ..torch_ops import PaddedConv, is_no_op, numpy_dtype, to_module
from .facts import constant_frontier, metadata_users
from .report import FuseReport, RegionReport
from .workspace import Workspace


@dataclass
class Part:
    """One fold the rewrite applied, with what is needed to check it on recorded values.

    ``run`` computes the replacement from the values of ``inputs`` (names of nodes of the graph as traced,
    before any rewrite); on the same inputs the traced graph computed ``output``.
    """

    id: str
    inputs: list[str]
    output: str
    run: Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class Rewrite:
    """New modules by qualified name, the parts applied (and those to leave out, by id), and for each node
    the rewrite added, the traced node whose value it carries."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    parts: list[Part] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()
    reasons: dict[str, tuple[str, str]] = field(default_factory=dict)  # BN node -> (why a fold left it, kind)

    def source_of(self, node: fx.Node) -> str:
        return self.origin.get(node.name, node.name)

    def add_module(self, gm: Workspace, nodes: list[fx.Node], module: nn.Module) -> str:
        """Register a module the rewrite made, under a name of its own (see :func:`fused_name`)."""
        name = fused_name(nodes, gm, self.modules)
        self.modules[name] = module
        gm.add_submodule(name, module)
        return name


def _op_label(node: fx.Node, gm: Workspace) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__}({node.target})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target}"


def _is_conv_node(node: fx.Node, gm: Workspace) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    return node.op == "call_function" and ("conv" in getattr(node.target, "__name__", "") or node.target is F.linear)


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


_INPLACE_OPERATORS = (operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.setitem)


def _params_and_place(region_nodes: list[fx.Node], gm: Workspace
                      ) -> tuple[torch.dtype, torch.device, torch.memory_format]:
    """The dtype, device and weight memory format of the region's first stored tensor (parameters and
    buffers alike: a BN without affine has only buffers)."""
    for n in region_nodes:
        tensors: list = []
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            tensors = [*m.parameters(), *m.buffers()]
        elif n.op in ("call_function", "call_method"):
            tensors = [a.meta.get("constant") for a in n.args if isinstance(a, fx.Node)]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.dtype, t.device, _layout(t)
    tm = region_nodes[0].meta.get("tensor_meta")
    if tm is not None:
        return tm.dtype, torch.device("cpu"), torch.contiguous_format
    return torch.float32, torch.device("cpu"), torch.contiguous_format


def _layout(t: torch.Tensor) -> torch.memory_format:
    """channels_last (3d) for a 4-D (5-D) weight stored that way, else the default format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def module_path(node: fx.Node) -> str:
    """The path of the module a node belongs to: a called module's own path, else the module whose forward
    holds the node ("" for the model's own forward)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return next(reversed(stack.values()))[0]
    return ""


def _common_path(paths: list[str]) -> str:
    split = [p.split(".") if p else [] for p in paths]
    common = []
    for level in zip(*split):
        if any(x != level[0] for x in level):
            break
        common.append(level[0])
    return ".".join(common)


def fused_name(nodes: list[fx.Node], gm: Workspace, taken: dict[str, nn.Module]) -> str:
    """A name of its own for a module made from ``nodes``: ``<enclosing module>.<first conv>_fused`` (then
    ``_1``, ``_2``...), never a path of the input model, so a training-form state_dict cannot load into it."""
    owners = [module_path(n).rpartition(".")[0] if n.op == "call_module" else module_path(n) for n in nodes]
    base = _common_path(owners)
    first = next((module_path(n) for n in nodes if _is_conv_node(n, gm)), None)  # a functional conv: its module's
    if first is not None and not first.startswith(base):
        first = None
    kind = "fused" if first is None else first[len(base) + 1 if base else 0:].replace(".", "_") + "_fused"
    return free_name(gm, base, kind, taken)


def free_name(gm: Workspace, owner: str, leaf: str, taken: dict) -> str:
    """``<owner>.<leaf>`` (then ``_1``, ``_2``...) where nothing holds that name, placed beside rather than
    inside a module the graph calls or reads (that module is the input model's: nothing is added to it)."""
    targets = gm.original_targets()
    parts = owner.split(".") if owner else []
    for i in range(len(parts)):
        if ".".join(parts[:i + 1]) in targets:
            owner, leaf = ".".join(parts[:i]), "_".join(parts[i:]) + "_" + leaf
            break
    base = f"{owner}.{leaf}" if owner else leaf
    name, k = base, 1
    while name in taken or _exists(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


def _exists(gm: Workspace, target: str) -> bool:
    try:
        gm.attr(target)
    except AttributeError:
        return False
    return True


def apply_plan(gm: Workspace, plan: core.Plan, lg: core.LinearGraph, report: FuseReport,
               rw: Rewrite, prefix: str = "") -> int:
    """Rewrite ``gm.graph`` in place from ``plan`` (regions whose id is in ``rw.skip`` excepted); returns the
    number of regions rewritten."""
    graph = gm.graph
    replaced: dict[str, fx.Node] = {}
    threads = torch.get_num_threads()
    done = 0
    for region in plan.regions:
        if not region.worthwhile or prefix + region.exit in rw.skip:
            continue
        nodes = [lg.nodes[n].payload for n in region.nodes]
        exit_node = nodes[-1]
        where = prefix + exit_node.name
        try:
            _check_no_mutation(region, lg, exit_node, gm, replaced)
            dtype, device, layout = _params_and_place(nodes, gm)
            modules = [None if t.identity else _module(t, dtype, device, layout, threads) for t in region.terms]
        except NotFusable as err:
            report.leftovers.append(Leftover(where, "region", str(err), "algebra"))
            continue
        convs = [n for n in nodes if _is_conv_node(n, gm)]
        labels = [_op_label(n, gm) for n in nodes]
        sources = []
        with graph.inserting_before(exit_node):
            out = None
            for term, module in zip(region.terms, modules):
                src = lg.nodes[term.source].payload
                src = replaced.get(src.name, src)
                sources.append(rw.source_of(src))
                if module is not None:
                    src = graph.call_module(rw.add_module(gm, nodes, module), (src,))
                out = src if out is None else graph.call_function(operator.add, (out, src))
        redirect_metadata(nodes[:-1], out)
        exit_node.replace_all_uses_with(out)
        replaced[exit_node.name] = out
        rw.origin[out.name] = rw.source_of(exit_node)
        for n in reversed(nodes):
            graph.erase_node(n)
        report.regions.append(RegionReport(where, labels, len(convs), sum(m is not None for m in modules)))
        rw.parts.append(Part(where, sources, rw.source_of(exit_node), _summing(modules)))
        done += 1
    for n in list(graph.nodes):
        if n.op == "get_attr" and not n.users:
            graph.erase_node(n)
    return done


def reorder(graph: fx.Graph) -> None:
    """Restore topological order after reads were pointed at values defined later (a metadata read of an
    erased value now reads the value that replaces it): each node moves down past what it reads, the rest
    keeps its order."""
    placed: set[fx.Node] = set()
    waiting: list[fx.Node] = []
    order: list[fx.Node] = []

    def ready(n: fx.Node) -> bool:
        return all(a in placed for a in n.all_input_nodes)

    for node in graph.nodes:
        if not ready(node):
            waiting.append(node)
            continue
        order.append(node)
        placed.add(node)
        progress = True
        while progress and waiting:
            progress = False
            for w in list(waiting):
                if ready(w):
                    waiting.remove(w)
                    order.append(w)
                    placed.add(w)
                    progress = True
    if len(order) == len(placed) and not waiting and any(a is not b for a, b in zip(order, graph.nodes)):
        output = next(n for n in order if n.op == "output")
        order.remove(output)
        order.append(output)
        prev = graph._root
        for n in order:
            if n.prev is not prev:
                prev.append(n)
            prev = n


def _summing(modules: list[nn.Module | None]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Runs what a region became: the sum over its terms of each module (or identity) on its source."""
    def run(values: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for m, v in zip(modules, values):
            y = v if m is None else m(v)
            out = y if out is None else out + y
        return out
    return run


def redirect_metadata(nodes: list[fx.Node], to: fx.Node) -> None:
    """Point the metadata reads (``x.shape``, ``x.ndim``...) of ``nodes``, about to be erased, at ``to``: the
    value replacing them has their rank, dtype and device, and their shape where a shape is read (the
    translation keeps values at the end of shape-keeping chains, see ``translate._anchor_shape_reads``)."""
    inside = set(nodes)
    for n in nodes:
        for user in list(metadata_users(n)):
            if user not in inside:
                user.replace_input_with(n, to)


def _module(term: core.Term, dtype: torch.dtype, device: torch.device, layout: torch.memory_format,
            threads: int) -> nn.Module:
    m = to_module(_cast(term, dtype, device, threads), dtype=dtype, device=device, checked=True)
    if layout is not torch.contiguous_format:
        conv = m.conv if isinstance(m, PaddedConv) else m
        conv.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=layout))
    return m


def _cast(term: core.Term, dtype: torch.dtype, device: torch.device, threads: int) -> core.Conv:
    """The term's conv in ``dtype`` when numpy has it, else in float64; on the CPU computed straight into a
    new tensor (:func:`kernel_buffer`), a large one on as many threads as torch uses."""
    np_dtype = numpy_dtype(dtype)
    if np_dtype is None:
        return term.conv
    return term.cast(np_dtype, out=kernel_buffer(term.shape, dtype, device), threads=threads)


def kernel_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> np.ndarray | None:
    """Memory for a fused kernel: a numpy view of a new CPU tensor of ``dtype`` (torch's allocator hands out
    large blocks faster than numpy's, with fewer page faults, and the module then uses it as is); None when
    numpy lacks ``dtype`` or the kernel goes to another device."""
    if numpy_dtype(dtype) is None or torch.device(device).type != "cpu":
        return None
    return torch.empty(shape, dtype=dtype).numpy()


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


def store_constants(gm: Workspace, report: FuseReport, rw: Rewrite, prefix: str = "") -> int:
    """Replace each value computed from stored tensors alone by a stored tensor (a buffer of the result):
    the computation runs once, here, instead of on every call, and gives the same values."""
    done = 0
    for node in constant_frontier(gm):
        part = f"{prefix}const:{node.name}"
        if part in rw.skip:
            continue
        value = node.meta["constant"].detach().clone()
        name = free_name(gm, module_path(node), f"{node.name}_stored", rw.modules)
        rw.modules[name] = value
        gm.add_submodule(name, value)
        with gm.graph.inserting_before(node):
            stored = gm.graph.get_attr(name)
        stored.meta["constant"] = value
        node.replace_all_uses_with(stored)
        report.regions.append(RegionReport(prefix + node.name, [f"stored {_op_label(node, gm)}"], 0, 0))
        done += 1
    for n in reversed(list(gm.graph.nodes)):  # what computed them is now unused
        if not n.users and "constant" in n.meta and n.op != "output":
            gm.graph.erase_node(n)
    return done


def drop_identities(gm: Workspace, report: FuseReport, prefix: str = "") -> int:
    """Remove eval-mode no-ops (nn.Identity, dropout modules and ``F.dropout(training=False)``); those modules
    tracing already left out (``gm.elided``) are reported here too."""
    report.removed.extend((prefix + path, label) for path, label in gm.elided)
    done = len(gm.elided)
    for node in list(gm.graph.nodes):
        if len(node.args) < 1 or not isinstance(node.args[0], fx.Node):
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if not (is_no_op(m) and len(node.args) == 1 and not node.kwargs):
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
        report.removed.append((prefix + (node.target if node.op == "call_module" else node.name), label))
        done += 1
    return done


_DROPOUT_NAMES = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout"}
