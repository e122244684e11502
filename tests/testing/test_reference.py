"""The numpy reference (reparam.testing.reference) against torch, and the strategies' own contracts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from reparam.core.types import (
    PADDING_MODES,
    Add,
    AvgPool,
    Conv,
    ConvTranspose,
    Identity,
    Pad,
)
from reparam.testing import reference as ref
from reparam.testing import strategies as rs

torch = pytest.importorskip("torch")
F = torch.nn.functional

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
TORCH_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def t(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def assert_close(actual: np.ndarray, expected, rtol: float = 1e-10) -> None:
    """rtol 1e-10, with an absolute floor scaled to the result so cancellation to ~0 does not fail."""
    expected = expected.detach().numpy() if hasattr(expected, "detach") else np.asarray(expected)
    assert actual.dtype == np.float64
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def torch_pad_arg(pairs) -> tuple[int, ...]:
    """Per-side pairs (first dim first) -> F.pad's flat tuple (last dim first)."""
    return tuple(v for b, e in reversed(tuple(pairs)) for v in (b, e))


def torch_conv(conv: Conv, x: np.ndarray):
    xt = F.pad(t(x), torch_pad_arg(conv.padding), mode=TORCH_PAD_MODE[conv.padding_mode])
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv.ndim]
    bias = None if conv.bias is None else t(conv.bias)
    return fn(xt, t(conv.weight), bias, stride=conv.stride, dilation=conv.dilation, groups=conv.groups)


# ----------------------------------------------------------------------------------------- conv


@SETTINGS
@given(data=st.data(), ndim=st.integers(1, 3))
def test_conv_matches_torch_every_mode_asymmetric_padding(data, ndim):
    conv = data.draw(rs.convs(ndim=ndim), label="conv")
    x = data.draw(rs.conv_inputs(conv), label="x")
    assert_close(ref.run_conv(conv, x), torch_conv(conv, x))


@SETTINGS
@given(data=st.data(), ndim=st.integers(1, 3), mode=st.sampled_from(PADDING_MODES))
def test_conv_matches_torch_module_padding_mode(data, ndim, mode):
    """Symmetric padding through torch's own ``padding_mode`` (not our F.pad translation)."""
    p = data.draw(st.tuples(*[st.integers(0, 2)] * ndim), label="padding")
    conv = data.draw(rs.convs(ndim=ndim, padding=p, padding_mode=mode), label="conv")
    x = data.draw(rs.conv_inputs(conv), label="x")
    cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[ndim]
    mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=p,
              dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=mode,
              dtype=torch.float64)
    with torch.no_grad():
        mod.weight.copy_(t(conv.weight))
        if conv.bias is not None:
            mod.bias.copy_(t(conv.bias))
        expected = mod(t(x))
    assert_close(ref.conv_nd(x, conv.weight, conv.bias, conv.stride, p, conv.dilation, conv.groups, mode),
                 expected)


@SETTINGS
@given(conv=rs.convs(ndim=0), n=st.integers(1, 3), seed=rs.seeds())
def test_linear_is_matmul_and_matches_torch(conv, n, seed):
    x = np.random.default_rng(seed).standard_normal((n, conv.in_channels))
    y = ref.run_conv(conv, x)
    assert y.shape == (n, conv.out_channels)
    # 0-dim grouped == 1x1 conv1d on a length-1 signal; groups=1 == F.linear == x @ W.T + b
    bias = None if conv.bias is None else t(conv.bias)
    expected = F.conv1d(t(x)[..., None], t(conv.weight)[..., None], bias, groups=conv.groups)[..., 0]
    assert_close(y, expected)
    if conv.groups == 1:
        assert_close(y, F.linear(t(x), t(conv.weight), bias))
        assert_close(y, x @ conv.weight.T + conv.bias_or_zeros())


def test_conv_padding_argument_forms_agree():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 4, 7, 6)), rng.standard_normal((6, 2, 3, 2))
    a = ref.conv_nd(x, w, groups=2, padding=1)
    assert_close(ref.conv_nd(x, w, groups=2, padding=(1, 1)), a)
    assert_close(ref.conv_nd(x, w, groups=2, padding=((1, 1), (1, 1))), a)
    assert_close(ref.conv_nd(x, w, groups=2, padding=((0, 2), (1, 0)), padding_mode="circular"),
                 F.conv2d(F.pad(t(x), (1, 0, 0, 2), mode="circular"), t(w), groups=2))


def test_conv_rejects_bad_shapes():
    x = np.zeros((1, 4, 5))
    with pytest.raises(ValueError):
        ref.conv_nd(x, np.zeros((2, 3, 3)))  # channels do not fit groups
    with pytest.raises(ValueError):
        ref.conv_nd(x, np.zeros((2, 4, 7)))  # kernel larger than input
    with pytest.raises(ValueError):
        ref.conv_nd(x, np.zeros((2, 4, 3)), padding=5, padding_mode="reflect")


# ------------------------------------------------------------------------------- conv transpose


@st.composite
def conv_transpose_cases(draw):
    nd = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3]))
    cin, og = g * draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dims = st.tuples(*[st.integers(1, 3)] * nd)
    k, s, d = draw(dims), draw(dims), draw(dims)
    op = tuple(draw(st.integers(0, max(si, di) - 1)) for si, di in zip(s, d))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    # the output size (L-1)*s - 2p + d*(k-1) + op + 1 must be positive
    sizes = tuple(
        draw(st.integers(max(1, -(-(2 * p - di * (ki - 1) - o) // si) + 1), 5))
        for p, di, ki, o, si in zip(pads, d, k, op, s)
    )
    rng = draw(rs.rngs())
    weight = rng.standard_normal((cin, og, *k))
    bias = rng.standard_normal(g * og) if draw(st.booleans()) else None
    x = rng.standard_normal((draw(st.integers(1, 2)), cin, *sizes))
    return x, weight, bias, s, pads, op, d, g


@SETTINGS
@given(case=conv_transpose_cases())
def test_conv_transpose_matches_torch(case):
    x, w, b, s, p, op, d, g = case
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[w.ndim - 2]
    expected = fn(t(x), t(w), None if b is None else t(b), stride=s, padding=p, output_padding=op,
                  groups=g, dilation=d)
    assert_close(ref.conv_transpose_nd(x, w, b, s, p, op, d, g), expected)
    op_ = ConvTranspose(w, b, stride=s, padding=tuple((v, v) for v in p), output_padding=op,
                        dilation=d, groups=g)
    assert_close(ref.run_op(op_, x), expected)


@SETTINGS
@given(case=conv_transpose_cases(), data=st.data())
def test_conv_transpose_asymmetric_padding_is_a_crop_of_the_full_output(case, data):
    x, w, b, s, _, op, d, g = case
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[w.ndim - 2]
    full = fn(t(x), t(w), None if b is None else t(b), stride=s, output_padding=op, groups=g, dilation=d)
    pairs = tuple(data.draw(st.tuples(st.integers(0, n // 2), st.integers(0, (n - 1) // 2)))
                  for n in full.shape[2:])
    crop = tuple(slice(bb, n - e) for (bb, e), n in zip(pairs, full.shape[2:]))
    assert_close(ref.conv_transpose_nd(x, w, b, s, pairs, op, d, g), full[(slice(None), slice(None), *crop)])


# ------------------------------------------------------------------------------ per-channel ops


@SETTINGS
@given(data=st.data(), ndim=st.integers(0, 3))
def test_batch_norm_matches_torch(data, ndim):
    bn = data.draw(rs.batch_norms(), label="bn")
    shape = (data.draw(st.integers(1, 2)), bn.channels, *data.draw(st.tuples(*[st.integers(1, 4)] * ndim)))
    x = data.draw(rs.inputs(shape), label="x")
    opt = [None if v is None else t(v) for v in (bn.gamma, bn.beta)]
    expected = F.batch_norm(t(x), t(bn.running_mean), t(bn.running_var), *opt, training=False, eps=bn.eps)
    assert_close(ref.batch_norm(x, bn), expected)
    assert_close(ref.run_op(bn, x), expected)


@SETTINGS
@given(data=st.data(), ndim=st.integers(0, 3))
def test_affine_matches_torch(data, ndim):
    aff = data.draw(rs.affines(), label="affine")
    c = aff.scale.shape[0] if aff.scale is not None and aff.scale.shape[0] > 1 else None
    c = c or (aff.shift.shape[0] if aff.shift is not None and aff.shift.shape[0] > 1 else None)
    c = c or data.draw(st.integers(1, 5))
    x = data.draw(rs.inputs((2, c, *(3,) * ndim)), label="x")
    # scale * x + shift == batch_norm with mean 0, var 1, eps 0
    scale, shift = aff.scale_for(c), aff.shift_for(c)
    expected = F.batch_norm(t(x), torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64),
                            t(scale), t(shift), training=False, eps=0.0)
    assert_close(ref.affine(x, aff), expected)
    assert_close(ref.run_op(aff, x), expected)


# ------------------------------------------------------------------------------------- pooling


@st.composite
def pool_cases(draw):
    nd = draw(st.integers(1, 3))
    k = draw(st.tuples(*[st.integers(1, 3)] * nd))
    s = draw(st.tuples(*[st.integers(1, 3)] * nd))
    p = tuple(draw(st.integers(0, ki // 2)) for ki in k)
    # torch's avg_pool3d (unlike 1d/2d) refuses inputs smaller than the kernel even when padded
    sizes = tuple(draw(st.integers(ki if nd == 3 else max(1, ki - 2 * pi), 7)) for ki, pi in zip(k, p))
    divisor = draw(st.none() | st.integers(1, 5)) if nd > 1 else None  # avg_pool1d has no override
    pool = AvgPool(k, s, tuple((v, v) for v in p), count_include_pad=draw(st.booleans()),
                   ceil_mode=draw(st.booleans()), divisor_override=divisor)
    x = draw(rs.inputs((draw(st.integers(1, 2)), draw(st.integers(1, 3)), *sizes)))
    return pool, x, p


@SETTINGS
@given(case=pool_cases())
def test_avg_pool_matches_torch(case):
    pool, x, p = case
    nd = x.ndim - 2
    kw = dict(stride=pool.stride, padding=p, ceil_mode=pool.ceil_mode,
              count_include_pad=pool.count_include_pad)
    if nd > 1:
        kw["divisor_override"] = pool.divisor_override
    expected = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd](t(x), pool.kernel_size, **kw)
    assert_close(ref.avg_pool(x, pool), expected)
    assert_close(ref.run_op(pool, x), expected)


@SETTINGS
@given(data=st.data(), nd=st.integers(1, 3))
def test_avg_pool_asymmetric_padding_counts_pad_cells(data, nd):
    k = data.draw(st.tuples(*[st.integers(1, 3)] * nd))
    s = data.draw(st.tuples(*[st.integers(1, 2)] * nd))
    pairs = data.draw(st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * nd))
    x = data.draw(rs.inputs((1, 2, *(data.draw(st.integers(3, 6)) for _ in range(nd)))))
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    expected = fn(F.pad(t(x), torch_pad_arg(pairs)), k, stride=s)
    assert_close(ref.avg_pool(x, AvgPool(k, s, pairs, count_include_pad=True)), expected)


# ----------------------------------------------------------------------------------------- pad


@SETTINGS
@given(data=st.data(), nd=st.integers(1, 3), mode=st.sampled_from(PADDING_MODES))
def test_pad_matches_torch(data, nd, mode):
    sizes = data.draw(st.tuples(*[st.integers(1, 5)] * nd))
    lo = -1 if mode == "zeros" else 0  # negative constant padding crops

    def side(n):
        hi = {"reflect": n - 1, "circular": n}.get(mode, 3)
        return st.integers(max(lo, -(n // 2)), hi)

    pairs = tuple(data.draw(st.tuples(side(n), side(n))) for n in sizes)
    value = data.draw(st.sampled_from([0.0, 1.5])) if mode == "zeros" else 0.0
    x = data.draw(rs.inputs((2, 3, *sizes)))
    kw = {"value": value} if mode == "zeros" else {}
    expected = F.pad(t(x), torch_pad_arg(pairs), mode=TORCH_PAD_MODE[mode], **kw)
    assert_close(ref.pad(x, Pad(pairs, mode=mode, value=value)), expected)
    assert_close(ref.run_op(Pad(pairs, mode=mode, value=value), x), expected)


def test_pad_rejects_what_torch_rejects():
    x = np.zeros((1, 1, 3))
    with pytest.raises(ValueError):
        ref.pad_nd(x, ((3, 0),), "reflect")
    with pytest.raises(ValueError):
        ref.pad_nd(x, ((4, 0),), "circular")
    with pytest.raises(ValueError):
        ref.pad_nd(x, ((1, 0),), "bogus")


# ------------------------------------------------------------------------------------- run_op


def test_run_op_identity_add_and_unknown():
    x = np.arange(6.0).reshape(1, 2, 3).astype(np.float32)
    y = ref.run_op(Identity(), x)
    assert y.dtype == np.float64 and np.array_equal(y, x) and y is not x
    assert np.array_equal(ref.run_op(Add(), [x, 2 * x, x]), 4 * x.astype(np.float64))
    with pytest.raises(TypeError):
        ref.run_op(object(), x)


def test_run_op_computes_in_float64_from_low_precision_weights():
    rng = np.random.default_rng(1)
    conv = Conv(rng.standard_normal((2, 3, 3)).astype(np.float16), padding=1)
    x = rng.standard_normal((1, 3, 5)).astype(np.float32)
    assert_close(ref.run_op(conv, x), F.conv1d(t(x), t(conv.weight.astype(np.float64)), padding=1))


# --------------------------------------------------------------------------------- strategies


@SETTINGS
@given(data=st.data())
def test_convs_respect_fixed_arguments(data):
    cin = data.draw(st.sampled_from([2, 4, 6, 8]))
    cout = data.draw(st.sampled_from([2, 4, 8]))
    conv = data.draw(rs.convs(in_channels=cin, out_channels=cout, ndim=2, kernel_size=3, stride=(1, 2),
                              bias=True, dtype=np.float32))
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (cin, cout, (3, 3), (1, 2))
    assert conv.bias is not None and conv.weight.dtype == np.float32 and conv.bias.dtype == np.float32
    assert cin % conv.groups == 0 and cout % conv.groups == 0
    g = data.draw(st.sampled_from([1, 2, 4]))
    conv = data.draw(rs.convs(groups=g, padding=((0, 1), (2, 0)), padding_mode="reflect", ndim=2))
    assert conv.groups == g and conv.padding == ((0, 1), (2, 0)) and conv.padding_mode == "reflect"
    assert conv.in_channels <= rs.MAX_CHANNELS and conv.out_channels <= rs.MAX_CHANNELS
    sizes = data.draw(rs.spatial_sizes(conv))
    assert sizes[0] >= 2 and sizes[1] >= 3  # reflect padding p needs size > p
    assert data.draw(rs.convs(ndim=st.just(1), kernel_size=st.just(2))).kernel_size == (2,)


@SETTINGS
@given(params=rs.conv_params())
def test_conv_params_are_consistent(params):
    conv = Conv(np.zeros(params.weight_shape), stride=params.stride, padding=params.padding,
                dilation=params.dilation, groups=params.groups, padding_mode=params.padding_mode)
    assert conv.ndim == params.ndim and conv.in_channels == params.in_channels
    assert len(params.padding) == len(params.stride) == len(params.dilation) == params.ndim
    assert max(params.in_channels, params.out_channels) <= rs.MAX_CHANNELS


@pytest.mark.parametrize(
    "strategy",
    [rs.conv_params(2, in_channels=3, groups=2), rs.conv_params(2, kernel_size=(3, 3, 3))],
    ids=["groups", "kernel-rank"],
)
def test_conv_params_reject_contradictions(strategy):
    @settings(max_examples=1, database=None)
    @given(strategy)
    def draw_one(_):
        pass

    with pytest.raises(InvalidArgument):
        draw_one()


@SETTINGS
@given(bn=rs.batch_norms(channels=st.integers(1, 8)))
def test_batch_norms_are_valid(bn):
    assert np.all(bn.running_var + bn.eps > 0)
    assert np.all(np.isfinite(bn.running_var)) and np.all(bn.running_var >= 1e-6 * (1 - 1e-12))
    if bn.gamma is not None:
        assert np.all(np.abs(bn.gamma) <= 1e3)


FIND = settings(max_examples=2000, deadline=None, database=None)


@pytest.mark.parametrize(
    "condition",
    [
        pytest.param(lambda bn: bn.running_var.min() < 1e-5, id="tiny-var"),
        pytest.param(lambda bn: bn.gamma is not None and np.abs(bn.gamma).max() > 100, id="large-gamma"),
        pytest.param(lambda bn: bn.gamma is not None and bn.gamma.min() < 0, id="negative-gamma"),
        pytest.param(lambda bn: bn.eps != 1e-5, id="eps-variant"),
    ],
)
def test_batch_norms_reach_stress_regimes(condition):
    find(rs.batch_norms(), condition, settings=FIND)


@pytest.mark.parametrize(
    "condition",
    [
        pytest.param(lambda c: c.groups == c.in_channels == c.out_channels > 1, id="depthwise"),
        pytest.param(lambda c: c.ndim == 0, id="linear"),
        pytest.param(lambda c: any(b != e for b, e in c.padding), id="asymmetric-padding"),
        pytest.param(lambda c: c.padding_mode == "circular" and c.is_padded, id="circular"),
        pytest.param(lambda c: max(c.dilation, default=1) > 1 and max(c.stride, default=1) > 1,
                     id="dil+stride"),
    ],
)
def test_convs_reach_interesting_cases(condition):
    find(rs.convs(), condition, settings=FIND)


@SETTINGS
@given(aff=rs.affines(channels=4), shape=st.tuples(st.integers(1, 3), st.integers(1, 4)), data=st.data())
def test_affines_and_inputs(aff, shape, data):
    assert aff.scale is None or aff.scale.shape in ((1,), (4,))
    assert aff.shift is None or aff.shift.shape in ((1,), (4,))
    x = data.draw(rs.inputs(shape, dtype=np.float32))
    assert x.shape == shape and x.dtype == np.float32
