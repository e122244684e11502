"""reparam.onnx: structural re-parameterization of ONNX graphs (the ``onnx`` extra).

>>> import reparam.onnx
>>> fused = reparam.onnx.fuse("train.onnx")                       # a new onnx.ModelProto
>>> fused, report = reparam.onnx.fuse("train.onnx", report=True)
>>> print(report)                                                   # regions fused, refusals and why
>>> reparam.onnx.save_model(fused, "deploy.onnx")                   # atomic; external data when large
>>> reparam.onnx.compare("train.onnx", "deploy.onnx").max_abs       # ONNX Runtime on random inputs

The frontend only translates ONNX nodes into a :class:`reparam.core.LinearGraph` and rewrites the regions
:func:`reparam.core.plan` returns; the fusion math lives in :mod:`reparam.core`.
"""

from __future__ import annotations

from .._extras import require

require("onnx", feature="reparam.onnx")

from .check import CheckResult, OutputDiff, compare
from .errors import OnnxCheckError, OnnxModelError
from .io import load_model, save_model
from .pipeline import fuse, inference_form
from .report import FusedRegion, FuseReport, Refused

__all__ = [
    "CheckResult",
    "FuseReport",
    "FusedRegion",
    "OnnxCheckError",
    "OnnxModelError",
    "OutputDiff",
    "Refused",
    "compare",
    "fuse",
    "inference_form",
    "load_model",
    "save_model",
]
