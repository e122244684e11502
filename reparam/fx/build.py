"""One fusion of a model: trace, fold, translate, plan, rewrite, explain what is left.

:func:`build` returns the fused module, its report and, for each traced graph (the model's, or when its own
forward cannot be traced, each traceable submodule's), a :class:`Level`: the parts applied there and what it
takes to check them.  A ``skip`` set of part ids makes the same build without those parts, which is how
checking on example inputs undoes a part that fails (:mod:`.checks`).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import core
from ..core.report import Leftover
from ..torch_ops import _BNS, _CONVS
from .aten import is_aten, normalize
from .facts import fold_constants, infer_ranks
from .folds import apply_folds
from .leftovers import Explainer
from .report import FuseReport
from .rewrite import Part, Rewrite, apply_plan, drop_identities, reorder, store_constants
from .running import GraphRunner, targets
from .tracing import brief, frozen_training_state, safe_deepcopy, trace
from .translate import translate
from .workspace import Workspace, attr_at

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
    rep = FuseReport()
    out = Build(model, rep, undone=dict(opts.undone))
    rep.undone = [(pid, why) for pid, why in opts.undone.items()]
    ws = None if TRACE in opts.skip else _try_trace(model, "", rep, opts.traces)
    if ws is None:
        rep.counts_before = static_counts(model)
        root = safe_deepcopy(model) if copy_model and not opts.trace_only else model
        out.module = _fuse_children(root, "", opts, out)
        rep.counted_on = "module structure (adds only inside traced parts)"
    else:
        rep.counts_before = graph_counts(ws.graph, ws.attr)
        fused = _fuse_traced(ws, "", opts, out, copy_originals=copy_model)
        if fused is not None:
            out.module = fused
        else:
            out.module = safe_deepcopy(model) if copy_model and not opts.trace_only else model
    rep.counts_after = static_counts(out.module)
    return out


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


def _fuse_children(module: nn.Module, prefix: str, opts: Options, out: Build) -> nn.Module:
    """Fuse each child of an untraceable module (in place, on an already-copied tree)."""
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
        ws = None if path + TRACE in opts.skip or inside else _try_trace(child, path, out.report, opts.traces)
        if ws is None:
            if any(True for _ in child.children()):
                _fuse_children(child, path + ".", opts, out)
            elif isinstance(child, _BNS) and not opts.trace_only:
                out.report.leftovers.append(Leftover(
                    path, type(child).__name__, f"it is called by {type(module).__name__}'s own code, which fx cannot "
                    "trace, so no conv is next to it in a traced graph", "untraced"))
            continue
        fused = _fuse_traced(ws, path + ".", opts, out, copy_originals=False)
        if fused is not None:
            setattr(module, name, keep_face(child, fused))
            out.replaced.append(path)
    return module


@functools.lru_cache(maxsize=256)
def _class_source(cls: type) -> str | None:
    """The source of the methods of ``cls`` and its bases below nn.Module, construction aside (None when some
    of it is not available)."""
    parts = []
    for c in cls.__mro__:
        if c in (nn.Module, object) or c.__module__.startswith("torch.nn"):
            continue
        for key, fn in vars(c).items():
            fn = getattr(fn, "__func__", fn)
            if key in ("__init__", "__setstate__") or not inspect.isfunction(fn):
                continue
            try:
                parts.append(inspect.getsource(fn))
            except (OSError, TypeError):
                return None
    return "\n".join(parts)


_MODULE_API = set(dir(nn.Module))


def reads_inside(parent: nn.Module, name: str, child: nn.Module) -> bool:
    """Whether the code of ``parent`` (its class and bases) may reach into its child ``name``: anything but
    calling it or reading a plain attribute of it (``self.name(x)``, ``self.name.f``), which a replacement
    keeps.  Containers of torch.nn (Sequential...) are their elements' parents: their code only iterates."""
    cls = type(parent)
    if cls.__module__.startswith("torch.nn"):
        return False
    source = _class_source(cls)
    if source is None:
        return True
    inner = {n for n, _ in child.named_children()} | {n for n, _ in child.named_parameters(recurse=False)} \
        | {n for n, _ in child.named_buffers(recurse=False)}
    own = {k for c in type(child).__mro__ if c not in (nn.Module, object) for k in vars(c)} - _MODULE_API
    for match in re.finditer(rf"self\.{re.escape(name)}\b(\s*\(|\.(\w+))?", source):
        call, attr = match.group(1), match.group(2)
        if call is not None and attr is None:
            continue  # self.name(...)
        if attr is not None and attr not in inner and attr not in own and attr not in _MODULE_API:
            continue  # a plain attribute
        return True
    return False


def _fuse_traced(ws: Workspace, prefix: str, opts: Options, out: Build, copy_originals: bool
                 ) -> fx.GraphModule | None:
    """Fuse one traced graph; None when nothing changed (the caller keeps the original module)."""
    rep = out.report
    for path, why in ws.opaque.items():
        rep.skipped.append((prefix + path, f"called whole: its forward cannot be traced ({why})"))
    path = prefix[:-1]
    if opts.trace_only:  # find the levels below this one too
        _fuse_opaque_leaves(ws, prefix, opts, out, Rewrite(skip=opts.skip))
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
    changed = _fuse_opaque_leaves(ws, prefix, opts, out, rw)
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
    rep.leftovers.extend(Explainer(ws, tr.graph, plan, tr.refused, rw, prefix, opts.undone).collect())
    out.levels.append(Level(path, traced, rw.parts))
    if not changed:
        return None
    reorder(ws.graph)
    ws.graph.lint()
    gm = ws.graph_module()
    if copy_originals:
        _copy_originals(gm, rw)
    if not prefix:
        _carry_attributes(ws.root, gm)
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


def _fuse_opaque_leaves(ws: Workspace, prefix: str, opts: Options, out: Build, rw: Rewrite) -> int:
    """A submodule called whole because its forward cannot be traced still has children that may trace:
    fuse those (in a copy of the submodule) and call the copy instead."""
    done = 0
    for path in ws.opaque:
        m = ws.get_submodule(path)
        if path in ws.added or not any(True for _ in m.children()) or prefix + path + MODULE in opts.skip:
            continue
        copy_ = m if opts.trace_only else safe_deepcopy(m)  # (finding levels changes nothing)
        before = len(out.replaced)
        _fuse_children(copy_, prefix + path + ".", opts, out)
        if len(out.replaced) == before:
            continue
        ws.add_submodule(path, copy_)
        rw.modules[path] = copy_
        out.replaced.append(prefix + path)
        done += 1
    return done


def _copy_originals(gm: fx.GraphModule, rw: Rewrite) -> None:
    """Replace the references to the input model's modules/tensors by copies (sharing preserved)."""
    targets = list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")))
    originals = {t: attr_at(gm, t) for t in targets if t not in rw.modules}
    memo = {id(m): m for m in rw.modules.values()}
    copies = safe_deepcopy(originals, memo)
    for t, obj in copies.items():
        _set(gm, t, obj)


def _set(root: nn.Module, target: str, value: Any) -> None:
    *path, last = target.split(".")
    parent = attr_at(root, ".".join(path)) if path else root
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and last in parent._buffers:
        parent._buffers[last] = value
    else:
        setattr(parent, last, value)


# ------------------------------------------------------------------------------- what others see

_MODULE_STATE = {"training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_backward_pre_hooks",
                 "_backward_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks", "_modules", "_compiled_call_impl"}


def _carry_attributes(original: nn.Module, gm: nn.Module) -> None:
    """Give ``gm`` the plain attributes of the module it replaces (``m.f``, ``m.stride``, ``num_classes``...),
    which surrounding code may read; modules, parameters and buffers are the graph's own business."""
    for key, value in vars(original).items():
        if key in _MODULE_STATE or key in vars(gm) or isinstance(value, (nn.Module, torch.Tensor)) or callable(value):
            continue  # (a bound method on the instance, as an exported module's eval(), is its own business)
        try:
            object.__setattr__(gm, key, value)
        except (AttributeError, TypeError):  # a read-only property of GraphModule
            continue


def _overrides_module(cls: type) -> bool:
    """``cls`` (or a base below nn.Module) redefines an nn.Module method other than ``__init__``/``forward``:
    mixing it into a GraphModule would run that method on a module tree it does not know."""
    allowed = {"__init__", "forward", "extra_repr", "__doc__", "__module__", "__qualname__", "__dict__",
               "__weakref__", "__annotations__", "__firstlineno__", "__static_attributes__", "__parameters__",
               "__orig_bases__"}
    if issubclass(cls, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or hasattr(cls, "__getitem__"):
        return True  # indexing would reach the graph's modules, not the ones the code means: fail loudly instead
    module_names = set(dir(nn.Module)) | set(dir(fx.GraphModule))
    for c in cls.__mro__:
        if c in (nn.Module, object) or issubclass(fx.GraphModule, c):
            continue
        if (set(vars(c)) - allowed) & module_names:
            return True
    return False


def keep_face(original: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """``gm`` as seen by the untraced code around it: the original's plain attributes, and, when that is
    safe, its class too (``isinstance(m, Detect)`` in a parent's forward keeps working)."""
    _carry_attributes(original, gm)
    cls = type(original)
    if not _overrides_module(cls):
        try:
            gm.__class__ = type(cls.__name__, (type(gm), cls), {"__module__": cls.__module__})
        except TypeError:  # an incompatible layout (slots, a metaclass): attributes only
            pass
    return gm


# ------------------------------------------------------------------------------------------ counts

_ADD_TARGETS = {"add", "iadd", "add_"}


def static_counts(module: nn.Module) -> Counter:
    """Conv / batch_norm / add / linear ops a module runs, counted without running it: a GraphModule's nodes
    (recursing into the modules it calls whole), else its standard conv, Linear and BN submodules."""
    if isinstance(module, fx.GraphModule):
        return graph_counts(module.graph, lambda t: attr_at(module, t))
    return _module_kind(module)


def graph_counts(graph: fx.Graph, attr: Callable[[str], Any]) -> Counter:
    """:func:`static_counts` of a graph whose ``call_module`` targets ``attr`` resolves."""
    counts: Counter = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            counts += _module_kind(attr(node.target))
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


def _module_kind(m: nn.Module) -> Counter:
    """Counts of a module run whole: a GraphModule by its graph, else its standard layers (each once)."""
    if isinstance(m, fx.GraphModule):
        return static_counts(m)
    counts: Counter = Counter()
    if isinstance(m, (*_CONVS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        counts["conv"] += 1
    elif isinstance(m, _BNS):
        counts["batch_norm"] += 1
    elif isinstance(m, nn.Linear):
        counts["linear"] += 1
    for child in m.children():
        counts += _module_kind(child)
    return counts
