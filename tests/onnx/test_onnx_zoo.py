"""RepGhostNet: fusing the training-form ONNX export gives the deploy form's Conv count and outputs."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_testlib import max_rel_error, ops, session

import reparam.onnx

torch = pytest.importorskip("torch")
reparam_zoo = pytest.importorskip("reparam_zoo")


def _randomize_bn(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)


def _export(net, x, path: Path, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"],
                          opset_version=18 if dynamo else 17)
    return onnx.load(str(path))


def _check(name: str, dynamo: bool, size: int) -> None:
    train = reparam_zoo.create_model(name).eval()
    _randomize_bn(train)
    deploy = reparam_zoo.convert(train)
    x = torch.randn(1, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        train_onnx = _export(train, x, Path(tmp) / "train.onnx", dynamo)
        deploy_onnx = _export(deploy, x, Path(tmp) / "deploy.onnx", dynamo)
        fused, report = reparam.onnx.fuse(Path(tmp) / "train.onnx", report=True)
    onnx.checker.check_model(fused, full_check=True)
    assert ops(train_onnx)["BatchNormalization"] > 0
    assert ops(fused)["BatchNormalization"] == 0, report.format()
    assert ops(fused)["Conv"] == ops(deploy_onnx)["Conv"], report.format()
    feeds = {"x": x.numpy()}
    assert max_rel_error(train_onnx, fused, feeds) < 1e-5
    assert max_rel_error(deploy_onnx, fused, feeds) < 1e-5
    with torch.no_grad():
        expected = deploy(x).numpy()
    got = session(fused).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def test_repghostnet_torchscript_export_fuses_to_deploy_form():
    _check("repghostnet_0_5x", dynamo=False, size=64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["repghostnet_0_5x", "repghostnet_1_0x", "repghostnet_2_0x"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_repghostnet_exports_fuse_to_deploy_form(name, dynamo):
    _check(name, dynamo=dynamo, size=96)
