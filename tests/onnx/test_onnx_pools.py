"""A zero Pad in front of a MaxPool: folded into the pool's padding only where that is exact (ONNX Runtime on the
unfused graph is the reference; the inputs are standard normal, so an unsound fold of a Pad of negative
values shows up as a wrong output)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_testlib import Builder, fuse_checked, ops

C = 3


def _pad_pool(before: str | None, pads: list[int], kernel: int = 2, stride: int = 1, ceil_mode: int = 0,
              pool_pads: list[int] | None = None, clip_min: float = 0.0, size: int = 7, opset: int = 17):
    b = Builder()
    x = "x"
    if before == "Relu":
        x = b.node("Relu", [x])
    elif before == "Clip":
        x = b.node("Clip", [x, b.const(np.float32(clip_min)), b.const(np.float32(6.0))])
    p = b.node("Pad", [x, b.const(np.array([0, 0, *pads[:2], 0, 0, *pads[2:]], np.int64))], mode="constant")
    y = b.node("MaxPool", [p], kernel_shape=[kernel, kernel], strides=[stride, stride], ceil_mode=ceil_mode,
               pads=pool_pads or [0, 0, 0, 0])
    return b.model([("x", [1, C, size, size])], [(y, None)], opset=opset)


@pytest.mark.parametrize("before", ["Relu", "Clip"])
def test_zero_pad_of_non_negative_values_folds_into_max_pool(before):
    fused, report = fuse_checked(_pad_pool(before, [0, 0, 1, 1]))  # timm HGNetV2's stem: F.pad(x, (0, 1, 0, 1))
    assert "Pad" not in ops(fused)
    assert report.pads_into_pools == 1
    assert "folded into the MaxPool" in report.format()
    pool = next(n for n in fused.graph.node if n.op_type == "MaxPool")
    assert list(next(a for a in pool.attribute if a.name == "pads").ints) == [0, 0, 1, 1]


def test_pool_padding_is_added_to():
    fused, _ = fuse_checked(_pad_pool("Relu", [1, 0, 0, 1], kernel=3, pool_pads=[0, 1, 1, 0]))
    assert "Pad" not in ops(fused)


@pytest.mark.parametrize("case", [
    dict(before=None, pads=[0, 0, 1, 1]),  # negative values: a zero cell can win where -inf never does
    dict(before="Clip", pads=[0, 0, 1, 1], clip_min=-1.0),  # Clip down to -1: values below the pad's 0
    dict(before="Relu", pads=[0, 0, 2, 2], kernel=2),  # a window wholly in the padding: 0 there, -inf folded
    dict(before="Relu", pads=[0, 0, 1, 1], stride=2, ceil_mode=1, size=6),  # ceil_mode at stride 2
])
def test_pad_stays_where_the_fold_would_not_be_exact(case):
    fused, report = fuse_checked(_pad_pool(**case))
    assert ops(fused)["Pad"] == 1
    assert report.pads_into_pools == 0


def test_pad_with_other_readers_stays_for_them():
    b = Builder()
    r = b.node("Relu", ["x"])
    p = b.node("Pad", [r, b.const(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64))], mode="constant")
    y1 = b.node("MaxPool", [p], kernel_shape=[2, 2], strides=[1, 1])
    y2 = b.node("Sigmoid", [p])
    fused, report = fuse_checked(b.model([("x", [1, C, 6, 6])], [(y1, None), (y2, None)]))
    assert ops(fused)["Pad"] == 1 and report.pads_into_pools == 1


@settings(max_examples=60, deadline=None)
@given(before=st.sampled_from([None, "Relu"]), pads=st.lists(st.integers(0, 2), min_size=4, max_size=4),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), ceil_mode=st.integers(0, 1),
       size=st.integers(4, 7))
def test_any_pad_pool_pair_stays_exact(before, pads, kernel, stride, ceil_mode, size):
    """Whatever the geometry, the result equals the unfused graph in ONNX Runtime; folds happen only after a Relu."""
    if size + min(pads[0] + pads[2], pads[1] + pads[3]) < kernel:
        return  # no output window at all
    _, report = fuse_checked(_pad_pool(before, pads, kernel, stride, ceil_mode, size=size))
    if before is None:
        assert report.pads_into_pools == 0
