"""Numerical comparison of two ONNX models with ONNX Runtime on random inputs (``reparam onnx --check``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import OnnxCheckError, one_line

# relative tolerance on max|a - b| / max|reference| per output element type
DEFAULT_RTOL = {"tensor(double)": 1e-9, "tensor(float)": 1e-4, "tensor(float16)": 1e-2, "tensor(bfloat16)": 5e-2}
DEFAULT_ATOL = 1e-6

_NP = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class OutputDiff:
    """Difference on one output: ``max_rel`` is ``max_abs`` over the largest reference magnitude."""

    name: str
    max_abs: float
    max_rel: float
    scale: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs <= self.tolerance)


@dataclass
class CheckResult:
    outputs: list[OutputDiff] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def format(self) -> str:
        shapes = ", ".join(f"{k}{list(v)}" for k, v in self.input_shapes.items())
        lines = [f"check ({'ok' if self.ok else 'FAILED'}): max abs diff {self.max_abs:.3g}, "
                 f"max rel diff {self.max_rel:.3g} on random inputs {shapes}"]
        for o in self.outputs:
            lines.append(f"  {o.name}: abs {o.max_abs:.3g}, rel {o.max_rel:.3g} (|ref| up to {o.scale:.3g}, "
                         f"tolerance {o.tolerance:.3g}){'' if o.ok else '  <-- above tolerance'}")
        return "\n".join(lines)

    __str__ = format

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"ok": self.ok, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "outputs": [{"name": o.name, "max_abs": o.max_abs, "max_rel": o.max_rel, "scale": o.scale,
                             "tolerance": o.tolerance, "ok": o.ok} for o in self.outputs]}


def _session(model: onnx.ModelProto | str | os.PathLike, what: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise OnnxCheckError(f"ONNX Runtime cannot load the {what} model: {one_line(err, 200)}") from None


def random_inputs(session, dims: Mapping[str, int] | None = None, default_dim: int = 1,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every input: dynamic dims come from ``dims`` (by symbolic name) or ``default_dim``."""
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = []
        for d in inp.shape:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            else:
                shape.append(int(default_dim))
        dt = _NP.get(inp.type)
        if dt is None:
            raise OnnxCheckError(f"input {inp.name!r} has type {inp.type}, which --check cannot generate")
        if np.issubdtype(dt, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dt)
        elif dt is np.bool_:
            feeds[inp.name] = rng.random(shape) < 0.5
        else:
            feeds[inp.name] = rng.integers(0, 4, shape).astype(dt)
    return feeds


def compare(reference: onnx.ModelProto | str | os.PathLike, candidate: onnx.ModelProto | str | os.PathLike, *,
            dims: Mapping[str, int] | None = None, default_dim: int = 1, seed: int = 0,
            rtol: float | None = None, atol: float = DEFAULT_ATOL,
            feeds: Mapping[str, np.ndarray] | None = None) -> CheckResult:
    """Run both models on the same random inputs and measure the output differences.

    An output passes when ``max|a - b| <= atol + rtol * max|reference|``; ``rtol`` defaults by element
    type (1e-4 for float32).  Models are run without ORT graph optimizations, so what is compared is the
    graphs as written.  Random inputs follow the candidate's input shapes (the same as the reference's,
    or fixed from them by ``input_shapes``).
    """
    ref = _session(reference, "reference")
    cand = _session(candidate, "fused")
    if feeds is None:
        feeds = random_inputs(cand, dims, default_dim, seed)
    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    try:
        expected = ref.run(None, dict(feeds))
    except Exception as err:
        raise OnnxCheckError(f"ONNX Runtime failed on the reference model with inputs {shapes} "
                             f"(set dynamic dims with --dim NAME=SIZE): {one_line(err, 200)}") from None
    try:
        got = cand.run([o.name for o in ref.get_outputs()], dict(feeds))
    except Exception as err:
        raise OnnxCheckError(f"ONNX Runtime failed on the fused model: {one_line(err, 200)}") from None
    result = CheckResult(input_shapes=shapes)
    for meta, e, g in zip(ref.get_outputs(), expected, got):
        e64 = np.asarray(e, np.float64)
        g64 = np.asarray(g, np.float64)
        if e64.shape != g64.shape:
            result.outputs.append(OutputDiff(meta.name, float("inf"), float("inf"), 0.0, 0.0))
            continue
        diff = np.abs(e64 - g64)
        both_nan = np.isnan(e64) & np.isnan(g64)
        diff = np.where(both_nan, 0.0, diff)
        max_abs = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
        finite = e64[np.isfinite(e64)]
        scale = float(np.abs(finite).max()) if finite.size else 0.0
        r = DEFAULT_RTOL.get(meta.type, 0.0) if rtol is None else rtol
        result.outputs.append(OutputDiff(meta.name, max_abs, max_abs / scale if scale else max_abs, scale,
                                         atol + r * scale))
    return result


__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "CheckResult", "OutputDiff", "compare", "random_inputs"]
