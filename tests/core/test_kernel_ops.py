"""pad_kernel, regroup, avgpool_to_conv and pad_to_conv: same function, different conv; bias_through."""

from __future__ import annotations

from unittest import mock

import numpy as np
from core_helpers import ALL_DTYPES, FAST, check_fused, min_len
from hypothesis import given
from hypothesis import strategies as st

from reparam.core import AvgPool, Conv, Pad, avgpool_to_conv, conv_algebra, pad_kernel, pad_to_conv, regroup
from reparam.testing import reference as ref
from reparam.testing import strategies as rs


def _inputs(data, conv, extra=4):
    sizes = tuple(min_len([conv], i) + data.draw(st.integers(0, extra)) for i in range(conv.ndim))
    return data.draw(rs.inputs((2, conv.in_channels, *sizes)), label="x")


@FAST
@given(data=st.data(), dtype=st.sampled_from(ALL_DTYPES))
def test_pad_kernel_any_size_with_offset(data, dtype):
    """Non-square, even and odd kernels grown by any amount at any offset: same outputs, bigger padding."""
    conv = data.draw(rs.convs(ndim=data.draw(st.integers(1, 3)), dtype=dtype), label="conv")
    grow = data.draw(st.tuples(*[st.integers(0, 3)] * conv.ndim), label="grow")
    offset = tuple(data.draw(st.integers(0, gr)) for gr in grow)
    big = tuple(k + gr for k, gr in zip(conv.kernel_size, grow))
    padded = pad_kernel(conv, big, offset)
    assert padded.kernel_size == big and padded.dtype == conv.dtype
    assert padded.padding_mode == conv.padding_mode and padded.stride == conv.stride
    for i, ((b, e), (b0, e0)) in enumerate(zip(padded.padding, conv.padding)):
        d = conv.dilation[i]
        assert (b, e) == (b0 + offset[i] * d, e0 + (grow[i] - offset[i]) * d)
    # the weights are copied, not recomputed: bit-exact in every dtype
    inner = tuple(slice(o, o + k) for o, k in zip(offset, conv.kernel_size))
    assert np.array_equal(np.asarray(padded.weight)[(slice(None), slice(None), *inner)], conv.weight)
    # sizes valid for the grown padding (reflect needs pad < size); the original conv reads the same cells
    check_fused(padded, [[conv]], _inputs(data, padded))


@FAST
@given(data=st.data())
def test_pad_kernel_centered_default(data):
    conv = data.draw(rs.convs(ndim=2, padding_mode="zeros"), label="conv")
    half = data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2)), label="half")
    big = tuple(k + 2 * h for k, h in zip(conv.kernel_size, half))
    padded = pad_kernel(conv, big)
    assert padded.padding == tuple((b + h * d, e + h * d)
                                   for (b, e), h, d in zip(conv.padding, half, conv.dilation))
    check_fused(padded, [[conv]], _inputs(data, conv))


def test_pad_kernel_1x1_to_3x3_is_repvgg_style():
    conv = Conv(np.arange(6.0).reshape(3, 2, 1, 1), np.ones(3))
    p = pad_kernel(conv, (3, 3))
    assert p.padding == ((1, 1), (1, 1)) and np.array_equal(p.weight[:, :, 1, 1], conv.weight[:, :, 0, 0])
    assert np.count_nonzero(p.weight[:, :, [0, 2]]) == 0 and np.array_equal(p.bias, conv.bias)
    even = pad_kernel(conv, (2, 4), (1, 2))  # even target: the offset says where the taps go
    assert even.padding == ((1, 0), (2, 1)) and even.weight[0, 0, 1, 2] == conv.weight[0, 0, 0, 0]


@FAST
@given(data=st.data())
def test_regroup_to_any_divisor(data):
    g = data.draw(st.sampled_from([2, 3, 4, 6]), label="groups")
    conv = data.draw(rs.convs(groups=g, ndim=data.draw(st.integers(0, 2))), label="conv")
    target = data.draw(st.sampled_from([d for d in range(1, g + 1) if g % d == 0]), label="target")
    dense = regroup(conv, target)
    assert dense.groups == target and dense.weight.shape[1] == conv.in_channels // target
    assert np.count_nonzero(dense.weight) == np.count_nonzero(conv.weight)  # block-diagonal, nothing new
    check_fused(dense, [[conv]], _inputs(data, conv))


@st.composite
def pools(draw, nd):
    k = draw(st.tuples(*[st.integers(1, 3)] * nd))
    s = draw(st.tuples(*[st.integers(1, 3)] * nd))
    pads = tuple((draw(st.integers(0, ki // 2)), draw(st.integers(0, ki // 2))) for ki in k)
    override = draw(st.sampled_from([None, None, 2, 5]))
    # count_include_pad=False is exact when nothing is padded or the divisor is overridden
    include = draw(st.booleans()) or (override is None and any(p for pair in pads for p in pair))
    return AvgPool(k, s, pads, count_include_pad=include, divisor_override=override)


@FAST
@given(data=st.data())
def test_avgpool_to_conv(data):
    nd = data.draw(st.integers(1, 3), label="ndim")
    pool = data.draw(pools(nd), label="pool")
    c = data.draw(st.integers(1, 4), label="channels")
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    conv = avgpool_to_conv(pool, c, dtype=dtype)
    assert conv.groups == c and conv.dtype == dtype and conv.stride == pool.stride
    x = _inputs(data, conv)
    check_fused(conv, [[pool]], x, dtype)


def test_avgpool_legal_without_count_include_pad_when_unpadded_or_overridden():
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 5))
    for pool in (AvgPool((2, 3), count_include_pad=False),
                 AvgPool((3, 3), (1, 2), ((1, 1), (0, 1)), count_include_pad=False, divisor_override=4)):
        conv = avgpool_to_conv(pool, 2, dtype=np.float64)
        np.testing.assert_allclose(ref.run_conv(conv, x), ref.avg_pool(x, pool), rtol=1e-12, atol=1e-12)


@FAST
@given(data=st.data(), mode=st.sampled_from(["zeros", "constant", "reflect", "replicate", "circular"]))
def test_pad_to_conv(data, mode):
    nd = data.draw(st.integers(1, 3), label="ndim")
    pads = data.draw(st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * nd), label="pads")
    op = Pad(pads, mode)
    conv = pad_to_conv(op, 3, dtype=np.float32)
    assert conv.is_pointwise and conv.padding == pads and conv.dtype == np.float32
    assert conv.padding_mode == ("zeros" if mode == "constant" else mode)
    x = _inputs(data, conv)
    assert np.array_equal(ref.run_conv(conv, x), ref.pad(x, op))


@FAST
@given(data=st.data(), dtype=st.sampled_from(ALL_DTYPES), block=st.sampled_from([1, 7, 64, 262144]))
def test_bias_through_is_the_conv_of_a_constant_input(data, dtype, block):
    """A conv's output for an input holding one constant per channel, away from padding, is what the direct
    numpy convolution of that constant image gives, in every dtype, group count and block size."""
    nd = data.draw(st.integers(0, 3), label="ndim")
    groups = data.draw(st.integers(1, 4), label="groups")
    og, per = data.draw(st.integers(1, 5), label="og"), data.draw(st.integers(1, 5), label="per")
    kernel = data.draw(st.tuples(*[st.integers(1, 3)] * nd), label="kernel")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    weight = rng.standard_normal((groups * og, per, *kernel)).astype(dtype)
    bias = rng.standard_normal(groups * per)
    image = np.broadcast_to(bias.reshape((1, -1) + (1,) * nd), (1, groups * per, *kernel))
    expected = ref.conv_nd(image, weight, groups=groups).reshape(-1)
    with mock.patch.object(conv_algebra, "_CAST_BLOCK", block):
        got = conv_algebra.bias_through(weight, bias, groups)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
