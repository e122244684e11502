"""One fusion of a model: trace, fold, translate, plan, rewrite, explain what is left.

:func:`build` returns the fused module, its report and, for each traced graph (the model's, or when its own
forward cannot be traced, each traceable submodule's), a :class:`Level`: the parts applied there and what it
takes to check them.  A ``skip`` set of part ids makes the same build without those parts, which is how
checking on example inputs undoes a part that fails (:mod:`.checks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from .. import core
from ..core.report import Leftover
from ..torch_ops import _BNS, plain_forward, torch_base
from .aten import is_aten, normalize
from .codegen import shared_code
from .counting import graph_counts, static_counts
from .facts import drop_implied_checks, fold_constants, infer_ranks
from .folds import apply_folds, move_shape_reads
from .leftovers import Explainer
from .parents import carry_attributes, keep_face, reads_inside
from .patching import tracing_session
from .report import FuseReport
from .rewrite import Part, Rewrite, apply_plan, drop_identities, reorder, store_constants
from .running import GraphRunner, targets
from .spans import call_whole
from .tracing import brief, frozen_training_state, safe_deepcopy, trace
from .translate import translate
from .workspace import Workspace

TRACE = "#trace"  # suffix of a part id: do not trace this module (its traced graph did not reproduce it)
MODULE = "#module"  # suffix of a part id: keep this submodule as it was (replacing it broke its parent)


@dataclass
class Level:
    """A traced graph of the build: the module it came from (``path`` in the model, "" for the model), the
    graph as traced (before any rewrite, with the table of what it calls: see :mod:`.running`) and the parts
    applied to it."""

    path: str
    traced: tuple[fx.Graph, dict[str, Any]] | None
    parts: list[Part]


@dataclass
class Build:
    module: nn.Module
    report: FuseReport
    levels: list[Level] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # submodule paths replaced inside an untraced parent
    undone: dict[str, str] = field(default_factory=dict)  # part id -> why it was left out

    def part_ids(self) -> list[str]:
        ids = [p.id for lv in self.levels for p in lv.parts]
        return list(dict.fromkeys(ids + [path + MODULE for path in self.replaced]))


@dataclass
class Options:
    allow_costlier: bool = False
    inputs: dict[str, tuple] = field(default_factory=dict)  # example inputs by module path ("" for the model)
    keep_traced: bool = False  # keep each level's graph as traced, to record values on example inputs
    skip: frozenset[str] = frozenset()
    undone: dict[str, str] = field(default_factory=dict)
    traces: dict[str, Any] | None = None  # module path -> its trace (or why it failed), reused across builds
    trace_only: bool = False  # only find the traced graphs (the levels), fuse nothing

    def again(self, **changes: Any) -> Options:
        """The same options with some replaced (the trace cache is shared)."""
        return replace(self, **changes)


def build(model: nn.Module, opts: Options, *, copy_model: bool = True) -> Build:
    """Fuse ``model`` (already in eval mode); the model itself is left as it is when ``copy_model``."""
    # fx's patches applied once for all the traces below; the GraphModules made share identical graphs' code
    with tracing_session(), shared_code():
        return _build(model, opts, copy_model)


def _build(model: nn.Module, opts: Options, copy_model: bool) -> Build:
    rep = FuseReport()
    memo = {} if copy_model and not opts.trace_only else None  # the deepcopy memo of the model's copies
    out = Build(model, rep, undone=dict(opts.undone))
    rep.undone = [(pid, why) for pid, why in opts.undone.items()]
    ws = None if TRACE in opts.skip else _try_trace(model, "", rep, opts.traces)
    if ws is None:
        rep.counts_before = static_counts(model)
        out.module = _swapped(model, _fuse_children(model, "", opts, out, memo), memo)
        rep.counted_on = "module structure (adds only inside traced parts)"
    else:
        rep.counts_before = graph_counts(ws.graph, ws.attr)
        fused = _fuse_traced(ws, "", opts, out, memo)
        if fused is not None:
            out.module = fused
        else:
            out.module = model if memo is None else safe_deepcopy(model, memo)
    rep.counts_after = static_counts(out.module)
    return out


Swap = tuple[nn.Module, str, nn.Module, nn.Module]  # (parent, child name, child, what replaces it)


def _swapped(root: nn.Module, swaps: list[Swap], memo: dict | None) -> nn.Module:
    """``root`` with each swapped child replaced: in place when ``memo`` is None, else in a copy of the rest
    (the replacements are new modules over copies made through ``memo``: nothing they replace is copied)."""
    if memo is None:
        for parent, name, _child, new in swaps:
            setattr(parent, name, new)
        return root
    memo.update({id(child): new for _parent, _name, child, new in swaps})
    return safe_deepcopy(root, memo)


def _try_trace(module: nn.Module, path: str, rep: FuseReport, cache: dict | None) -> Workspace | None:
    """``module`` traced (a copy of the cached trace of ``path`` when there is one), or None with the reason
    in the report."""
    found = cache.get(path) if cache is not None else None
    if found is None:
        try:
            found = trace(module)
        except Exception as err:  # fx raises many types for untraceable code
            found = brief(err)
        if cache is not None:
            cache[path] = found if isinstance(found, str) else found.copy()
    elif not isinstance(found, str):
        found = found.copy(root=module)
    if isinstance(found, str):
        rep.skipped.append((path or type(module).__name__, f"its forward cannot be traced ({found}); "
                            "its submodules are fused one by one"))
        return None
    return found


def _fuse_children(module: nn.Module, prefix: str, opts: Options, out: Build, memo: dict | None,
                   why: str | None = None) -> list[Swap]:
    """Fuse each child of an untraceable module (nothing is changed: the replacements are returned, for
    :func:`_swapped`); ``why`` says why the children of ``module`` are fused one by one when it is not that
    its forward cannot be traced.  The replacements hold copies (through ``memo``) of what they keep of the
    model; with no memo (a build in place), the model's own modules."""
    why = why or f"it is called by {type(module).__name__}'s own code, which fx cannot trace"
    swaps: list[Swap] = []
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if path + MODULE in opts.skip:
            why = opts.undone.get(path + MODULE, "asked to")
            out.report.notes.append(f"{path} is kept as it was: {why}")
            out.report.leftovers.extend(Leftover(f"{path}.{n}", type(m).__name__, f"{path} is kept as it was: {why}",
                                                 "undone") for n, m in child.named_modules() if isinstance(m, _BNS))
            continue
        # a child the untraced code reaches into (iterates, indexes, reads a submodule of) is fused inside,
        # never replaced: YOLO's parents loop over `self.model`, which a GraphModule cannot take
        inside = reads_inside(module, name, child)
        # traced on its own, nothing would change: one standard layer, or no weights at all (a concat)
        alone = not opts.allow_costlier and (_single_op(child) or _weightless(child))
        held = type(child).forward is nn.Module.forward  # a container never called itself (ModuleList, ModuleDict)
        ws = None if path + TRACE in opts.skip or inside or alone or held else _try_trace(
            child, path, out.report, opts.traces)
        if ws is None:
            if any(True for _ in child.children()):
                swaps += _fuse_children(child, path + ".", opts, out, memo, why if held else None if not inside else (
                    f"{type(module).__name__}'s code reaches inside {path} ({type(child).__name__}), which is "
                    "therefore kept as it is and its children fused one by one"))
            elif isinstance(child, _BNS) and not opts.trace_only:
                out.report.leftovers.append(Leftover(
                    path, type(child).__name__, f"{why}, so no conv is next to it in a traced graph", "untraced"))
            continue
        fused = _fuse_traced(ws, path + ".", opts, out, memo)
        if fused is not None:
            swaps.append((module, name, child, keep_face(child, fused, memo)))
            out.replaced.append(path)
    return swaps


def _single_op(m: nn.Module) -> bool:
    """``m`` is one standard torch.nn layer (no submodules, no hooks, its torch class's own forward): its
    graph alone is a single op, which only ``allow_costlier`` could rewrite (a lone BN as a conv)."""
    if m._modules or m._forward_hooks or m._forward_pre_hooks or m.training:
        return False
    return torch_base(m) is not nn.Module and plain_forward(m)


def _weightless(m: nn.Module) -> bool:
    """``m`` and its submodules hold no parameter or buffer: no fusion has anything to fold (only a costlier
    one could turn a pool into a conv)."""
    return not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())


def _fuse_traced(ws: Workspace, prefix: str, opts: Options, out: Build, memo: dict | None
                 ) -> fx.GraphModule | None:
    """Fuse one traced graph; None when nothing changed (the caller keeps the original module).  The result
    holds copies, made through ``memo``, of the model's modules and tensors it uses (with no memo: those
    themselves)."""
    rep = out.report
    for path, why in ws.opaque.items():
        rep.skipped.append((prefix + path, f"called whole: its forward cannot be traced ({why})"))
    path = prefix[:-1]
    if opts.trace_only:  # find the levels below this one too
        _fuse_opaque_leaves(ws, prefix, opts, out, Rewrite(skip=opts.skip), memo)
        out.levels.append(Level(path, None, []))
        return None
    if path in opts.inputs:
        _propagate_shapes(ws, opts.inputs[path], prefix, rep)
    traced = _runnable_copy(ws) if opts.keep_traced else None
    rw = Rewrite(skip=opts.skip)
    if is_aten(ws.graph):  # an exported program: its ATen calls in their torch-level spelling (not a change)
        normalize(ws.graph)
    removed = len(rep.removed)
    dropped = drop_identities(ws, rep, prefix)  # not a change of its own: alone, it is not worth a new module
    checks = drop_implied_checks(ws)  # (nor is this)
    move_shape_reads(ws)  # (nor this)
    changed = _fuse_opaque_leaves(ws, prefix, opts, out, rw, memo)
    fold_constants(ws)
    changed += store_constants(ws, rep, rw, prefix)
    ranks = infer_ranks(ws)
    folded = apply_folds(ws, ranks, rep, rw, prefix)
    tr = translate(ws, None if folded or changed else ranks)
    changed += folded
    plan = core.plan(tr.graph, allow_costlier=opts.allow_costlier)
    changed += apply_plan(ws, plan, tr.graph, rep, rw, prefix)
    if dropped and not changed:
        del rep.removed[removed:]  # the module is kept as it is, no-ops included
    if checks and changed:
        rep.notes.append(f"{prefix[:-1] or 'the model'}: {checks} rank checks (torch._assert on x.ndim) removed, "
                         "each implied by the checks and ops before it")
    rep.leftovers.extend(Explainer(ws, tr.graph, plan, tr.refused, rw, prefix, opts.undone).collect())
    out.levels.append(Level(path, traced, rw.parts))
    if not changed:
        return None
    call_whole(ws, rep, prefix)
    reorder(ws.graph)
    ws.graph.lint()
    gm = ws.graph_module(None if memo is None else lambda objs: _copied(objs, rw, memo))
    if not prefix:
        carry_attributes(ws.root, gm, memo)
    return gm


def _propagate_shapes(ws: Workspace, inputs: tuple, prefix: str, rep: FuseReport) -> None:
    """Shapes and dtypes of every value (``node.meta["tensor_meta"]``) from one run on example inputs."""
    try:
        with torch.no_grad(), frozen_training_state(ws.root):
            GraphRunner(ws.graph, targets(ws.graph, ws.attr), shapes=True).run(*inputs)
    except Exception as err:
        rep.notes.append(f"{prefix[:-1] or 'the model'}: the example inputs did not run through the traced graph "
                         f"({brief(err)}); continuing without shapes")


def _runnable_copy(ws: Workspace) -> tuple[fx.Graph, dict[str, Any]]:
    """The traced graph, copied before any rewrite, with what it calls (to record values on example inputs)."""
    graph = ws.copy().graph
    return graph, targets(graph, ws.attr)


def _fuse_opaque_leaves(ws: Workspace, prefix: str, opts: Options, out: Build, rw: Rewrite, memo: dict | None
                        ) -> int:
    """A submodule called whole because its forward cannot be traced still has children that may trace:
    fuse those (in a copy of the submodule, made through ``memo`` or, in place, a memo of its own) and call
    the copy instead."""
    done = 0
    for path in ws.opaque:
        m = ws.get_submodule(path)
        if path in ws.added or not any(True for _ in m.children()) or prefix + path + MODULE in opts.skip or (
                not opts.allow_costlier and all(_single_op(c) for c in m.children())):  # nothing can change inside
            continue
        own = {} if memo is None else memo
        swaps = _fuse_children(m, prefix + path + ".", opts, out, own)
        if opts.trace_only or not swaps:  # (finding levels changes nothing)
            continue
        copy_ = _swapped(m, swaps, own)
        ws.add_submodule(path, copy_)
        rw.modules[path] = copy_
        out.replaced.append(prefix + path)
        done += 1
    return done


def _copied(objs: dict[str, Any], rw: Rewrite, memo: dict) -> dict[str, Any]:
    """``objs`` (target -> what the result calls or reads) with the input model's modules and tensors replaced
    by copies (sharing preserved, also with the other copies made through ``memo``); the rewrite's new
    modules are the result's own."""
    memo.update({id(m): m for m in rw.modules.values()})
    return objs | safe_deepcopy({t: o for t, o in objs.items() if t not in rw.modules}, memo)
