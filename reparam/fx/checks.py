"""Checking a fusion on example inputs, and undoing what fails.

With example inputs, :func:`checked_build` runs the input model once (its output, executed op counts, and
the inputs and outputs of the modules whose graphs were traced), then builds the fused model and checks it:

1. each traced graph must reproduce its module's output (a trace that took another branch than the real
   code is not used: that module's children are fused one by one instead);
2. each fused part (a collapsed region, a fold) is run on the values the traced graph computed at its inputs
   and compared with the value it replaces, so a difference is pinned to the part that makes it, whatever
   the rest of the model does with it;
3. the fused model runs end to end on the example inputs; if it raises, or its outputs differ from the input
   model's by more than the input model's own outputs move when its inputs move by a rounding error (ops such
   as argmax, top-k or NMS turn rounding into different results; a parent reading a child's weights does
   not), a binary search over the parts finds the ones whose rewrite breaks it.

Failing parts are undone (the same build, without them) and the report says why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..testing.torch_checks import _OpCounter
from .build import MODULE, TRACE, Build, Options, build
from .running import GraphRunner, copy_value
from .tracing import brief, frozen_training_state

_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_ROUNDS = 6  # builds with more parts undone before giving up on a part-by-part search


def tolerance(dtype: torch.dtype) -> float:
    return _RTOL.get(dtype, 1e-4)





def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def max_rel(expected: Any, got: Any) -> float:
    """Largest difference between two (nested) outputs relative to the expected output's scale; inf when
    their structure, shapes or non-finite positions differ.  Computed in the outputs' own dtype when they
    share it (the rounding of the difference is far below any tolerance), else in float64."""
    a, b = tensors(expected), tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for x, y in zip(a, b):
            if not x.numel() or not (x.is_floating_point() or y.is_floating_point()):
                if x.numel() and not torch.equal(x, y.to(x.dtype)):
                    return float("inf")
                continue
            if x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float64):
                x, y = x.double(), y.double()
            finite = torch.isfinite(x)
            if not torch.equal(finite, torch.isfinite(y)):
                return float("inf")
            if not bool(finite.all()):
                x, y = x[finite], y[finite]
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
            scale = max(scale, float(x.abs().max()) if x.numel() else 0.0)
    return worst / scale if scale else worst


class Reference:
    """One run of the input model: its output, executed op counts, and the inputs and outputs of the
    modules at ``paths`` (their first call)."""

    def __init__(self, model: nn.Module, inputs: tuple, paths: set[str]) -> None:
        self.args: dict[str, tuple] = {"": inputs}
        self.outputs: dict[str, Any] = {}
        modules = {m: p for p, m in model.named_modules() if p in paths and p}
        handles = []
        for m in modules:
            handles.append(m.register_forward_pre_hook(self._pre(modules[m])))
            handles.append(m.register_forward_hook(self._post(modules[m])))
        counter = _OpCounter()
        try:
            with torch.no_grad(), frozen_training_state(model), counter:
                self.output = model(*copy_value(inputs))
        finally:
            for h in handles:
                h.remove()
        self.outputs[""] = self.output
        self.counts = _counts(counter.counts)
        self._limit: float | None = None
        self.noise = 0.0  # how far the outputs move under rounding-level input noise (when measured)

    def limit(self, model: nn.Module, inputs: tuple) -> float:
        """How far the fused outputs may be from the input model's: the float tolerance, or, for a model whose
        outputs jump when its inputs move by a rounding-sized step (a random-init net that amplifies errors a
        millionfold, or a top-k), ten times that jump.  The step is 100 ulps of the input's dtype: folding
        rounds every fused weight once, which moves a deep net's output about as much."""
        if self._limit is None:
            gen = torch.Generator().manual_seed(0)
            moved = tuple(a + a.abs() * torch.randn(a.shape, generator=gen, dtype=a.dtype) * 100 *
                          torch.finfo(a.dtype).eps if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                          for a in inputs)
            with torch.no_grad(), frozen_training_state(model):
                self.noise = max_rel(self.output, model(*moved))
            self._limit = max(tolerance(_dtype_of(self.output)), 10 * self.noise)
        return self._limit

    def note(self, diff: float) -> str | None:
        """What the report says of an accepted end-to-end difference ``diff`` (None when within tolerance)."""
        if diff <= tolerance(_dtype_of(self.output)):
            return None
        how = "in shape (how many results)" if diff == float("inf") else f"by {diff:.3g} (relative to their scale)"
        if self._limit is not None and diff <= self._limit:
            return (f"the outputs differ {how}: the input model's own outputs move by {self.noise:.3g} when its "
                    "inputs move by 100 ulps (it amplifies float rounding), and every fused part matches what it "
                    "replaces on the example inputs")
        return (f"the outputs differ {how}, although every fused part matches what it replaces on the example "
                "inputs and every fused submodule matches the original on what it received: the model's own code "
                "after them (top-k, NMS, thresholds) turns float rounding into different results")

    def _pre(self, path: str) -> Callable:
        def hook(_m, args):
            self.args.setdefault(path, copy_value(args))
        return hook

    def _post(self, path: str) -> Callable:
        def hook(_m, _args, out):
            self.outputs.setdefault(path, copy_value(out))
        return hook


def _counts(raw: Counter) -> Counter:
    return Counter({k: raw[k] for k in ("conv", "batch_norm", "add", "linear")})


def run_counted(module: nn.Module, inputs: tuple) -> tuple[Any, Counter]:
    counter = _OpCounter()
    with torch.no_grad(), frozen_training_state(module), counter:
        out = module(*copy_value(inputs))
    return out, _counts(counter.counts)


def _dtype_of(value: Any) -> torch.dtype:
    ts = [t for t in tensors(value) if t.is_floating_point()]
    return ts[0].dtype if ts else torch.float32


def _check_levels(b: Build, ref: Reference, model: nn.Module) -> dict[str, str]:
    """Why each failing part (or untrustworthy trace) fails, by id."""
    bad: dict[str, str] = {}
    for lv in b.levels:
        if lv.traced is None or lv.path not in ref.args or lv.path not in ref.outputs:
            continue
        if not lv.parts:
            continue  # nothing of this graph was replaced
        keep = {n for p in lv.parts for n in (*p.inputs, p.output)}
        graph, table = lv.traced
        rec = GraphRunner(graph, table, keep=keep)
        try:
            with torch.no_grad(), frozen_training_state(model):
                out = rec.run(*copy_value(ref.args[lv.path]))
        except Exception as err:
            bad[lv.path + TRACE] = f"its traced graph fails on the example inputs ({brief(err)})"
            continue
        expected = ref.outputs[lv.path]
        diff = max_rel(expected, out)
        if diff > tolerance(_dtype_of(expected)):
            bad[lv.path + TRACE] = (f"its traced graph does not reproduce its output on the example inputs (max rel "
                                    f"diff {diff:.2g}); the traced code differs from what runs")
            continue
        for part in lv.parts:
            if part.output not in rec.values or any(i not in rec.values for i in part.inputs):
                continue
            expected = rec.values[part.output]
            try:
                with torch.no_grad():
                    got = part.run([rec.values[i] for i in part.inputs])
                diff = max_rel(expected, got)
            except Exception as err:
                bad.setdefault(part.id, f"the fused part fails on the values it reads ({brief(err)})")
                continue
            if diff > tolerance(_dtype_of(expected)):
                bad.setdefault(part.id, f"on the example inputs its fused value differs by {diff:.2g} (relative)")
    return bad


def _problem(module: nn.Module, inputs: tuple, ref: Reference, model: nn.Module, replaced: list[str]
             ) -> tuple[str | None, Any, Counter]:
    """Why the fused model is not accepted on the example inputs (None when it is), its output and op counts.

    Outputs further from the input model's than rounding explains are accepted only when the model was fused
    in parts (``replaced`` submodules inside code that was not traced) and each part, run on what it received
    in this run, gives what the original submodule gives: the difference then arises in the model's own
    untraced code (detection post-processing: top-k, NMS), not in a rewrite."""
    seen: dict[str, tuple] = {}
    handles = [module.get_submodule(p).register_forward_pre_hook(_first_args(seen, p)) for p in replaced]
    try:
        out, counts = run_counted(module, inputs)
    except Exception as err:
        return f"the fused model fails on the example inputs ({brief(err)})", None, Counter()
    finally:
        for h in handles:
            h.remove()
    diff = max_rel(ref.output, out)
    if diff <= tolerance(_dtype_of(ref.output)) or diff <= ref.limit(model, inputs):
        return None, out, counts
    why = f"the fused model's outputs differ from the input model's by {diff:.2g} (relative)"
    if not replaced:
        return why, out, counts
    for path, args in seen.items():
        with torch.no_grad(), frozen_training_state(model):
            expected = model.get_submodule(path)(*copy_value(args))
            got = module.get_submodule(path)(*copy_value(args))
        if max_rel(expected, got) > tolerance(_dtype_of(expected)):
            return f"{why}; {path} differs from the original on the same input", out, counts
    return None, out, counts


def _first_args(seen: dict[str, tuple], path: str) -> Callable:
    def hook(_m, args):
        seen.setdefault(path, copy_value(args))
    return hook


def _breaks(model: nn.Module, opts: Options, inputs: tuple, ref: Reference
            ) -> Callable[[frozenset[str]], str | None]:
    def test(skip: frozenset[str]) -> str | None:
        trial = build(model, opts.again(keep_traced=False, skip=skip, undone={}))
        return _problem(trial.module, inputs, ref, model, trial.replaced)[0]
    return test


def _culprit(ids: list[str], test: Callable[[frozenset[str]], str | None], base: frozenset[str]) -> str | None:
    """The first part (in build order) that, applied after the ones before it, makes ``test`` fail."""
    lo, hi = 0, len(ids)  # parts[:lo] pass, parts[:hi] fail
    if test(base | frozenset(ids)) is not None:  # with every part undone it still fails: blame the trace
        return TRACE if TRACE not in base else None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if test(base | frozenset(ids[mid:])) is None:
            lo = mid
        else:
            hi = mid
    return ids[lo]


def checked_build(model: nn.Module, inputs: tuple, allow_costlier: bool
                  ) -> tuple[Build | None, Reference, Any, Counter]:
    """The fused model, checked on ``inputs`` with failing parts undone, or None when no part-by-part undo
    makes it run (keep the model as it is); with the reference run, the fused model's output and executed
    op counts."""
    traces: dict = {}
    first = build(model, Options(allow_costlier, traces=traces, trace_only=True))
    ref = Reference(model, inputs, {lv.path for lv in first.levels})
    undone: dict[str, str] = {}
    opts = Options(allow_costlier, ref.args, True, frozenset(), undone, traces)
    for _ in range(_ROUNDS):
        b = build(model, opts)
        bad = {k: v for k, v in _check_levels(b, ref, model).items() if k not in undone}
        if not bad:
            why, out, counts = _problem(b.module, inputs, ref, model, b.replaced)
            if why is None:
                return b, ref, out, counts
            found = _culprit(b.part_ids(), _breaks(model, opts, inputs, ref), opts.skip)
            if found is None:
                break
            bad = {found: f"with it, {why}"}
        undone.update(bad)
        opts = opts.again(skip=frozenset(undone), undone=undone)
    return None, ref, ref.output, ref.counts


__all__ = ["MODULE", "Reference", "checked_build", "max_rel", "run_counted", "tensors", "tolerance"]
