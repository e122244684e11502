"""Deferred kernels (``KernelSum``): evaluated straight into a dtype, they equal the scaled branches run
one by one with the reference convolution, and each element is rounded once from its float64 value."""

from __future__ import annotations

import numpy as np
import pytest
from core_helpers import FAST, check_fused
from hypothesis import given
from hypothesis import strategies as st
from test_sum_compose import _sizes, aligned_branches

from reparam.core import Affine, Conv, NotFusable, kernel_sum
from reparam.core.kernel_sum import KernelSum, sum_kernels
from reparam.testing import strategies as rs

NATIVE = (np.float64, np.float32, np.float16)


def _deferred(data, convs):
    """The scaled sum of ``convs`` (bias-free, some with their inputs scaled first) as a KernelSum, with the op
    chains it stands for."""
    kernels, branches = [], []
    for c in convs:
        plain = c.with_(bias=None)
        k, ops = KernelSum.of(plain), [plain]
        if data.draw(st.booleans(), label="input scale"):  # a per-channel map before the conv (a BN folded forward)
            s = data.draw(rs.inputs((c.in_channels,), np.float64, scale=2.0), label="input scale")
            k, ops = k.scaled_inputs(s), [Affine(scale=s), plain]
        for _ in range(data.draw(st.integers(0, 2), label="scales")):  # BNs folded one after another
            s = data.draw(rs.inputs((c.out_channels,), np.float64, scale=2.0), label="scale")
            k, ops = k.scaled(s), ops + [Affine(scale=s)]
        kernels.append(k)
        branches.append(ops)
    return sum_kernels(kernels), branches


@FAST
@given(data=st.data(), dtype=st.sampled_from(NATIVE))
def test_deferred_sum_equals_the_branches(data, dtype):
    convs = data.draw(aligned_branches(data.draw(st.sampled_from(NATIVE), label="weights")), label="convs")
    kernel, branches = _deferred(data, convs)
    fused = kernel.to_conv(dtype)
    assert fused.dtype == dtype and fused.weight.shape == kernel.geometry.weight.shape
    for sizes in _sizes(data, [[c] for c in convs], convs[0].ndim, count=2):
        x = data.draw(rs.inputs((1, convs[0].in_channels, *sizes)), label="x")
        check_fused(fused, branches, x, dtype)


@FAST
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float16]))
def test_rounded_once_from_float64(data, dtype):
    """Blocked evaluation in ``dtype`` is the float64 kernel cast once (at most one unit in the last place
    apart, where summing the parts in another order moves the float64 value across a rounding boundary)."""
    convs = data.draw(aligned_branches(np.float32), label="convs")
    kernel, _ = _deferred(data, convs)
    wide = kernel.evaluate(np.float64)
    narrow = kernel.evaluate(dtype)
    with np.errstate(over="ignore"):
        np.testing.assert_array_max_ulp(narrow, wide.astype(dtype), maxulp=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("side", ["output", "input", "grouped input"])
def test_a_single_scaled_kernel_is_exactly_the_float64_product_rounded(side, dtype):
    """One part with one scale (a BN folded into the conv before it, or forward into the one after it) is
    computed by one numpy product: the float64 product rounded once, against a direct numpy product, also
    for the first rows alone."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70, 40, 3, 3)).astype(np.float32)  # several blocks of output channels
    if side == "output":
        s = rng.standard_normal(70) * 1e-3
        kernel, factor = KernelSum.of(Conv(w, padding=1)).scaled(s), s[:, None, None, None]
    elif side == "input":
        s = rng.standard_normal(40) * 1e-3
        kernel, factor = KernelSum.of(Conv(w, padding=1)).scaled_inputs(s), s[None, :, None, None]
    else:  # 2 groups: outputs 0-34 read inputs 0-39, outputs 35-69 inputs 40-79
        s = rng.standard_normal(80) * 1e-3
        kernel = KernelSum.of(Conv(w, padding=1, groups=2)).scaled_inputs(s)
        factor = s.reshape(2, 1, 40).repeat(35, axis=1).reshape(70, 40)[:, :, None, None]
    want = w.astype(np.float64) * factor
    np.testing.assert_array_equal(kernel.evaluate(dtype), want.astype(dtype))
    np.testing.assert_array_equal(kernel.evaluate_rows(0, 9), want[:9])


def test_writes_into_out_even_when_not_contiguous():
    rng = np.random.default_rng(1)
    a = KernelSum.of(Conv(rng.standard_normal((6, 4, 3, 3)), padding=1))
    b = KernelSum.of(Conv(rng.standard_normal((6, 4, 1, 1))))
    k = sum_kernels([a, b.scaled(np.full(6, 0.5))])
    want = k.evaluate(np.float32)
    flat = np.empty((6, 4, 3, 3), np.float32)
    assert k.evaluate(np.float32, out=flat) is flat
    np.testing.assert_array_equal(flat, want)
    strided = np.empty((4, 6, 3, 3), np.float32).transpose(1, 0, 2, 3)
    assert k.evaluate(np.float32, out=strided) is strided
    np.testing.assert_array_equal(strided, want)
    with pytest.raises(ValueError, match="expected"):
        k.evaluate(np.float32, out=np.empty((6, 4, 3, 3), np.float64))


def test_evaluation_never_writes_the_parts():
    w = np.ones((4, 4, 3, 3), np.float32)
    w.flags.writeable = False  # a frontend's view of the model's own tensor
    k = sum_kernels([KernelSum.of(Conv(w, padding=1)).scaled(np.full(4, 2.0)),
                     KernelSum.of(Conv(np.ones((4, 1, 1, 1)), groups=4))])
    out = k.evaluate(np.float32)
    assert out[0, 0, 1, 1] == 3.0 and out[0, 1, 1, 1] == 2.0 and np.all(w == 1)


@pytest.mark.parametrize("case, pattern", [
    ("overflow", "overflows float16"),
    ("nan", "non-finite"),
])
def test_non_finite_results_are_refused_with_the_reason(case, pattern):
    w = np.ones((3, 3, 3, 3), np.float16)
    if case == "nan":
        w = w.copy()
        w[2, 1, 0, 0] = np.nan
    k = KernelSum.of(Conv(w, padding=1)).scaled(np.array([1.0, 1.0, 1e6]))
    with np.errstate(over="ignore"), pytest.raises(NotFusable, match=pattern):
        k.to_conv(np.float16)



@FAST
@given(data=st.data(), threads=st.integers(2, 3))
def test_threads_compute_the_same_kernel(data, threads):
    convs = data.draw(aligned_branches(np.float32), label="convs")
    kernel, _ = _deferred(data, convs)
    one = kernel.to_conv(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel_sum, "_THREADED", 1)  # split even these small kernels
        many = kernel.to_conv(np.float32, threads=threads)
    np.testing.assert_array_equal(many.weight, one.weight)


@FAST
@given(data=st.data())
def test_first_rows_equal_the_whole_kernel_rows(data):
    """``evaluate_rows`` (the identity test's cheap first look) computes exactly those rows of the kernel."""
    convs = data.draw(aligned_branches(data.draw(st.sampled_from(NATIVE), label="weights")), label="convs")
    kernel, _ = _deferred(data, convs)
    n = kernel.geometry.out_channels
    r0 = data.draw(st.integers(0, n - 1), label="r0")
    r1 = data.draw(st.integers(r0 + 1, n), label="r1")
    np.testing.assert_array_equal(kernel.evaluate_rows(r0, r1), kernel.evaluate()[r0:r1])


def test_identity_needs_every_row_not_only_the_first():
    from reparam.core.regions import Term, _is_identity

    eye = np.eye(5).reshape(5, 5, 1, 1)
    assert _is_identity(Term("x", Conv(eye.copy())))
    late = eye.copy()
    late[4, 0, 0, 0] = 1e-9  # the first row is e0, a later one is not
    assert not _is_identity(Term("x", Conv(late)))
    scaled = KernelSum.of(Conv(eye.copy())).scaled(np.array([1.0, 1.0, 1.0, 1.0, 2.0]))
    assert not _is_identity(Term("x", scaled))
    assert _is_identity(Term("x", KernelSum.of(Conv(eye * 2)).scaled(np.full(5, 0.5))))


def test_an_input_scale_of_a_grouped_kernel_scales_each_group_s_own_inputs():
    """Output channel o of a grouped conv reads input channels of its group only: the deferred input scale is
    the float64 product with the per-group channel scale, rounded once (against a direct numpy product)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 2, 3, 3)).astype(np.float32)  # 3 groups: 4 outputs, 2 inputs each
    s_in, s_out = rng.standard_normal(6), rng.standard_normal(12)
    got = KernelSum.of(Conv(w, padding=1, groups=3)).scaled_inputs(s_in).scaled(s_out).evaluate(np.float32)
    group_inputs = s_in.reshape(3, 1, 2).repeat(4, axis=1).reshape(12, 2)
    want = (w.astype(np.float64) * group_inputs[:, :, None, None] * s_out[:, None, None, None]).astype(np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", NATIVE)
def test_finiteness_check_finds_every_nan_and_infinity(dtype):
    """``all_finite`` against ``np.isfinite``: one bad value anywhere, values whose squares overflow (the fast
    sum-of-squares check is then not finite, yet every value is), and a non-contiguous view."""
    from reparam.core.precision import all_finite

    rng = np.random.default_rng(4)
    a = rng.standard_normal((9, 4, 3, 3)).astype(dtype)
    assert all_finite(a) and all_finite(a[:, ::2]) and all_finite(a[:0])
    for bad in (np.nan, np.inf, -np.inf):
        for at in [(0, 0, 0, 0), (8, 3, 2, 2), tuple(rng.integers(0, 3, 4))]:
            b = a.copy()
            b[at] = bad
            assert not all_finite(b) and not all_finite(b[:, :, :, :])
    huge = np.full((5, 2), np.finfo(dtype).max / 2, dtype)
    assert all_finite(huge) == bool(np.isfinite(huge).all())
    huge[2, 1] = np.inf
    assert not all_finite(huge)
