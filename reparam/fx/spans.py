"""Submodule calls the rewrite left as traced, called whole again in the result.

Tracing inlines each submodule's forward into one graph, so that fusion sees across module boundaries.  A
call that no fold touched (no op of it replaced, its inputs at most replaced by equal values) goes back to
one ``call_module`` of that submodule: the result runs the model's own code there, as the input did, and
its generated code is smaller (on attention models most of the traced nodes are such calls, and the
GraphModule's code generation costs about as much per node as tracing it).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

from torch import fx

from .counting import COUNTS, node_counts
from .report import FuseReport
from .rewrite import _mutates
from .tracing import _PLAIN
from .workspace import Call, Workspace


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


def _same(now: Any, then: Any, inside: Callable[[fx.Node], bool], inputs: set[fx.Node], sigma: dict) -> bool:
    """``now`` is ``then`` (a node argument as traced), except that each node from outside the call, one of
    its inputs, may be replaced by one other node throughout (``sigma`` collects those replacements)."""
    if isinstance(then, fx.Node):
        if inside(then):
            return now is then
        return then in inputs and isinstance(now, fx.Node) and not inside(now) and \
            sigma.setdefault(then, now) is now
    if now is then and type(then) in _PLAIN:
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
    return now is then or (type(then) in _PLAIN and now == then)


def _untouched(c: Call, ws: Workspace, pos: dict[fx.Node, int], alive: set[fx.Node], taken: set[str]
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
        n = ws.calls.nodes[i]
        target, args, kwargs = ws.calls.traced[i]
        if n not in alive or n.target != target or (n.op in ("call_module", "get_attr") and target in taken):
            return None
        if n.args is args and n.kwargs is kwargs:  # (as traced: only what it reads from outside to check)
            for a in n.all_input_nodes:
                if not inside(a) and (a not in inputs or sigma.setdefault(a, a) is not a):
                    return None
        elif not (_same(n.args, args, inside, inputs, sigma) and _same(n.kwargs, kwargs, inside, inputs, sigma)):
            return None
        changed = _mutates(n, ws)  # (in place: where the call stands in the graph would matter)
        if (changed is not None and not inside(changed)) or (n not in outs and not all(inside(u) for u in n.users)):
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


def call_whole(ws: Workspace, report: FuseReport, prefix: str) -> int:
    """Replace each outermost untouched call of ``ws.calls`` by one ``call_module`` (see the module docstring);
    the no-ops tracing left out inside those are then no longer reported as removed.  Returns the number of
    calls."""
    calls = ws.calls
    if not calls.calls:
        return 0
    taken = _dotted_prefixes(ws.added)
    alive = set(ws.graph.nodes)
    pos = {n: i for i, n in enumerate(calls.nodes)}
    whole: list[str] = []
    covered = 0  # the calls are nested: one that starts before this index lies inside one called whole
    # outermost first: by first node, the longer call first (recorded after those it holds, on a tie)
    for i in sorted(range(len(calls.calls)), key=lambda i: (calls.calls[i].start, -calls.calls[i].stop, -i)):
        c = calls.calls[i]
        if c.start < covered:
            continue
        sigma = _untouched(c, ws, pos, alive, taken)
        if sigma is None:
            continue
        alive.update(_replace(ws, c, calls.nodes[c.start:c.stop], sigma))
        covered = c.stop
        whole.append(prefix + c.path)
    if whole:
        report.removed[:] = [(where, op) for where, op in report.removed
                             if not any(where == p or where.startswith(p + ".") for p in whole)]
    return len(whole)


def _replace(ws: Workspace, c: Call, nodes: list[fx.Node], sigma: dict) -> list[fx.Node]:
    """Call ``c``'s module in place of its ``nodes`` (its inputs replaced as ``sigma`` says); the new nodes,
    the call keeping the op counts of those it replaces (:data:`.counting.COUNTS`)."""
    graph = ws.graph
    def now(arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: sigma.get(n, n))

    with graph.inserting_before(nodes[0]):
        call = graph.call_module(c.path, now(c.args), now(c.kwargs))
        call.meta[COUNTS] = node_counts(nodes, ws.attr)
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


__all__ = ["call_whole"]
