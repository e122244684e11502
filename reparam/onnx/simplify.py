"""``--simplify``: a well-kept simplifier (onnxslim, else onnxsim; the ``simplify`` extra) run after the fusion.

reparam collapses linear regions; what it does not touch (Identity nodes on initializers, Constant nodes,
shape subgraphs, Gather/Unsqueeze chains) a simplifier folds, so one command gives the cleanest graph.  The
simplifier sees initializers that are also graph inputs as plain graph inputs (their defaults are put back
afterwards), so it cannot fold what a caller may feed; a simplifier that renames or retypes a graph input or
output is an error, and its output must pass the same checks as reparam's own.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Sequence

import onnx

from .._extras import install_line
from .errors import OnnxModelError, one_line

SIMPLIFIERS = ("onnxslim", "onnxsim")


def simplifier(choice: str | bool = True) -> str:
    """The simplifier to use: ``choice`` if named, else the first of :data:`SIMPLIFIERS` that is installed."""
    names = SIMPLIFIERS if choice is True or choice == "auto" else (str(choice),)
    if names[0] not in SIMPLIFIERS and len(names) == 1:
        raise OnnxModelError(f"unknown simplifier {names[0]!r} (choose from {', '.join(SIMPLIFIERS)})")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return name
    raise OnnxModelError(f"--simplify needs the simplify extra ({' or '.join(names)} is not installed); install it "
                         f"with: {install_line(['simplify'])}")


def _signature(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in list(model.graph.input) + list(model.graph.output)]


def run_simplifier(model: onnx.ModelProto, name: str, runtime: Sequence[str]) -> tuple[onnx.ModelProto, str]:
    """``model`` simplified by ``name`` (``model`` itself is not modified); returns it and "name version"."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    defaults = [t for t in work.graph.initializer if t.name in set(runtime)]
    if defaults:
        kept = [t for t in work.graph.initializer if t.name not in set(runtime)]
        del work.graph.initializer[:]
        work.graph.initializer.extend(kept)
    module = importlib.import_module(name)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if name == "onnxslim":
                out = module.slim(work)
            else:
                out, ok = module.simplify(work)
                if not ok:
                    raise RuntimeError("onnxsim's own check of the simplified model failed")
    except Exception as err:  # the simplifiers raise plain exceptions
        raise OnnxModelError(f"--simplify: {name} failed ({one_line(err, 200)}); nothing was written") from None
    if not isinstance(out, onnx.ModelProto):
        raise OnnxModelError(f"--simplify: {name} returned no model; nothing was written")
    if defaults:
        out.graph.initializer.extend(defaults)
    if _signature(out) != _signature(model):
        raise OnnxModelError(f"--simplify: {name} changed the graph inputs or outputs; nothing was written")
    for mine, theirs in zip(list(model.graph.input) + list(model.graph.output),
                            list(out.graph.input) + list(out.graph.output)):
        theirs.CopyFrom(mine)  # declared shapes as they were (a simplifier may fill in dynamic dims)
    return out, f"{name} {getattr(module, '__version__', '')}".strip()


__all__ = ["SIMPLIFIERS", "run_simplifier", "simplifier"]
