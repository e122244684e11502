"""Real YOLO models (ultralytics): their own forward cannot be traced, their C2f-style blocks can (a split
iterated as a list, counted from its BN).  Skipped where ultralytics is not installed (neither the project's
venv nor ../shared/scripts/thirdparty-env has it: ``pip install ultralytics`` into the latter)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

import reparam
from reparam.testing import assert_outputs_close, count_executed_ops, randomize_bn_

pytestmark = pytest.mark.thirdparty
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="reparam-ultralytics-"))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
ultralytics = pytest.importorskip("ultralytics")


@pytest.mark.parametrize("name", ["yolov8n", "yolov9t"])
def test_yolo_blocks_trace_whole_and_no_bn_is_left(name: str) -> None:
    torch.manual_seed(0)
    model = ultralytics.YOLO(f"{name}.yaml").model  # built from its config: no download
    randomize_bn_(model, 0)
    model.eval()
    x = torch.rand(1, 3, 128, 128)
    fused = reparam.fuse(model, x)
    rep = fused.reparam_report
    iterated = {"C2f", "RepNCSPELAN4", "ELAN1"}  # list(cv1(x).chunk(2, 1)) in their forward
    blocks = {f"model.{i}" for i, m in enumerate(model.model) if type(m).__name__ in iterated}
    assert blocks and not blocks & {w for w, _ in rep.skipped}, rep
    assert count_executed_ops(fused, x)["batch_norm"] == 0, rep
    assert isinstance(fused, type(model))
    assert [(m.f, m.i) for m in fused.model] == [(m.f, m.i) for m in model.model]  # what the parent reads
    with torch.no_grad():
        assert_outputs_close(model(x), fused(x), rtol=1e-4)
