"""Measure ``reparam.fuse`` on one model from outside, through the public API only.

For one :class:`~_sweep_models.ModelSpec`: build it (random init, ``randomize_bn_``, eval), run it, then for
each candidate deploy form (``reparam.fuse`` without and with example inputs, the library's own deploy
method, ``torch.fx.experimental.optimization.fuse``) record whether it could be made, whether it runs, how
far its outputs are from the unfused model's, and what it executes (aten ops counted by
``reparam.testing.count_executed_ops``, MACs counted here by :class:`MacCounter`).  Then the makers are timed
side by side with ``copy.deepcopy``.  Every failure becomes a one-line string in the record.
"""

from __future__ import annotations

import copy
import gc
import math
import re
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from _sweep_models import ModelSpec, build, one_line
from summarize_sweep import WRONG_ABOVE

COUNT_KEYS = ("conv", "batch_norm", "add", "linear")


# -- MACs, counted independently of reparam ---------------------------------------------------------------------
def _macs_counter_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class MacCounter(TorchDispatchMode):
        """Executed multiply-accumulates of convolutions and matrix products, from the aten calls themselves.

        DESIGN.md's convention: a convolution costs ``out_elems * (Cin/groups * prod(k))`` plus ``out_elems``
        for its bias (``Cin`` = ``weight.shape[0]`` for a transposed conv); ``addmm``/``mm``/``linear`` cost
        ``in_features * out_elems``; BN, activations and pooling cost nothing.  Batched matrix products
        (attention) are counted apart, and so are the bias terms, because folding a BN gives a bias-free conv
        a bias: the BN's own per-element multiply-add, counted as zero, moves into the conv.
        """

        def __init__(self) -> None:
            super().__init__()
            self.macs: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("convolution", "_convolution"):
                w, bias, transposed = args[1], args[2], bool(args[6])
                per_out = (w.shape[0] // args[8] if transposed else w.shape[1]) * math.prod(w.shape[2:])
                self.macs["conv"] += out.numel() * per_out
                self.macs["conv_bias"] += out.numel() if bias is not None else 0
            elif "conv" in name and "backward" not in name:
                self.macs["unpriced_conv_calls"] += 1
            elif name in ("addmm", "_addmm_activation"):
                self.macs["linear"] += args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
            elif name == "mm":
                self.macs["linear"] += args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
            elif name == "linear":
                self.macs["linear"] += args[0].numel() * args[1].shape[0]
            elif name in ("bmm", "baddbmm"):
                a = args[0] if name == "bmm" else args[1]
                b = args[1] if name == "bmm" else args[2]
                self.macs["matmul"] += a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
            return out

    return MacCounter


def _clone(args: tuple) -> tuple:
    import torch

    def c(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, (list, tuple)):
            return type(v)(c(x) for x in v)
        return v

    return tuple(c(a) for a in args)


def run(model, args: tuple):
    import torch

    with torch.no_grad():
        return model(*_clone(args))


#: Submodules of a detection model whose outputs are dense tensors (before box selection, sorting and NMS).
DENSE_PARTS = ("backbone", "rpn.head", "head")


def run_detection(model, args: tuple) -> tuple[Any, dict[str, Any]]:
    """The model's output and the first output of each of its :data:`DENSE_PARTS` (forward hooks)."""
    dense: dict[str, Any] = {}
    hooks = []
    for path in DENSE_PARTS:
        try:
            part = model.get_submodule(path)
        except AttributeError:
            continue
        hooks.append(part.register_forward_hook(lambda _m, _i, o, path=path: dense.setdefault(path, o)))
    try:
        return run(model, args), dense
    finally:
        for h in hooks:
            h.remove()


def compare_detection(expected: tuple[Any, dict], actual: tuple[Any, dict]) -> dict[str, Any]:
    """Final detections, or where those differ, the dense parts' outputs.

    On random weights many scores are nearly tied, so float rounding re-ranks the selected boxes of an exact
    fusion; what the fusion computes is then judged on the dense tensors before selection (``final_rel``
    keeps the difference of the final detections).
    """
    final = compare(expected[0], actual[0])
    if final["rel"] <= WRONG_ABOVE or not expected[1] or set(expected[1]) != set(actual[1]):
        return final
    dense = compare(expected[1], actual[1])
    return {**dense, "final_rel": final["rel"],
            "note": f"final detections differ ({final['rel']:.2g}: near-tied scores re-ranked by rounding); "
                    f"compared the outputs of {', '.join(sorted(expected[1]))}"}


def executed(model, args: tuple) -> dict[str, int]:
    """Executed conv/BN/add/linear calls (``count_executed_ops``) and MACs (:class:`MacCounter`) of one call."""
    from reparam.testing import count_executed_ops

    macs = _macs_counter_class()()
    with macs:
        ops = count_executed_ops(model, _clone(args))
    out = {k: int(ops[k]) for k in COUNT_KEYS}
    m = macs.macs
    out.update(weight_macs=m["conv"] + m["linear"], macs=m["conv"] + m["conv_bias"] + m["linear"],
               matmul_macs=m["matmul"], unpriced_conv_calls=m["unpriced_conv_calls"])
    return out


def costlier(before: dict[str, int], after: dict[str, int]) -> bool:
    """More executed convs or more weight MACs (the bias terms aside, see :class:`MacCounter`)."""
    return after["conv"] > before["conv"] or after["weight_macs"] > before["weight_macs"]


# -- exactness ---------------------------------------------------------------------------------------------------
def _leaves(out: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of a nested output (``torch.utils._pytree``: a tuple and a list give the same paths)."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    return [(f"out{keystr(k)}", v) for k, v in tree_flatten_with_path(out)[0]]


def compare(expected: Any, actual: Any) -> dict[str, Any]:
    """Largest absolute difference, and relative to the largest finite magnitude of ``expected`` (float64).

    Nested tuples/lists/dicts are compared leaf by leaf; a different structure, shape or non-finite pattern
    gives ``rel = inf`` and a ``note`` naming the first such leaf.
    """
    import torch

    exp, act = _leaves(expected), _leaves(actual)
    if [p for p, _ in exp] != [p for p, _ in act]:
        return {"max_abs": math.inf, "rel": math.inf,
                "note": f"output structure differs: {len(exp)} leaves vs {len(act)} ({exp[0][0] if exp else ''})"}
    scale, worst, note = 0.0, 0.0, None
    pairs = []
    for (p, a), (_, b) in zip(exp, act):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return {"max_abs": math.inf, "rel": math.inf, "note": f"{p}: {type(a).__name__} vs {type(b).__name__}"}
        if not isinstance(a, torch.Tensor):
            if a != b and note is None:
                note = f"{p}: {a!r} vs {b!r}"
            continue
        if a.shape != b.shape:
            return {"max_abs": math.inf, "rel": math.inf,
                    "note": f"{p}: shape {tuple(b.shape)}, expected {tuple(a.shape)}"}
        a64, b64 = a.detach().double(), b.detach().double()
        fa, fb = torch.isfinite(a64), torch.isfinite(b64)
        if not torch.equal(fa, fb):
            return {"max_abs": math.inf, "rel": math.inf, "note": f"{p}: non-finite values differ"}
        if fa.any():
            scale = max(scale, float(a64[fa].abs().max()))
            worst = max(worst, float((a64[fa] - b64[fa]).abs().max()))
        pairs.append(p)
    if note is not None:
        return {"max_abs": math.inf, "rel": math.inf, "note": note}
    rel = worst / scale if scale else (0.0 if worst == 0 else math.inf)
    return {"max_abs": worst, "rel": rel, "note": None if pairs else "no tensor outputs"}


# -- the report adapter (the one place that knows the report's fields) --------------------------------------------
_BN_WORDS = re.compile(r"\bBN\b|batch[ _]?norm", re.IGNORECASE)


def bn_leftovers(report: Any, bn_paths: Sequence[str]) -> list[tuple[str, str]]:
    """``(module path, reason)`` of every BN that ``report`` says was left in place.

    The report lists its BN leftovers as ``bn_left`` (``reparam.core.report.Leftover``: ``.where``, ``.op``,
    ``.reason``, ``.kind``).  Reports without it (older reparam) have only ``refused`` and ``skipped`` lists of
    ``(where, why)``: an entry counts as a BN leftover when ``where`` names a BN module of the input (by path,
    or by its fx node spelling with ``_`` for ``.``) or ``why`` mentions batch norm.
    """
    if report is None:
        return []
    listed = getattr(report, "bn_left", None)
    if listed is not None:
        return [(str(x.where), str(x.reason)) for x in listed if str(x.reason).strip()]
    names = {p: p for p in bn_paths} | {p.replace(".", "_"): p for p in bn_paths}
    entries = [*getattr(report, "refused", ()), *getattr(report, "skipped", ())]
    return [(names.get(where, where), why) for where, why in entries if where in names or _BN_WORDS.search(why)]


def report_summary(report: Any) -> dict[str, Any]:
    """The report's first line and, where it has one, its ``to_dict()``-free counts."""
    if report is None:
        return {"summary": None}
    out: dict[str, Any] = {"summary": str(report).splitlines()[0][:300] if str(report) else ""}
    for key in ("regions", "refused", "skipped", "leftovers"):
        v = getattr(report, key, None)
        if isinstance(v, (list, tuple)):
            out[key] = len(v)
    return out


def _bn_paths(model) -> list[str]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _normalize_reason(why: str) -> str:
    return re.sub(r"\d+", "N", why)[:160]


# -- one model -----------------------------------------------------------------------------------------------------
def _makers(spec: ModelSpec, model, args: tuple) -> dict[str, tuple[str, Callable[[], Any]]]:
    """``variant -> (description, maker)``; each maker returns a new deploy-form module and leaves ``model`` as is."""
    import reparam

    makers: dict[str, tuple[str, Callable[[], Any]]] = {
        "reparam": ("reparam.fuse(model)", lambda: reparam.fuse(model)),
        "reparam_inputs": ("reparam.fuse(model, example_inputs)", lambda: reparam.fuse(model, _clone(args))),
    }
    if spec.kind == "image":  # the PT2 path: the program torch.export makes of the model, fused
        makers["reparam_export"] = ("reparam.fuse(torch.export.export(model, example_inputs))",
                                    _exported_maker(model, args))
    lib = library_deploy(spec, model)
    if lib is not None:
        makers["library"] = lib
    makers["fx"] = ("torch.fx.experimental.optimization.fuse(copy)", lambda: _fx_fuse(model))
    return makers


class Exported(__import__("torch").nn.Module):
    """A fused ExportedProgram, called through its ``module()`` (which refuses eval(), so it is not a child)."""

    def __init__(self, program) -> None:
        super().__init__()
        object.__setattr__(self, "program", program)
        object.__setattr__(self, "inner", program.module())
        self.reparam_report = getattr(program, "reparam_report", None)

    def forward(self, *args):
        return self.inner(*args)


def _exported_maker(model, args: tuple) -> Callable[[], Any]:
    """Exports ``model`` once (not timed: ``make_s`` is the fusion of the program), then fuses the program."""
    import torch

    import reparam

    program: list = []

    def make():
        if not program:
            program.append(torch.export.export(model, _clone(args), strict=False))
        return Exported(reparam.fuse(program[0]))
    return make


def _fx_fuse(model):
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model))


def library_deploy(spec: ModelSpec, model) -> tuple[str, Callable[[], Any]] | None:
    """The library's own deploy conversion, where the model has one (timm: any ``fuse``/``reparameterize``/
    ``switch_to_deploy`` module method, as ``reparameterize_model`` looks for; ultralytics: ``model.fuse()``)."""
    if spec.source == "timm" and any(hasattr(m, a) for m in model.modules()
                                     for a in ("fuse", "reparameterize", "switch_to_deploy")):
        from timm.utils.model import reparameterize_model

        return "timm.utils.model.reparameterize_model(model)", lambda: reparameterize_model(model)
    if spec.source == "ultralytics" and hasattr(model, "fuse"):
        return "ultralytics: copy.deepcopy(model).fuse()", lambda: copy.deepcopy(model).fuse(verbose=False)
    return None


def _outputs(spec: ModelSpec, model, args: tuple) -> Any:
    return run_detection(model, args) if spec.kind == "detection" else run(model, args)


def _compare(spec: ModelSpec, expected: Any, actual: Any) -> dict[str, Any]:
    return compare_detection(expected, actual) if spec.kind == "detection" else compare(expected, actual)


#: Beyond ``WRONG_ABOVE``, a deploy form is still exact if its float32 error against the float64 model is
#: within this factor of the unfused float32 model's own (rounding in another order, on an ill-conditioned net).
FLOOR_FACTOR = 4.0
EXACT_FLOAT64 = 1e-9


def _double(args: tuple) -> tuple:
    import torch

    def d(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.double()
        if isinstance(v, (list, tuple)):
            return type(v)(d(x) for x in v)
        return v

    return tuple(d(a) for a in args)


class Float64Reference:
    """The unfused model run in float64 (computed once, when a deploy form differs by more than ``WRONG_ABOVE``)."""

    def __init__(self, model, args: tuple) -> None:
        self.model, self.args, self._out, self.error = model, args, None, None
        self._model64 = None

    def output(self) -> Any:
        if self._out is None and self.error is None:
            try:
                self._model64 = copy.deepcopy(self.model).double()
                self._out = run(self._model64, _double(self.args))
            except Exception as err:
                self.error = one_line(err)
        return self._out

    def fused_error(self, spec: ModelSpec, key: str) -> float | None:
        """The relative error, against this float64 reference, of deploy form ``key`` made from the model in
        float64 (None when it cannot be made or run there): ~1e-12 says the conversion is exact, so a float32
        difference is the model amplifying rounding."""
        if self.output() is None:
            return None
        try:
            maker = _makers(spec, self._model64, _double(self.args))[key][1]
            return compare(self._out, run(maker().eval(), _double(self.args)))["rel"]
        except Exception:
            return None


def judge(diff: dict[str, Any], ref32: Any, out: Any, exact: Float64Reference | None,
          exact_in_float64: Callable[[], float | None] = lambda: None) -> dict[str, Any]:
    """``diff`` plus ``wrong``: above ``WRONG_ABOVE``, unless the float64 check shows float32 rounding alone: the
    deploy form is within ``FLOOR_FACTOR`` times the unfused float32 model's own error, or, made from the model
    in float64, it matches the float64 model to ``EXACT_FLOAT64`` (the conversion is exact; the model amplifies
    float32 rounding, as random-init nets with randomized BN statistics can a millionfold)."""
    if diff["rel"] <= WRONG_ABOVE:
        return {**diff, "wrong": False}
    ref64 = exact.output() if exact is not None and not math.isinf(diff["rel"]) else None
    if ref64 is None:
        return {**diff, "wrong": True}
    floor, err = compare(ref64, ref32)["rel"], compare(ref64, out)["rel"]
    result = {**diff, "float64": {"unfused_float32": floor, "deploy_float32": err},
              "wrong": not err <= max(WRONG_ABOVE, FLOOR_FACTOR * floor)}
    if result["wrong"]:
        e64 = exact_in_float64()
        result["float64"]["deploy_float64"] = e64
        result["wrong"] = e64 is None or not e64 <= EXACT_FLOAT64
    return result


def _variant(spec: ModelSpec, make: Callable[[], Any], args: tuple, ref: Any, before: dict[str, int],
             bn_paths: list[str], exact: Float64Reference | None = None, key: str | None = None
             ) -> tuple[dict[str, Any], Any]:
    rec: dict[str, Any] = {"error": None, "broken": False, "run_error": None}
    t0 = time.perf_counter()
    try:
        fused = make()
    except Exception as err:
        rec["error"] = one_line(err)
        return rec, None
    rec["make_s"] = time.perf_counter() - t0
    report = getattr(fused, "reparam_report", None)
    try:
        out = _outputs(spec, fused.eval(), args)
    except Exception as err:
        rec.update(broken=True, run_error=one_line(err))
        return rec, fused
    diff = _compare(spec, ref, out)
    rec.update(judge(diff, ref, out, exact if spec.kind != "detection" else None,
                     (lambda: exact.fused_error(spec, key)) if exact is not None and key else lambda: None))
    after = executed(fused, args)
    rec.update(counts=after, costlier=costlier(before, after))
    if report is not None:
        listed = bn_leftovers(report, bn_paths)
        reasons = Counter(_normalize_reason(why) for _, why in listed)
        rec["report"] = {**report_summary(report), "bn_listed": len(listed),
                         "bn_reasons": dict(reasons.most_common(6)),
                         "bn_without_reason": max(0, after["batch_norm"] - len(listed))}
    return rec, fused


def measure(spec: ModelSpec, seed: int = 0, rounds: int = 3, log: Callable[[str], None] = lambda s: None
            ) -> dict[str, Any]:
    """The sweep record of one model; never raises (failures are recorded as one-line errors)."""
    t_start = time.perf_counter()
    rec: dict[str, Any] = {"id": spec.id, "source": spec.source, "name": spec.name, "family": spec.family,
                           "kind": spec.kind, "input": list(spec.input_size), "status": "ok", "error": None}
    try:
        _measure_into(rec, spec, seed, rounds, log)
    except Exception as err:  # anything not already attributed to a step
        rec.update(status="error", error=one_line(err), traceback=traceback.format_exc(limit=-3)[-1500:])
    rec["seconds"] = time.perf_counter() - t_start
    return rec


def _measure_into(rec: dict[str, Any], spec: ModelSpec, seed: int, rounds: int, log) -> None:
    try:
        model, args = built(spec, seed)
    except Exception as err:
        rec.update(status="build failed", error=one_line(err))
        return
    bn_paths = _bn_paths(model)
    rec.update(params=sum(p.numel() for p in model.parameters()), bn_modules=len(bn_paths))
    try:
        ref = _outputs(spec, model, args)
        before = executed(model, args)
    except Exception as err:
        rec.update(status="reference failed", error=one_line(err))
        return
    rec["before"] = before
    makers = _makers(spec, model, args)
    rec["variants"], rec["makers"] = {}, {k: d for k, (d, _) in makers.items()}
    exact = Float64Reference(model, args)
    for key, (_desc, make) in makers.items():
        log(f"{spec.id}: {key}")
        rec["variants"][key], fused = _variant(spec, make, args, ref, before, bn_paths, exact, key)
        del fused
        gc.collect()
    rec["input_unchanged"] = _compare(spec, ref, _outputs(spec, model, args))["rel"] == 0.0
    timed = {k: make for k, (_, make) in makers.items()  # (the exported program's fusion: its make_s, once)
             if k not in ("fx", "reparam_export") and rec["variants"][k]["error"] is None}
    if rounds > 0 and timed:
        log(f"{spec.id}: timing {', '.join(timed)} and deepcopy, {rounds} rounds")
        rec["time"] = {"rounds": rounds, **timing(timed, model, rounds)}


def built(spec: ModelSpec, seed: int) -> tuple[Any, tuple]:
    """``build(spec, seed)`` with the BN statistics randomized (``reparam.testing.randomize_bn_``), in eval mode."""
    from reparam.testing import randomize_bn_

    model, args = build(spec, seed)
    randomize_bn_(model, seed=seed)
    model.eval()
    return model, args


def timing(makers: dict[str, Callable[[], Any]], model, rounds: int, warmup: int = 0) -> dict[str, Any]:
    """``makers`` and ``copy.deepcopy(model)`` timed round-robin, the garbage collector run untimed before each
    call: median seconds, the per-round times and the paired ratios (each maker against the deepcopy; with a
    ``library`` maker, each ``reparam`` one against it)."""
    from reparam.measure import interleaved_times, paired_ratio

    fns = {**makers, "deepcopy": lambda: copy.deepcopy(model)}
    times = interleaved_times(fns, repeats=rounds, warmup=warmup, collect=True)
    ratios = {f"{a}/deepcopy": paired_ratio(times, a, "deepcopy") for a in makers}
    if "library" in makers:
        ratios |= {f"{a}/library": paired_ratio(times, a, "library") for a in makers if a.startswith("reparam")}
    return {"median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times, "paired_ratio": ratios}
