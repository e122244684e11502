"""Real TensorFlow/Keras graphs through tf2onnx (skipped where tensorflow or tf2onnx is not installed).

tf2onnx folds a Conv's BN into its bias, leaves a BN-only identity branch as Mul/Add on the NHWC input
before a Transpose, and writes Keras "same" padding at stride 2 as pads (0, 1).  Every re-parameterizable
block must still collapse to one Conv (the stride-2 ones because the graph fixes the spatial size), with
Keras's own outputs as the reference.  TensorFlow runs in a subprocess: loaded beside torch in one process
it crashes torch's dynamo exporter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import onnx
import pytest
from onnx_testlib import io_signature, max_rel_error, ops, session

import reparam.onnx

pytestmark = pytest.mark.skipif(find_spec("tensorflow") is None or find_spec("tf2onnx") is None,
                                reason="needs tensorflow and tf2onnx (test-only: pip install tensorflow-cpu tf2onnx)")

KERAS = r'''
import os, sys
import numpy as np, tensorflow as tf, tf2onnx, onnx
L = tf.keras.layers
rnd = tf.keras.initializers.RandomUniform

def bn():
    return L.BatchNormalization(beta_initializer="random_normal", gamma_initializer=rnd(0.5, 1.5),
                                moving_mean_initializer="random_normal", moving_variance_initializer=rnd(0.5, 2.0))

def repvgg(x, c, stride):
    out = [bn()(L.Conv2D(c, 3, stride, padding="same", use_bias=False)(x)),
           bn()(L.Conv2D(c, 1, stride, padding="same", use_bias=False)(x))]
    if stride == 1 and x.shape[-1] == c:
        out.append(bn()(x))
    return L.ReLU()(L.Add()(out))

def mobileone_dw(x, stride):
    out = [bn()(L.DepthwiseConv2D(3, stride, padding="same", use_bias=False)(x)),
           bn()(L.DepthwiseConv2D(1, stride, padding="same", use_bias=False)(x))]
    if stride == 1:
        out.append(bn()(x))
    return L.ReLU()(L.Add()(out))

out_dir = sys.argv[1]
for seed, (name, spatial) in enumerate((("repvgg", 16), ("depthwise", 16), ("dynamic", None))):
    tf.keras.utils.set_random_seed(seed)
    inp = tf.keras.Input((spatial, spatial, 8))
    if name == "repvgg":
        y = L.Dense(5)(L.GlobalAveragePooling2D()(repvgg(repvgg(repvgg(inp, 8, 1), 16, 2), 16, 1)))
    elif name == "depthwise":
        y = mobileone_dw(mobileone_dw(L.Conv2D(8, 1)(inp), 1), 2)
    else:
        y = repvgg(repvgg(inp, 8, 1), 16, 2)
    model = tf.keras.Model(inp, y)
    spec = (tf.TensorSpec((None, spatial, spatial, 8), tf.float32, name="x"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    onnx.save(proto, os.path.join(out_dir, name + ".onnx"))
    rng = np.random.default_rng(seed)
    feeds = {str(s): rng.standard_normal((2, s, s, 8)).astype(np.float32) for s in ((16,) if spatial else (16, 12))}
    outputs = {f"y{k}": model(v, training=False).numpy() for k, v in feeds.items()}
    np.savez(os.path.join(out_dir, name + ".npz"), **{f"x{k}": v for k, v in feeds.items()}, **outputs)
'''


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = tmp_path_factory.mktemp("tf2onnx")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", KERAS, str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _check(exports, name: str):
    path = exports / f"{name}.onnx"
    proto = onnx.load(str(path))
    fused, report = reparam.onnx.fuse(path, report=True)
    onnx.checker.check_model(fused, full_check=True)
    assert io_signature(fused) == io_signature(proto)
    data = np.load(exports / f"{name}.npz")
    for key in data.files:
        if not key.startswith("x"):
            continue
        x, expected = data[key], data["y" + key[1:]]
        got = session(fused).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
        assert max_rel_error(proto, fused, {"x": x}) < 2e-5
    return proto, fused, report


def test_keras_repvgg_collapses_every_block_to_one_conv(exports):
    proto, fused, report = _check(exports, "repvgg")
    assert ops(fused)["Conv"] == 3 and "Mul" not in ops(fused), report.format()
    assert ops(proto)["Conv"] == 6
    assert len(report.fixed_size_regions) == 1  # the stride-2 block, fused at 16x16 only
    assert report.transposes_shared == 1  # the first block's identity branch sat before the Transpose


def test_keras_depthwise_branches_collapse(exports):
    _, fused, report = _check(exports, "depthwise")
    assert ops(fused)["Conv"] == 3, report.format()  # the 1x1 stem and one conv per block


def test_keras_dynamic_spatial_size_keeps_the_rule_for_every_size(exports):
    """Spatial size unknown: the stride-1 block still collapses; the stride-2 "same" block cannot be proven
    for every size, so it stays (and the result is exact at 16x16 and at 12x12)."""
    proto, fused, report = _check(exports, "dynamic")
    assert not report.fixed_size_regions
    assert ops(fused)["Conv"] < ops(proto)["Conv"], report.format()
