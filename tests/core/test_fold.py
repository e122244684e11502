"""fold_bn, fold_bn_transpose, identity_conv and affine_to_conv against the unfused reference."""

from __future__ import annotations

import numpy as np
import pytest
from core_helpers import ALL_DTYPES, FAST, HALF_DTYPES, SLOW, abs_op, assert_close, check_fused, f64
from hypothesis import given
from hypothesis import strategies as st

from reparam.core import (
    Affine,
    BatchNorm,
    Conv,
    ConvTranspose,
    NotFusable,
    affine_to_conv,
    fold_bn,
    fold_bn_transpose,
    identity_conv,
)
from reparam.testing import reference as ref
from reparam.testing import strategies as rs

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

dtypes = st.sampled_from(ALL_DTYPES)


def _fold_bn_case(data, dtype, ndim=None):
    conv = data.draw(rs.convs(ndim=ndim, dtype=dtype), label="conv")
    norm = data.draw(st.one_of(rs.batch_norms(conv.out_channels), rs.affines(conv.out_channels)), label="bn")
    x = data.draw(rs.conv_inputs(conv, max_size=7), label="x")
    try:
        fused = fold_bn(conv, norm)
    except NotFusable as err:
        # the only legal refusal for a valid BN: the exact fused weights do not fit the dtype
        assert np.dtype(dtype) != np.float64 and "overflows" in str(err), err
        aff = norm.to_affine() if isinstance(norm, BatchNorm) else norm
        s = aff.scale_for(conv.out_channels)
        w = f64(conv.weight) * s.reshape((-1,) + (1,) * (conv.weight.ndim - 1))
        b = conv.bias_or_zeros().astype(np.float64) * s + aff.shift_for(conv.out_channels)
        big = max(np.abs(w).max(), np.abs(b).max())
        assert big > float(np.finfo(np.float16).max if dtype == np.float16 else 3.3e38) * 0.999, big
        return
    assert fused.dtype == conv.dtype and fused.bias is not None and fused.bias.dtype == conv.dtype
    assert (fused.stride, fused.padding, fused.dilation, fused.groups, fused.padding_mode) == (
        conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    # the unfused chain is computed in float64 from the same (possibly low-precision) weights
    check_fused(fused, [[conv, norm]], x, dtype)


@FAST
@given(data=st.data(), dtype=dtypes)
def test_fold_bn_any_dims_groups_dtypes(data, dtype):
    _fold_bn_case(data, dtype)


@FAST
@given(data=st.data())
def test_fold_bn_linear_layer(data):
    """0 spatial dims: BN after a Linear layer (x @ W.T + b)."""
    _fold_bn_case(data, np.float64, ndim=0)


@pytest.mark.slow
@SLOW
@given(data=st.data(), dtype=dtypes, ndim=st.integers(0, 3))
def test_fold_bn_sweep(data, dtype, ndim):
    _fold_bn_case(data, dtype, ndim)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_fold_bn_extreme_statistics(dtype):
    """Tiny variance, large and negative gamma, eps 0, a dead channel: still exact to the dtype's eps."""
    rng = np.random.default_rng(1)
    conv = Conv(rng.standard_normal((4, 3, 3, 2)).astype(dtype), None, padding=((1, 0), (0, 1)))
    bn = BatchNorm(running_mean=np.array([0.5, -3.0, 100.0, 0.0]), running_var=np.array([1e-6, 1e-3, 4.0, 1.0]),
                   gamma=np.array([-2.0, 0.0, 50.0, -1e-2]), beta=np.array([1.0, -1.0, 0.0, 3.0]),
                   eps=0.0 if dtype != np.float16 else 1e-2)
    x = rng.standard_normal((2, 3, 5, 4))
    fused = fold_bn(conv, bn)
    check_fused(fused, [[conv, bn]], x, dtype)
    assert np.all(f64(fused.weight)[1] == 0)  # gamma 0 kills the channel exactly


@FAST
@given(data=st.data())
def test_fold_bn_transpose_group_aware(data):
    nd = data.draw(st.integers(1, 3), label="ndim")
    g = data.draw(st.sampled_from([1, 2, 3]), label="groups")
    cin, og = g * data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    dims = st.tuples(*[st.integers(1, 3)] * nd)
    k, s, d = data.draw(dims), data.draw(dims), data.draw(dims)
    rng = data.draw(rs.rngs())
    bias = rng.standard_normal(g * og) if data.draw(st.booleans()) else None
    ct = ConvTranspose(rng.standard_normal((cin, og, *k)), bias, stride=s, padding=((0, 0),) * nd,
                       output_padding=(0,) * nd, dilation=d, groups=g)
    norm = data.draw(st.one_of(rs.batch_norms(g * og), rs.affines(g * og)), label="bn")
    x = rng.standard_normal((2, cin, *data.draw(st.tuples(*[st.integers(1, 4)] * nd))))
    fused = fold_bn_transpose(ct, norm)
    assert fused.weight.shape == ct.weight.shape and fused.groups == g
    expected = ref.run_op(norm, ref.run_op(ct, x))
    mag = ref.run_op(abs_op(norm), ref.run_op(abs_op(ct), np.abs(x)))
    assert_close(ref.run_op(fused, x), expected, mag)


def test_fold_bn_transpose_scales_per_group_output_slice():
    """groups=2: weight [in, out/g, k]; output channel o of group j lives at weight[j*in/g:, o % (out/g)]."""
    w = np.ones((4, 3, 1))
    fused = fold_bn_transpose(ConvTranspose(w, None, groups=2), Affine(scale=np.arange(1.0, 7.0)))
    assert np.array_equal(fused.weight[:2, :, 0], [[1, 2, 3]] * 2)
    assert np.array_equal(fused.weight[2:, :, 0], [[4, 5, 6]] * 2)


@FAST
@given(data=st.data())
def test_identity_and_affine_conv_any_kernel_and_groups(data):
    c = data.draw(st.sampled_from([1, 2, 4, 6]), label="channels")
    nd = data.draw(st.integers(0, 3), label="ndim")
    k = data.draw(st.tuples(*[st.sampled_from([1, 3, 5])] * nd), label="kernel")
    groups = data.draw(st.sampled_from([None] + [g for g in (1, 2, 3, c) if c % g == 0]), label="groups")
    dtype = data.draw(dtypes, label="dtype")
    x = data.draw(rs.inputs((2, c, *data.draw(st.tuples(*[st.integers(1, 5)] * nd)))), label="x")
    ident = identity_conv(c, nd, k, groups=groups, dtype=dtype)
    assert ident.dtype == dtype and ident.kernel_size == k
    assert ident.groups == (groups or c)
    assert np.array_equal(ref.run_conv(ident, x), x)  # exact in every dtype: weights are 0/1
    norm = data.draw(st.one_of(rs.batch_norms(c), rs.affines(c)), label="norm")
    try:
        conv = affine_to_conv(norm, c, nd, k, groups=groups, dtype=dtype)
    except NotFusable as err:
        assert np.dtype(dtype) in HALF_DTYPES and "overflows" in str(err)
        return
    check_fused(conv, [[norm]], x, dtype)


def test_identity_conv_dense_is_block_diagonal_eye():
    w = identity_conv(4, 2, 3, groups=1, dtype=np.float64).weight
    assert w.shape == (4, 4, 3, 3)
    assert np.array_equal(w[:, :, 1, 1], np.eye(4)) and np.count_nonzero(w) == 4
    w = identity_conv(4, 1, 1, groups=2, dtype=np.float64).weight
    assert np.array_equal(w[:, :, 0], [[1, 0], [0, 1], [1, 0], [0, 1]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_fold_bn_is_the_float64_product_rounded_once(dtype):
    """The BN fold multiplies in float64 straight into the kernel's dtype: the same bits as computing the
    whole kernel in float64 and casting it."""
    rng = np.random.default_rng(3)
    conv = Conv(rng.standard_normal((6, 4, 3, 3)).astype(dtype), rng.standard_normal(6).astype(dtype), padding=1)
    bn = BatchNorm(rng.standard_normal(6), rng.random(6) + 0.1, rng.standard_normal(6), rng.standard_normal(6), 1e-5)
    aff = bn.to_affine()
    s, t = aff.scale_for(6), aff.shift_for(6)
    fused = fold_bn(conv, bn)
    want_w = (conv.weight.astype(np.float64) * s[:, None, None, None]).astype(dtype)
    want_b = (conv.bias.astype(np.float64) * s + t).astype(dtype)
    np.testing.assert_array_equal(fused.weight, want_w)
    np.testing.assert_array_equal(fused.bias, want_b)
    assert fused.weight.dtype == fused.bias.dtype == dtype
    out = np.full(conv.weight.shape, np.nan, dtype)  # a frontend's fresh memory: the kernel lands there
    into = fold_bn(conv, bn, out=out)
    assert into.weight is out
    np.testing.assert_array_equal(out, want_w)
    np.testing.assert_array_equal(into.bias, want_b)
    assert (into.stride, into.padding, into.groups) == (conv.stride, conv.padding, conv.groups)


def test_fold_bn_overflow_is_refused_with_the_reason():
    conv = Conv(np.full((2, 1, 1, 1), 100.0, np.float16), None)
    bn = BatchNorm(np.zeros(2), np.ones(2), np.array([1.0, 1e4]), np.zeros(2), 0.0)
    with pytest.raises(NotFusable, match="overflows float16"):
        fold_bn(conv, bn)
