"""The summary line docs/onnx.md quotes is what the command prints for the demo's model (RepGhostNet 1.0x in
its training form, exported as ``reparam demo`` exports it)."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import pytest
import torch

import reparam.onnx
from reparam.testing import randomize_bn_
from reparam_zoo import repghostnet

DOC = Path(__file__).resolve().parents[2] / "docs" / "onnx.md"


def test_summary_line_in_onnx_md_is_current(tmp_path) -> None:
    match = re.search(r"`reparam onnx: wrote deploy\.onnx: (.*?)`", DOC.read_text())
    assert match, "docs/onnx.md quotes no summary line"
    torch.manual_seed(0)
    model = repghostnet(1.0)
    randomize_bn_(model, 0)
    model.eval()
    path = tmp_path / "train.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    _, report = reparam.onnx.fuse(path, report=True)
    if report.summary() != match.group(1):
        pytest.fail(f"docs/onnx.md says {match.group(1)!r}; the command prints {report.summary()!r}")
