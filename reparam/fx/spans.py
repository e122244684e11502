"""Submodule calls the rewrite left as traced, called whole again in the result.

Tracing inlines each submodule's forward into one graph, so that fusion sees across module boundaries.  A
call that no fold touched (no op of it replaced, its inputs at most replaced by equal values) goes back to
one ``call_module`` of that submodule: the result runs the model's own code there, as the input did, and
its generated code is smaller (on attention models most of the traced nodes are such calls, and the
GraphModule's code generation costs about as much per node as tracing it).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from .report import FuseReport

COUNTS = "reparam_counts"  # node.meta key: the op counts of the traced code a whole-module call stands for

CONSTANTS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout,
             type(Ellipsis))  # the plain values a call's arguments and result may hold besides traced ones
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


class _NotWhole(Exception):
    """A call's arguments or result cannot be written as graph arguments."""


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
    as traced (what :func:`call_whole` compares the rewritten graph with)."""

    calls: list[Call] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    traced: list[tuple[Any, Any, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, graph: fx.Graph, calls: list[Call]) -> Calls:
        """``calls`` (recorded while tracing ``graph``) over the graph as traced."""
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


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


def as_nodes(value: Any, proxy_type: type) -> Any:
    """``value`` (call arguments or a forward's result) with each traced value as its node; raises
    :class:`_NotWhole` for anything a graph argument cannot hold."""
    if isinstance(value, fx.proxy.Attribute) and vars(value).get("_node") is None:
        raise _NotWhole("attribute")  # (its node, made on first use, would be made now, after the call's)
    if isinstance(value, proxy_type):
        return value.node
    if isinstance(value, CONSTANTS):
        return value
    if type(value) in (tuple, list):
        return type(value)(as_nodes(v, proxy_type) for v in value)
    if type(value) is dict and all(type(k) is str for k in value):
        return {k: as_nodes(v, proxy_type) for k, v in value.items()}
    raise _NotWhole(type(value).__name__)


def record(path: str, args: tuple, kwargs: dict, out: Any, before: fx.Node, graph: fx.Graph,
           proxy_type: type) -> Call | None:
    """The call of ``path`` whose nodes follow ``before`` in ``graph``; None when it made no node or cannot
    be called whole (arguments or result that are not traced values and plain constants)."""
    last = graph._root.prev
    if last is before:
        return None
    try:
        args, kwargs, out = as_nodes(args, proxy_type), as_nodes(kwargs, proxy_type), as_nodes(out, proxy_type)
    except _NotWhole:
        return None
    if not (isinstance(out, fx.Node) or (type(out) in (tuple, list) and all(
            isinstance(v, (fx.Node, *CONSTANTS)) for v in out))):
        return None
    return Call(path, args, kwargs, out, before.next, last)


def state_unchanged(m: nn.Module, saved: dict[int, tuple], internals: set[str]) -> bool:
    """``m``'s plain attributes are those it had before tracing (the caller's code set none of them: the
    module called whole in the result reads them as they are)."""
    entry = saved.get(id(m))
    if entry is None:
        return False
    attrs = entry[1]
    seen = 0
    for k, v in vars(m).items():
        if k in internals:
            continue
        if k not in attrs or attrs[k] is not v:
            return False
        seen += 1
    return seen == len(attrs)


def _same(now: Any, then: Any, inside: Callable[[fx.Node], bool], inputs: set[fx.Node], sigma: dict) -> bool:
    """``now`` is ``then`` (a node argument as traced), except that each node from outside the call, one of
    its inputs, may be replaced by one other node throughout (``sigma`` collects those replacements)."""
    if isinstance(then, fx.Node):
        if inside(then):
            return now is then
        return then in inputs and isinstance(now, fx.Node) and not inside(now) and \
            sigma.setdefault(then, now) is now
    if now is then and isinstance(then, CONSTANTS):
        return True
    if type(now) is not type(then):
        return False
    if type(then) in (tuple, list):
        return len(now) == len(then) and all(_same(a, b, inside, inputs, sigma) for a, b in zip(now, then))
    if type(then) is dict:
        return now.keys() == then.keys() and all(_same(now[k], then[k], inside, inputs, sigma) for k in then)
    if type(then) is slice:
        return all(_same(getattr(now, k), getattr(then, k), inside, inputs, sigma)
                   for k in ("start", "stop", "step"))
    return now is then or (isinstance(then, CONSTANTS) and now == then)


def _mutates_input(node: fx.Node, inside: Callable[[fx.Node], bool]) -> bool:
    """``node`` changes, in place, a value the call was given (the call's place in the graph would matter)."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node) or inside(first):
        return False
    if node.op == "call_function":
        return node.target in _IN_PLACE or getattr(node.target, "__name__", "").endswith("_")
    return node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__")


def _untouched(c: Call, calls: Calls, pos: dict[fx.Node, int], alive: set[fx.Node], taken: set[str]
               ) -> dict | None:
    """The replacement of each of the call's inputs if its nodes are all as traced (only inputs replaced,
    each by one node), they read nothing from outside but those inputs, nothing outside reads them but the
    call's result, and no module the rewrite added lies at or under its path; else None."""
    if c.path in taken:
        return None
    start, stop = c.start, c.stop

    def inside(n: fx.Node) -> bool:
        return start <= pos.get(n, -1) < stop

    outs = _nodes_in(c.out)
    if not all(inside(o) for o in outs):
        return None
    outs = set(outs)
    inputs = set(_nodes_in((c.args, c.kwargs)))
    sigma: dict[fx.Node, fx.Node] = {}
    for i in range(start, stop):
        n = calls.nodes[i]
        target, args, kwargs = calls.traced[i]
        if n not in alive or n.target != target or (n.op in ("call_module", "get_attr") and target in taken):
            return None
        if n.args is args and n.kwargs is kwargs:  # (as traced: only what it reads from outside to check)
            for a in n.all_input_nodes:
                if not inside(a) and (a not in inputs or sigma.setdefault(a, a) is not a):
                    return None
        elif not (_same(n.args, args, inside, inputs, sigma) and _same(n.kwargs, kwargs, inside, inputs, sigma)):
            return None
        if _mutates_input(n, inside) or (n not in outs and not all(inside(u) for u in n.users)):
            return None
    if not all(sigma.get(x, x) in alive for x in inputs):
        return None
    return sigma


def _dotted_prefixes(paths: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for p in paths:
        parts = p.split(".")
        out.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return out


def call_whole(graph: fx.Graph, calls: Calls, added: dict[str, Any], report: FuseReport, prefix: str,
               counts: Callable[[list[fx.Node]], Counter]) -> int:
    """Replace each outermost untouched call of ``calls`` by one ``call_module`` (see the module docstring);
    the no-ops tracing left out inside those are then no longer reported as removed.  ``counts`` gives the op
    counts of a list of nodes, kept on the new node (:data:`COUNTS`).  Returns the number of calls."""
    if not calls.calls:
        return 0
    taken = _dotted_prefixes(added)
    alive = set(graph.nodes)
    pos = {n: i for i, n in enumerate(calls.nodes)}
    whole: list[str] = []
    covered = 0  # the calls are nested: one that starts before this index lies inside one called whole
    # outermost first: by first node, the longer call first (recorded after those it holds, on a tie)
    for i in sorted(range(len(calls.calls)), key=lambda i: (calls.calls[i].start, -calls.calls[i].stop, -i)):
        c = calls.calls[i]
        if c.start < covered:
            continue
        sigma = _untouched(c, calls, pos, alive, taken)
        if sigma is None:
            continue
        alive.update(_replace(graph, c, calls.nodes[c.start:c.stop], sigma, counts))
        covered = c.stop
        whole.append(prefix + c.path)
    if whole:
        report.removed[:] = [(where, op) for where, op in report.removed
                             if not any(where == p or where.startswith(p + ".") for p in whole)]
    return len(whole)


def _replace(graph: fx.Graph, c: Call, nodes: list[fx.Node], sigma: dict,
             counts: Callable[[list[fx.Node]], Counter]) -> list[fx.Node]:
    """Call ``c``'s module in place of its ``nodes`` (its inputs replaced as ``sigma`` says); the new nodes."""
    def now(arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: sigma.get(n, n))

    with graph.inserting_before(nodes[0]):
        call = graph.call_module(c.path, now(c.args), now(c.kwargs))
        call.meta[COUNTS] = counts(nodes)
        stack = nodes[0].meta.get("nn_module_stack")
        if stack is not None:
            call.meta["nn_module_stack"] = stack
        new = [call]
        if isinstance(c.out, fx.Node):
            c.out.replace_all_uses_with(call)
        else:
            for k, item in enumerate(c.out):
                if isinstance(item, fx.Node) and item.users:
                    new.append(graph.call_function(operator.getitem, (call, k)))
                    item.replace_all_uses_with(new[-1])
    for n in reversed(nodes):
        graph.erase_node(n)
    return new


__all__ = ["COUNTS", "Call", "Calls", "call_whole", "record", "state_unchanged"]
