"""``import reparam.core`` is numpy-only: no torch, no onnx."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import reparam.core


def test_import_core_pulls_in_no_torch_or_onnx():
    code = ("import reparam.core, sys; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime')]; "
            "assert not bad, bad")
    root = str(Path(reparam.core.__file__).resolve().parents[2])  # the checkout, if not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)


def test_public_api_is_complete():
    for name in ("fold_bn", "fold_bn_transpose", "identity_conv", "affine_to_conv", "pad_kernel", "regroup",
                 "sum_convs", "compose", "avgpool_to_conv", "pad_to_conv", "chain", "sum_branches", "plan",
                 "collapse", "LinearGraph", "NotFusable", "Conv", "BatchNorm"):
        assert name in reparam.core.__all__ and hasattr(reparam.core, name)
    assert issubclass(reparam.core.NotFusable, reparam.core.ReparamError)
