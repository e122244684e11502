"""``reparam.fuse`` and ``reparam.verify``: automatic re-parameterization of any PyTorch model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
from torch import nn

from ..core.errors import ReparamError
from ..torch_ops import is_exported_module
from .build import Build, Options, build
from .checks import checked_build, max_rel
from .patching import tracing_session
from .report import FuseReport
from .tracing import eval_mode, safe_deepcopy


def _as_tuple(inputs: Any) -> tuple:
    if inputs is None:
        return ()
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _refuse_wrappers(model: Any) -> None:
    """One clear error for the module kinds reparam cannot rewrite, saying what to pass instead."""
    name = type(model).__name__
    if isinstance(model, torch.jit.ScriptModule):
        raise ReparamError(f"reparam.fuse got a TorchScript module ({name}); pass the nn.Module it was scripted or "
                           "traced from, then script or trace the fused result")
    dynamo = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    if dynamo is not None and isinstance(model, getattr(dynamo, "OptimizedModule", ())):
        raise ReparamError("reparam.fuse got a torch.compile wrapper (OptimizedModule); pass the module before "
                           "compiling (model._orig_mod), then torch.compile the fused result")
    if not isinstance(model, nn.Module):
        raise ReparamError(f"reparam.fuse expects a torch.nn.Module, got {name}")


REPORT_ATTRIBUTE = "reparam_report"
"""The attribute of a fused module holding its :class:`FuseReport` (``fused.reparam_report``)."""


@overload
def fuse(model: torch.export.ExportedProgram, example_inputs: Any = None, *, inplace: bool = False,
         allow_costlier: bool = False, report: Literal[False] = False) -> torch.export.ExportedProgram: ...


@overload
def fuse(model: nn.Module, example_inputs: Any = None, *, inplace: bool = False, allow_costlier: bool = False,
         report: Literal[False] = False) -> nn.Module: ...


@overload
def fuse(model: nn.Module, example_inputs: Any = None, *, inplace: bool = False, allow_costlier: bool = False,
         report: Literal[True]) -> tuple[nn.Module, FuseReport]: ...


def fuse(model: nn.Module, example_inputs: Any = None, *, inplace: bool = False, allow_costlier: bool = False,
         report: bool = False) -> nn.Module | tuple[nn.Module, FuseReport]:
    """Collapse every fusable linear region of ``model`` into convolutions (eval semantics).

    ``model`` is any ``nn.Module`` (also a ``torch.export`` program's ``module()``), or a
    ``torch.export.ExportedProgram``, which gives an ExportedProgram back: the same call signature and dynamic
    dimensions, checked on the program's example inputs unless others are given.

    Returns an eval-mode module computing the same outputs; its :class:`FuseReport` is the attribute
    ``reparam_report`` of the result (:data:`REPORT_ATTRIBUTE`), also returned as a second value with
    ``report=True``.

    - ``example_inputs``: a tensor or tuple.  The result is then run and checked on them before it is
      returned (each fused part against the value it replaces, and the whole model end to end); a part that
      fails or differs is undone and the report says so.  They also give shapes (ranks, 2-D ``Linear``
      inputs) where the graph alone does not decide them.
    - ``inplace``: reuse the input's modules instead of copying them (the input is put in eval mode and
      must not be used afterwards); by default the input model is left untouched.
    - ``allow_costlier``: also apply exact fusions that run more convs or MACs than the input (composing a
      1x1 projection with a following 1x1 expansion, a lone BN as a conv); refused by default, with the
      reason in the report.
    """
    if isinstance(model, torch.export.ExportedProgram):
        from .exported import fuse_program

        program, rep = fuse_program(model, example_inputs, allow_costlier=allow_costlier)
        setattr(program, REPORT_ATTRIBUTE, rep)
        return (program, rep) if report else program
    _refuse_wrappers(model)
    inputs = _as_tuple(example_inputs)
    params = _count_params(model)
    with eval_mode(model, keep=inplace), tracing_session():  # (one set of fx's patches for all the builds)
        stay_training = set() if is_exported_module(model) else {n for n, m in model.named_modules() if m.training}
        if inputs:
            b, ref, out, counts = checked_build(model, inputs, allow_costlier)
            if b is None:
                b = Build(safe_deepcopy(model), FuseReport())
                b.report.notes.append("the fused model could not be made to run on the example inputs: "
                                      "returned unfused")
            elif inplace:  # the checks ran on copies; apply what passed to the model itself
                b = build(model, Options(allow_costlier, ref.args, False, frozenset(b.undone), b.undone),
                          copy_model=False)
            rep = b.report
            rep.counts_before, rep.counts_after, rep.counted_on = ref.counts, counts, "example inputs"
            diff = max_rel(ref.output, out)
            rep.check = {"max_rel": diff}
            note = ref.note(diff)
            if note:
                rep.notes.append(note)
        else:
            b = build(model, Options(allow_costlier), copy_model=not inplace)
            rep = b.report
            if b.replaced:
                rep.notes.append("fused in parts (some forward could not be traced): pass example_inputs to have "
                                 "the result run and checked")
    fused = b.module
    fused.eval()
    for name, m in fused.named_modules():  # modules that refuse eval() keep computing as they did
        if name and name in stay_training:
            m.training = True
    for name in sorted(stay_training):
        rep.notes.append(f"{name or type(model).__name__} stays in training mode after eval(); left alone")
    rep.params_before, rep.params_after = params, _count_params(fused)
    setattr(fused, REPORT_ATTRIBUTE, rep)
    return (fused, rep) if report else fused


def verify(model: nn.Module, fused: nn.Module, inputs: Any) -> dict[str, float]:
    """Max absolute and relative difference between two modules' outputs on ``inputs`` (eval, no grad).

    Outputs may be tensors or (nested) tuples/lists/dicts of tensors; the relative difference is taken
    against the largest magnitude of the reference output.
    """
    args = _as_tuple(inputs)
    with eval_mode(model, keep=False), eval_mode(fused, keep=False), torch.no_grad():
        ref, out = model(*args), fused(*args)
    pairs = list(_flatten_pair(ref, out))
    max_abs = max((float((a.double() - b.double()).abs().max()) for a, b in pairs), default=0.0)
    scale = max((float(a.double().abs().max()) for a, _ in pairs), default=0.0)
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale else max_abs}


def _flatten_pair(a: Any, b: Any):
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            raise ReparamError(f"outputs differ in structure/shape: {getattr(a, 'shape', a)} vs "
                               f"{getattr(b, 'shape', b)}")
        yield a, b
    elif isinstance(a, dict):
        for k in a:
            yield from _flatten_pair(a[k], b[k])
    elif isinstance(a, Sequence) and not isinstance(a, str):
        if len(a) != len(b):
            raise ReparamError("outputs differ in length")
        for x, y in zip(a, b):
            yield from _flatten_pair(x, y)
