"""Real TensorFlow/Keras graphs through tf2onnx (skipped where tensorflow or tf2onnx is not installed).

tf2onnx folds a Conv's BN into its bias, leaves a BN-only identity branch as Mul/Add on the NHWC input
before a Transpose, and writes Keras "same" padding at stride 2 as pads (0, 1).  Every re-parameterizable
block must still collapse to one Conv (the stride-2 ones because the graph fixes the spatial size), with
Keras's own outputs as the reference.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx_testlib import io_signature, max_rel_error, ops, session

import reparam.onnx

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
tf2onnx = pytest.importorskip("tf2onnx")
L = tf.keras.layers


def _bn():
    rnd = tf.keras.initializers.RandomUniform
    return L.BatchNormalization(beta_initializer="random_normal", gamma_initializer=rnd(0.5, 1.5),
                                moving_mean_initializer="random_normal", moving_variance_initializer=rnd(0.5, 2.0))


def _repvgg(x, c: int, stride: int):
    out = [_bn()(L.Conv2D(c, 3, stride, padding="same", use_bias=False)(x)),
           _bn()(L.Conv2D(c, 1, stride, padding="same", use_bias=False)(x))]
    if stride == 1 and x.shape[-1] == c:
        out.append(_bn()(x))
    return L.ReLU()(L.Add()(out))


def _mobileone_dw(x, stride: int):
    """Depthwise 3x3+BN, depthwise 1x1+BN and a BN-only branch (MobileOne's depthwise stage)."""
    out = [_bn()(L.DepthwiseConv2D(3, stride, padding="same", use_bias=False)(x)),
           _bn()(L.DepthwiseConv2D(1, stride, padding="same", use_bias=False)(x))]
    if stride == 1:
        out.append(_bn()(x))
    return L.ReLU()(L.Add()(out))


def _convert(model, spatial: int | None, channels: int, path) -> onnx.ModelProto:
    spec = (tf.TensorSpec((None, spatial, spatial, channels), tf.float32, name="x"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    onnx.save(proto, str(path))
    return proto


def _check(model, spatial: int | None, channels: int, tmp_path, size: int = 16):
    proto = _convert(model, spatial, channels, tmp_path / "k.onnx")
    fused, report = reparam.onnx.fuse(tmp_path / "k.onnx", report=True)
    onnx.checker.check_model(fused, full_check=True)
    assert io_signature(fused) == io_signature(proto)
    x = np.random.default_rng(0).standard_normal((2, size, size, channels)).astype(np.float32)
    expected = model(x, training=False).numpy()
    got = session(fused).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    assert max_rel_error(proto, fused, {"x": x}) < 2e-5
    return proto, fused, report


def test_keras_repvgg_collapses_every_block_to_one_conv(tmp_path):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((16, 16, 8))
    x = _repvgg(_repvgg(_repvgg(inp, 8, 1), 16, 2), 16, 1)
    model = tf.keras.Model(inp, L.Dense(5)(L.GlobalAveragePooling2D()(x)))
    proto, fused, report = _check(model, 16, 8, tmp_path)
    assert ops(fused)["Conv"] == 3 and "Mul" not in ops(fused), report.format()
    assert ops(proto)["Conv"] == 6
    assert len(report.fixed_size_regions) == 1  # the stride-2 block, fused at 16x16 only
    assert report.transposes_shared == 1  # the first block's identity branch sat before the Transpose


def test_keras_depthwise_branches_collapse(tmp_path):
    tf.keras.utils.set_random_seed(1)
    inp = tf.keras.Input((16, 16, 8))
    model = tf.keras.Model(inp, _mobileone_dw(_mobileone_dw(L.Conv2D(8, 1)(inp), 1), 2))
    _proto, fused, report = _check(model, 16, 8, tmp_path)
    assert ops(fused)["Conv"] == 3, report.format()  # the 1x1 stem and one conv per block


def test_keras_dynamic_spatial_size_keeps_the_rule_for_every_size(tmp_path):
    """Spatial size unknown: stride-1 blocks still collapse; the stride-2 "same" block cannot be proven."""
    tf.keras.utils.set_random_seed(2)
    inp = tf.keras.Input((None, None, 8))
    model = tf.keras.Model(inp, _repvgg(_repvgg(inp, 8, 1), 16, 2))
    proto, fused, report = _check(model, None, 8, tmp_path)
    assert not report.fixed_size_regions
    assert ops(fused)["Conv"] < ops(proto)["Conv"], report.format()
    x = np.random.default_rng(3).standard_normal((1, 12, 12, 8)).astype(np.float32)
    np.testing.assert_allclose(session(fused).run(None, {"x": x})[0], model(x, training=False).numpy(),
                               rtol=1e-4, atol=1e-4)
