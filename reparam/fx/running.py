"""Running a graph over the modules it calls, without building a GraphModule for it.

Shape propagation and the checks on example inputs run each traced graph once or twice; a GraphModule would
generate and compile Python code for it every time.  :class:`GraphRunner` interprets the graph directly,
resolving ``call_module`` and ``get_attr`` targets in a table, and can record each value's tensor metadata
(what ``ShapeProp`` writes) and keep copies of chosen values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata


def copy_value(value: Any) -> Any:
    """A detached copy of a (nested) value, so later in-place ops cannot change what was recorded."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(copy_value(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(copy_value(v) for v in value)
    if isinstance(value, dict):
        return {k: copy_value(v) for k, v in value.items()}
    return value


def targets(graph: fx.Graph, attr) -> dict[str, Any]:
    """The objects a graph's ``call_module`` and ``get_attr`` nodes name, looked up now (the table a runner
    uses, unaffected by later rewrites of the workspace)."""
    return {str(n.target): attr(str(n.target)) for n in graph.nodes if n.op in ("call_module", "get_attr")}


class GraphRunner(fx.Interpreter):
    """Interprets ``graph`` with ``table`` (target -> module or tensor).

    ``shapes``: write ``node.meta["tensor_meta"]`` as shape propagation does; ``keep``: node names whose
    values are copied into :attr:`values`.
    """

    def __init__(self, graph: fx.Graph, table: Mapping[str, Any], *, shapes: bool = False,
                 keep: Iterable[str] = ()) -> None:
        super().__init__(nn.Module(), garbage_collect_values=True, graph=graph)
        self.table, self.shapes, self.keep = table, shapes, set(keep)
        self.values: dict[str, Any] = {}

    def fetch_attr(self, target: str) -> Any:
        return self.table[target]

    def call_module(self, target, args, kwargs) -> Any:
        return self.table[target](*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.shapes:
            found = []

            def meta(obj: Any) -> Any:
                if isinstance(obj, torch.Tensor):
                    found.append(True)
                    return _extract_tensor_metadata(obj)
                return obj

            value = map_aggregate(out, meta)
            if found:
                n.meta["tensor_meta"] = value
        if n.name in self.keep:
            self.values[n.name] = copy_value(out)
        return out


__all__ = ["GraphRunner", "copy_value", "targets"]
