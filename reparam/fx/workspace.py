"""The traced graph being rewritten, and the modules it calls into.

Tracing gives a graph over the model's own modules.  Rather than copying the module tree into a working
GraphModule (and generating its Python code) only to build the result from it again, the rewrite passes
edit the graph here: lookups read the model, modules made by the rewrite are kept aside, and
:meth:`Workspace.graph_module` builds the one GraphModule the user gets.  The model itself is never
changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx, nn


def attr_at(root: nn.Module, target: str) -> Any:
    """The module, parameter or buffer at a dotted path (an fx ``get_attr``/``call_module`` target)."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Call:
    """One traced submodule call: its arguments and result (traced values as their nodes) and the nodes its
    forward made, ``nodes[start:stop]`` of its :class:`Calls`."""

    path: str
    args: tuple
    kwargs: dict
    out: Any  # the node it returned, or a tuple/list of nodes and plain values
    first: fx.Node
    last: fx.Node
    start: int = 0
    stop: int = 0


@dataclass
class Calls:
    """The submodule calls of one trace, over its nodes in trace order, each with its target and arguments
    as traced (what :func:`.spans.call_whole` compares the rewritten graph with)."""

    calls: list[Call] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    traced: list[tuple[Any, Any, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, graph: fx.Graph, calls: list[Call]) -> Calls:
        """``calls`` (recorded while tracing ``graph``) over the graph as traced."""
        if not calls:
            return cls()
        nodes = list(graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        for c in calls:
            c.start, c.stop = pos[c.first], pos[c.last] + 1
        return cls(calls, nodes, [(n.target, n.args, n.kwargs) for n in nodes])

    def copied(self, graph: fx.Graph, new: dict[fx.Node, fx.Node]) -> Calls:
        """These calls over ``graph``, a copy of their (not yet rewritten) graph, ``new`` mapping each node to
        its copy."""
        def m(arg: Any) -> Any:
            return fx.node.map_arg(arg, new.__getitem__)

        calls = [replace(c, args=m(c.args), kwargs=m(c.kwargs), out=m(c.out), first=new[c.first],
                         last=new[c.last]) for c in self.calls]
        return Calls.of(graph, calls)


class Workspace:
    """``graph`` (traced from ``root``) under rewrite, with the modules added so far by qualified name."""

    def __init__(self, root: nn.Module, graph: fx.Graph, name: str) -> None:
        self.root, self.graph, self.name = root, graph, name
        self.added: dict[str, nn.Module] = {}
        self.opaque: dict[str, str] = {}  # submodule path -> why it is called whole (its forward did not trace)
        self.elided: list[tuple[str, str]] = []  # (path, class) of the no-op modules tracing left out
        self.calls = Calls()  # the submodule calls traced through (see :mod:`.spans`)
        self._modules: dict[str, nn.Module] = {}  # root's submodules already looked up (each walk done once)
        self._targets: set[str] | None = None

    def copy(self, root: nn.Module | None = None) -> Workspace:
        """A workspace with a copy of this (not yet rewritten) graph, over ``root`` (by default the same
        module; a module of the same structure works too): a trace to reuse without tracing again."""
        graph = fx.Graph()
        graph._codegen = self.graph._codegen  # e.g. an exported module's pytree in/out (read only)
        new: dict[fx.Node, fx.Node] = {}
        graph.output(graph.graph_copy(self.graph, new))
        out = Workspace(self.root if root is None else root, graph, self.name)
        out.calls = self.calls.copied(graph, new)
        out.added = dict(self.added)
        out.opaque = dict(self.opaque)
        out.elided = list(self.elided)
        return out

    def original_targets(self) -> set[str]:
        """The module and tensor paths the graph called or read before the rewrite added any (computed once)."""
        if self._targets is None:
            self._targets = {str(n.target) for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        return self._targets

    def get_submodule(self, target: str) -> nn.Module:
        if target in self.added:
            return self.added[target]
        if target not in self._modules:
            self._modules[target] = self.root.get_submodule(target)
        return self._modules[target]

    def add_submodule(self, target: str, module: nn.Module | Any) -> None:
        """Record ``module`` (or a constant tensor) at ``target``, which may replace one of the model's
        modules in the result."""
        self.added[target] = module

    def has_attr(self, name: str) -> bool:
        """``name`` is taken at the top level, by the model or by an added module."""
        return name in self.added or hasattr(self.root, name)

    def attr(self, target: str) -> Any:
        """The object at a dotted path, added modules first (also for paths below one)."""
        if target in self.added:
            return self.added[target]
        parts = target.split(".")
        for k in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:k])
            if head in self.added:
                return attr_at(self.added[head], ".".join(parts[k:]))
        return attr_at(self.root, target)

    def graph_module(self, copy: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> fx.GraphModule:
        """A GraphModule of the current graph holding just the modules and tensors it uses (the result,
        or, before any rewrite, the traced model to run for shape propagation); ``copy`` maps those, by
        target, to what the GraphModule holds instead (copies of them)."""
        targets = {n.target: None for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        objs = {t: self.attr(t) for t in targets}
        return fx.GraphModule(objs if copy is None else copy(objs), self.graph, self.name)



__all__ = ["Call", "Calls", "Workspace", "attr_at"]
