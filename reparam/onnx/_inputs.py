"""Graph inputs: initializers a caller may override (kept as runtime inputs), and input-shape overrides.

onnx-graphsurgeon imports an initializer that is also a graph input as a constant and drops it from the
inputs; :func:`restore_runtime_inputs` turns it back into a graph input, so nothing is folded from it and the
output still accepts it.  :func:`resolve_input_shapes` checks an ``--input-shape`` request (only dynamic
dims may be set) and :func:`with_input_shapes` applies it to a skeleton.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
import onnx_graphsurgeon as gs

from .errors import OnnxModelError

Dim = int | str
InputShapes = Mapping[str, Sequence[Dim]]


def _declared(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def resolve_input_shapes(model: onnx.ModelProto, shapes: InputShapes | None,
                         runtime: Sequence[str]) -> dict[str, tuple[Dim, ...]]:
    """The requested shapes by input name, checked: a real graph input, the same rank, static dims kept.

    A single unnamed shape (key ``""``) applies to the only graph input.
    """
    if not shapes:
        return {}
    inputs = {i.name: i for i in model.graph.input if i.name not in runtime}
    out: dict[str, tuple[Dim, ...]] = {}
    for name, dims in shapes.items():
        if name == "":
            if len(inputs) != 1:
                raise OnnxModelError(f"the model has {len(inputs)} graph inputs ({', '.join(map(repr, inputs))}); "
                                     "name the one to shape as NAME:D0,D1,...")
            name = next(iter(inputs))
        if name not in inputs:
            raise OnnxModelError(f"no graph input named {name!r} (inputs: {', '.join(map(repr, inputs)) or 'none'})")
        dims = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in dims)
        if any(isinstance(d, int) and d < 1 for d in dims):
            raise OnnxModelError(f"input {name!r}: dims must be positive sizes or names, got {list(dims)}")
        have = _declared(inputs[name])
        if have is not None:
            if len(have) != len(dims):
                raise OnnxModelError(f"input {name!r} has rank {len(have)}, the shape given has {len(dims)} dims")
            for k, (old, new) in enumerate(zip(have, dims)):
                if isinstance(old, int) and old != new:
                    raise OnnxModelError(f"input {name!r}: dim {k} is fixed to {old} by the model, not {new}")
        out[name] = dims
    return out


def with_input_shapes(light: onnx.ModelProto, shapes: Mapping[str, Sequence[Dim]]) -> onnx.ModelProto:
    """A copy of the skeleton ``light`` whose graph inputs have the given shapes."""
    new = onnx.ModelProto()
    new.CopyFrom(light)
    for vi in new.graph.input:
        if vi.name in shapes:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in shapes[vi.name]:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d
    return new


def restore_runtime_inputs(graph: gs.Graph, model: onnx.ModelProto, runtime: Sequence[str]) -> None:
    """Make initializers that are also graph inputs graph inputs again (variables, in the declared order)."""
    if not runtime:
        return
    tensors = graph.tensors()
    for name in runtime:
        t = tensors.get(name)
        if isinstance(t, gs.Constant):
            t.to_variable(dtype=t.dtype, shape=list(t.shape))
            t.type = "tensor_type"  # what Variable() sets and to_variable() does not
    by_name = {t.name: t for t in graph.inputs}
    graph.inputs = [by_name.get(i.name) or tensors[i.name] for i in model.graph.input
                    if i.name in by_name or i.name in tensors]


__all__ = ["InputShapes", "resolve_input_shapes", "restore_runtime_inputs", "with_input_shapes"]
