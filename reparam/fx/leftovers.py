"""A reason for every fusion candidate that still runs: each batch norm, per-channel constant and refused
branch sum left in the rewritten graph, and each BN inside a module called whole."""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx, nn

from .. import core
from ..core.report import Leftover
from ..torch_ops import _BNS, _CONVS
from .facts import data_users
from .folds import bn_of
from .rewrite import Rewrite, module_path
from .workspace import Workspace


def _kind(reason: str) -> str:
    """The reason kind of a refusal sentence from the core or the translation."""
    text = reason.lower()
    if "example_input" in text or "example input" in text or ("rank" in text and "unknown" in text):
        return "needs-shapes"
    if "pads" in text and ("bias" in text or "border" in text):
        return "padded-conv"
    if "macs" in text or "would run" in text or "conv of its own" in text or "once per summand" in text:
        return "costlier"
    if any(w in text for w in ("training", "running statistics", "hooks", "overrides forward", "not a plain conv",
                               "computed at run time", "promotes")):
        return "not-foldable"
    return "algebra"


def _label(node: fx.Node, gm: Workspace) -> str:
    """A module's class name, or a function's name."""
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(node.target)).__name__
        except AttributeError:
            pass
    return getattr(node.target, "__name__", str(node.target))


def describe(node: fx.Node, gm: Workspace) -> str:
    """A short description of a node for a reason sentence."""
    if node.op == "placeholder":
        return f"the input {node.name!r}"
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} {node.target!r}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name} ({node.name})"


def where_of(node: fx.Node) -> str:
    """The module path a report keys a node by: a module's own path, a functional BN's module (the owner of
    its running statistics), else the enclosing module and the node name."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function" and len(node.args) > 1 and isinstance(node.args[1], fx.Node) \
            and node.args[1].op == "get_attr" and str(node.args[1].target).endswith(".running_mean"):
        return str(node.args[1].target)[: -len(".running_mean")]
    owner = module_path(node)
    return f"{owner}:{node.name}" if owner else node.name


class Explainer:
    """Reasons for what is left, from the translation, the plan and the folds of one traced graph."""

    def __init__(self, gm: Workspace, lg: core.LinearGraph, plan: core.Plan, refused: list[tuple[str, str]],
                 rw: Rewrite, prefix: str, undone: Mapping[str, str]) -> None:
        """``undone``: why each part id was taken back after checking; modules in ``rw.modules`` (made or
        fused by the rewrite) report their own leftovers."""
        self.gm, self.lg, self.rw, self.prefix, self.undone = gm, lg, rw, prefix, undone
        self.translated = {name: why for name, why in reversed(refused)}  # the translation's refusals
        self.planned: dict[str, str] = {}  # the planner's (the first one per node)
        for r in plan.refusals:
            self.planned.setdefault(r.node, r.reason)
        self.region_of = {n: r for r in plan.regions for n in r.nodes}

    def _refusal(self, name: str) -> str | None:
        return self.translated.get(name) or self.planned.get(name)

    def collect(self) -> list[Leftover]:
        out, seen = [], set()
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and node.target not in self.rw.modules:
                m = self.gm.get_submodule(node.target)
                if not isinstance(m, (*_BNS, *_CONVS)):
                    out.extend(self._inside(node, m))
            op = self._candidate(node)
            if op is not None:
                reason, kind = self._why(node)
                out.append(Leftover(self.prefix + where_of(node), op, reason, kind))
                seen.add(node.name)
        for name in dict.fromkeys([*self.translated, *self.planned]):  # refused convs and sums, even if a
            lnode = self.lg.nodes.get(name)  # later region rewrote them: why they were not merged further
            why = self._refusal(name)
            if name in seen or lnode is None or (not isinstance(lnode.op, (core.Conv, core.Add))
                                                 and not (lnode.op is None and name in self.translated)) \
                    or not self._linked(lnode) or (isinstance(lnode.op, core.Add) and "is unknown" in why):
                continue
            out.append(Leftover(self.prefix + where_of(lnode.payload), _label(lnode.payload, self.gm), why,
                                _kind(why)))
        return out

    def _linked(self, lnode: core.Node) -> bool:
        """A linear op reads the node's value or feeds it: there was something to fuse it with."""
        ins = [self.lg.nodes[i] for i in lnode.inputs]
        outs = [self.lg.nodes[n.name] for n in data_users(lnode.payload) if n.name in self.lg.nodes]
        return any(n.op is not None for n in ins + outs)

    def _candidate(self, node: fx.Node) -> str | None:
        """The op label of a fusion candidate still in the graph: a BN, a per-channel constant, or a conv or
        sum whose fusion a rule refused."""
        if "constant" in node.meta:  # computed from stored tensors alone (a weight standardization)
            return None
        if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), _BNS):
            return type(self.gm.get_submodule(node.target)).__name__
        if bn_of(node, self.gm) is not None:
            return "batch_norm"
        lnode = self.lg.nodes.get(node.name)
        if lnode is None or lnode.payload is not node:
            return None
        label = _label(node, self.gm)
        if isinstance(lnode.op, core.Affine) and any(isinstance(a, fx.Node) and "constant" in a.meta
                                                     for a in node.args):  # a stored tensor, not a number
            return label
        why = self._refusal(node.name)
        if isinstance(lnode.op, core.Add) and why and "is unknown" in why:
            return None  # a sum of values of unknown width (inside attention, say): nothing to fuse it with
        if (lnode.op is None or isinstance(lnode.op, (core.Add, core.Conv))) and why:
            return label
        return None

    def _why(self, node: fx.Node) -> tuple[str, str]:
        part = f"{self.prefix}fold:{node.name}"
        for key in (part, self.prefix + node.name):
            if key in self.undone:
                return self.undone[key], "undone"
        region = self.region_of.get(node.name)
        if region is not None and self.prefix + region.exit in self.undone:
            return self.undone[self.prefix + region.exit], "undone"
        if node.name in self.rw.reasons:
            return self.rw.reasons[node.name]
        if node.name in self.translated:
            why = self.translated[node.name]
            return why, _kind(why)
        src = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if src is not None and src.name in self.translated:
            why = self.translated[src.name]
            return f"it cannot fold into {describe(src, self.gm)}: {why}", _kind(why)
        if node.name in self.planned:
            why = self.planned[node.name]
            return why, _kind(why)
        for user in data_users(node):
            why = self._refusal(user.name)
            if why:
                return f"it cannot fold into {describe(user, self.gm)}: {why}", _kind(why)
        if region is not None and region.blocked and len(region.nodes) > 1 and region.convs_before:
            return region.blocked, "costlier"
        return self._structure(node)

    def _structure(self, node: fx.Node) -> tuple[str, str]:
        """No refusal names the node: say what it sits between."""
        src = next((a for a in node.args if isinstance(a, fx.Node)), None)
        readers = data_users(node)
        linear_src = src is not None and src.name in self.lg.nodes and self.lg.nodes[src.name].op is not None
        if linear_src and isinstance(self.lg.nodes[src.name].op, core.Conv) and len(data_users(src)) > 1:
            others = [describe(u, self.gm) for u in data_users(src) if u is not node][:2]
            return (f"its input, {describe(src, self.gm)}, is also read by {', '.join(others)}; folding it into "
                    "that conv would change what they read", "shared")
        after = ", ".join(describe(u, self.gm) for u in readers[:2]) or "the output"
        before = describe(src, self.gm) if src is not None else "a constant"
        return (f"it sits between {before} and {after}; neither is a conv or linear layer it can fold into "
                "exactly", "no-neighbour")

    def _inside(self, node: fx.Node, m: nn.Module) -> list[Leftover]:
        """BNs inside a module the graph calls whole (not traceable, or left in training mode)."""
        target = str(node.target)
        if target in self.gm.opaque:
            why, kind = f"inside {target} ({type(m).__name__}), whose forward fx cannot trace: " \
                        f"{self.gm.opaque[target]}", "untraced"
        elif m.training:
            why, kind = f"inside {target} ({type(m).__name__}), which stays in training mode", "not-foldable"
        else:
            why, kind = f"inside {target} ({type(m).__name__}), which is called whole", "untraced"
        return [Leftover(f"{self.prefix}{target}.{name}", type(bn).__name__, why, kind)
                for name, bn in m.named_modules() if name and isinstance(bn, _BNS)]
