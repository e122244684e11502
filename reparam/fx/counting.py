"""Conv, batch-norm, add and linear counts of a module, without running it (the report's counts when no
example inputs are given; with them, the executed ops are counted instead)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..torch_ops import _BNS, _CONVS
from .workspace import attr_at

COUNTS = "reparam_counts"  # node.meta key: the op counts of the traced code a whole-module call stands for

_ADD_TARGETS = {"add", "iadd", "add_"}


def static_counts(module: nn.Module) -> Counter:
    """Conv / batch_norm / add / linear ops a module runs, counted without running it: a GraphModule's nodes
    (recursing into the modules it calls whole), else its standard conv, Linear and BN submodules."""
    if isinstance(module, fx.GraphModule):
        return graph_counts(module.graph, lambda t: attr_at(module, t))
    return _module_kind(module, Counter())


def graph_counts(graph: fx.Graph, attr: Callable[[str], Any]) -> Counter:
    """:func:`static_counts` of a graph whose ``call_module`` targets ``attr`` resolves."""
    return node_counts(graph.nodes, attr)


def node_counts(nodes: Iterable[fx.Node], attr: Callable[[str], Any]) -> Counter:
    """:func:`graph_counts` of some of a graph's nodes.  A module called whole in place of its traced code
    counts as that code did (:data:`COUNTS`, see :mod:`.spans`)."""
    counts: Counter = Counter()
    for node in nodes:
        if node.op == "call_module":
            if COUNTS in node.meta:
                counts.update(node.meta[COUNTS])
            else:
                _module_kind(attr(node.target), counts)
        elif node.op in ("call_function", "call_method"):
            packet = getattr(node.target, "_overloadpacket", None)  # an ATen overload: its op's name
            name = packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))
            if packet is not None and "batch_norm" in name:
                counts["batch_norm"] += 1
                continue
            if name in ("addmm", "mm"):
                counts["linear"] += 1
                continue
            if node.target in (F.batch_norm, torch.batch_norm):
                counts["batch_norm"] += 1
            elif "conv" in name and node.op == "call_function":
                counts["conv"] += 1
            elif name == "linear":
                counts["linear"] += 1
            elif name in _ADD_TARGETS and sum(isinstance(a, fx.Node) and a.op != "get_attr"
                                              for a in node.args[:2]) == 2:
                counts["add"] += 1
    return counts


def _module_kind(m: nn.Module, counts: Counter) -> Counter:
    """Add the counts of a module run whole to ``counts``: a GraphModule by its graph, else its standard layers
    (each once)."""
    if isinstance(m, fx.GraphModule):
        counts.update(static_counts(m))
        return counts
    if isinstance(m, (*_CONVS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        counts["conv"] += 1
    elif isinstance(m, _BNS):
        counts["batch_norm"] += 1
    elif isinstance(m, nn.Linear):
        counts["linear"] += 1
    for child in m.children():
        _module_kind(child, counts)
    return counts


__all__ = ["COUNTS", "graph_counts", "node_counts", "static_counts"]
