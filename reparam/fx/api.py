"""``reparam.fuse`` and ``reparam.verify``: automatic re-parameterization of any PyTorch model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .. import core
from ..core.errors import ReparamError
from .report import FuseReport
from .rewrite import Rewrite, apply_plan, drop_identities, fold_conv_transpose_bn
from .tracing import eval_mode, frozen_training_state, safe_deepcopy, trace
from .translate import translate
from .workspace import Workspace, attr_at


def _as_tuple(inputs: Any) -> tuple:
    if inputs is None:
        return ()
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def fuse(model: nn.Module, example_inputs: Any = None, *, inplace: bool = False, allow_costlier: bool = False,
         report: bool = False) -> nn.Module | tuple[nn.Module, FuseReport]:
    """Collapse every fusable linear region of ``model`` into convolutions (eval semantics).

    Returns an eval-mode module computing the same outputs; the report is attached as
    ``result.reparam_report`` (and returned as a second value with ``report=True``).

    - ``example_inputs``: a tensor or tuple; enables shape propagation (needed to fold ``Linear`` layers,
      which are linear per channel only on 2-D inputs) and fills shapes for untraceable submodules.
    - ``inplace``: reuse the input's modules instead of copying them (the input is put in eval mode and
      must not be used afterwards); by default the input model is left untouched.
    - ``allow_costlier``: also apply exact fusions that raise the MAC count (e.g. composing a 1x1
      projection with a following 1x1 expansion); refused by default, with the reason in the report.
    """
    if not isinstance(model, nn.Module):
        raise ReparamError(f"reparam.fuse expects a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    rep = FuseReport(params_before=_count_params(model))
    with eval_mode(model, keep=inplace):
        stay_training = {name for name, m in model.named_modules() if m.training}
        for name in stay_training:
            m = model.get_submodule(name)
            rep.refused.append((name or type(model).__name__,
                                f"{type(m).__name__} stays in training mode after eval(); left alone"))
        try:
            gm = trace(model)
        except Exception as err:  # fx raises many types for untraceable code
            rep.skipped.append((type(model).__name__, f"not traceable as a whole ({_brief(err)}); "
                                "fusing its submodules one by one"))
            root = model if inplace else safe_deepcopy(model)
            shapes = _capture_inputs(root, inputs) if inputs else {}
            fused = _fuse_children(root, "", shapes, rep, allow_costlier)
        else:
            fused = _fuse_traced(gm, inputs, rep, allow_costlier, "", copy_originals=not inplace)
            if fused is None:
                fused = model if inplace else safe_deepcopy(model)
    fused.eval()
    for name, m in fused.named_modules():  # modules that refuse eval() keep computing as they did
        if name and name in stay_training:
            m.training = True
    rep.params_after = _count_params(fused)
    fused.reparam_report = rep
    return (fused, rep) if report else fused


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def _fuse_traced(gm: Workspace, inputs: tuple, rep: FuseReport, allow_costlier: bool, prefix: str,
                 copy_originals: bool) -> fx.GraphModule | None:
    """Fuse a traced module; None when nothing changed (the caller keeps the original)."""
    if inputs:
        try:
            runnable = gm.graph_module()
            with torch.no_grad(), frozen_training_state(runnable):
                ShapeProp(runnable).propagate(*inputs)
        except Exception as err:
            rep.skipped.append((prefix or "shape propagation", f"example inputs did not run ({_brief(err)}); "
                                "continuing without shapes"))
        finally:
            gm.graph.owning_module = None  # the rewrite adds modules that GraphModule does not hold
    rw = Rewrite()
    changed = drop_identities(gm, rep, prefix) + fold_conv_transpose_bn(gm, rep, rw, prefix)
    tr = translate(gm)
    rep.refused.extend((prefix + n, why) for n, why in tr.refused)
    plan = core.plan(tr.graph, allow_costlier=allow_costlier)
    rep.refused.extend((prefix + r.node, r.reason) for r in plan.refusals)
    changed += apply_plan(gm, plan, tr.graph, rep, rw, prefix)
    if not changed:
        return None
    gm.graph.lint()
    out = gm.graph_module()
    if copy_originals:
        _copy_originals(out, rw)
    return out


def _targets(gm: fx.GraphModule) -> list[str]:
    return list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")))


def _copy_originals(out: fx.GraphModule, rw: Rewrite) -> None:
    """Replace the references to the input model's modules/tensors by copies (sharing preserved)."""
    originals = {t: attr_at(out, t) for t in _targets(out) if t not in rw.modules}
    memo = {id(m): m for m in rw.modules.values()}
    copies = safe_deepcopy(originals, memo)
    for t, obj in copies.items():
        _set(out, t, obj)


def _set(root: nn.Module, target: str, value: Any) -> None:
    *path, last = target.split(".")
    parent = attr_at(root, ".".join(path)) if path else root
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and last in parent._buffers:
        parent._buffers[last] = value
    else:
        setattr(parent, last, value)


def _capture_inputs(root: nn.Module, inputs: tuple) -> dict[nn.Module, tuple]:
    """Run ``root`` once on the example inputs, recording each submodule's first positional inputs."""
    seen: dict[nn.Module, tuple] = {}

    def hook(m, args):
        seen.setdefault(m, args)

    handles = [m.register_forward_pre_hook(hook) for m in root.modules()]
    try:
        with torch.no_grad(), frozen_training_state(root):
            root(*inputs)
    except Exception:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def _fuse_children(module: nn.Module, prefix: str, shapes: dict, rep: FuseReport, allow_costlier: bool) -> nn.Module:
    """Fallback: fuse each traceable child (in place on an already-copied tree), recursing into the rest."""
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        try:
            gm = trace(child)
        except Exception as err:
            if any(True for _ in child.children()):
                rep.skipped.append((path, f"not traceable ({_brief(err)}); fusing its submodules"))
                _fuse_children(child, path + ".", shapes, rep, allow_costlier)
            else:
                rep.skipped.append((path, f"not traceable and has no submodules ({_brief(err)})"))
            continue
        fused = _fuse_traced(gm, shapes.get(child, ()), rep, allow_costlier, path + ".", copy_originals=False)
        if fused is not None:
            setattr(module, name, fused)
    return module


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
