"""``reparam.fuse`` on a ``torch.export.ExportedProgram``: the collapse inside the PT2 deployment path.

The program's ``module()`` is a GraphModule of ATen calls; :func:`reparam.fx.aten.normalize` spells them the
torch way and the same translation, plan, folds, checks and report as for any module fuse it.  The fused
module is then exported again with the program's call signature and dynamic dimensions (each symbolic size
of an input becomes a ``Dim`` with the program's range), so the result is an ordinary ExportedProgram: its
untouched parameters and buffers keep their names, the fused convs are parameters of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from ..core.errors import ReparamError
from .report import FuseReport


def _dims(program: ExportedProgram, module: nn.Module) -> tuple[tuple, dict] | None:
    """The ``dynamic_shapes`` of the program's inputs: for every symbolic size, a Dim over the program's range
    (inputs sharing a symbol share the Dim); None when every size is static."""
    made: dict[Any, Any] = {}
    leaves = []
    dynamic = False
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            leaves.append(None)
            continue
        spec = {}
        for i, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                spec[i] = _dim(size, program, made)
                dynamic = True
        leaves.append(spec or None)
    if not dynamic:
        return None
    args, kwargs = pytree.tree_unflatten(leaves, program.call_spec.in_spec)
    return args, kwargs


def _dim(size: torch.SymInt, program: ExportedProgram, made: dict) -> Any:
    expr = size.node.expr
    if expr in made:
        return made[expr]
    bounds = program.range_constraints.get(expr)
    if bounds is None or not getattr(expr, "is_Symbol", False):
        dim = Dim.DYNAMIC
    else:
        lower, upper = int(bounds.lower), bounds.upper
        upper = int(upper) if upper.is_finite else None
        dim = Dim(str(expr), min=lower) if upper is None else Dim(str(expr), min=lower, max=upper)
    made[expr] = dim
    return dim


def fuse_program(program: ExportedProgram, example_inputs: Any, *, allow_costlier: bool
                 ) -> tuple[ExportedProgram, FuseReport]:
    """The fused program and its report (see :func:`reparam.fuse`)."""
    from .api import fuse

    module = program.module()
    stored = program.example_inputs
    if example_inputs is None and stored is not None:
        args, kwargs = stored
    elif example_inputs is not None:
        args, kwargs = (tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}
    else:
        args, kwargs = None, {}
    if kwargs:
        raise ReparamError("reparam.fuse on an ExportedProgram takes programs with positional inputs only; this one "
                           f"has keyword inputs {sorted(kwargs)}")
    if args is None:
        raise ReparamError("reparam.fuse needs example inputs to export the fused program again: this program "
                           "stores none, pass example_inputs")
    fused, report = fuse(module, args, allow_costlier=allow_costlier, report=True)
    dims = _dims(program, module)
    try:
        result = torch.export.export(fused, tuple(args), dynamic_shapes=None if dims is None else dims[0],
                                     strict=False)
    except Exception as err:  # a failure here is ours: say what failed, with torch's first line
        text = str(err).strip().splitlines()
        raise ReparamError(f"exporting the fused program failed: {type(err).__name__}: "
                           f"{text[0] if text else ''}") from err
    return result, report


__all__ = ["fuse_program"]
