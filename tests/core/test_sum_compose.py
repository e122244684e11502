"""sum_convs and compose: legal-by-construction cases are accepted and exact, and *whatever* the algebra
accepts among arbitrary (unfiltered) convs is exact on inputs of several sizes, strides dividing or not."""

from __future__ import annotations

from math import gcd

import numpy as np
import pytest
from core_helpers import ALL_DTYPES, FAST, SLOW, check_fused, examples, min_len, pipeline_len
from hypothesis import event, given, note
from hypothesis import strategies as st

from reparam.core import PADDING_MODES, Conv, NotFusable, compose, sum_convs
from reparam.testing import reference as ref
from reparam.testing import strategies as rs

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
NONZERO_MODES = ("reflect", "replicate", "circular")


def _sizes(data, convs_per_dim_pipelines, nd, count=3, extra=5):
    """``count`` input sizes per dim from the smallest valid one upward (all residues of strides <= 4)."""
    lo = [max(min_len(p, i) for p in convs_per_dim_pipelines) for i in range(nd)]
    return [tuple(lo[i] + data.draw(st.integers(0, extra), label=f"size{k}.{i}") for i in range(nd))
            for k in range(count)]


def _check_sum(fused, convs, data, dtype=np.float64):
    nd, cin = convs[0].ndim, convs[0].in_channels
    evaluated = 0
    for sizes in _sizes(data, [[c] for c in convs], nd):
        x = data.draw(rs.inputs((data.draw(st.integers(1, 2)), cin, *sizes)), label="x")
        shapes = {ref.run_conv(c, x).shape for c in convs}
        assert len(shapes) == 1, f"accepted a sum of branches with different output shapes {shapes}"
        check_fused(fused, [[c] for c in convs], x, dtype)
        evaluated += 1
    return evaluated


# ------------------------------------------------------------------------------------------- sums

@st.composite
def aligned_branches(draw, dtype=np.float64):
    """2-4 convs whose sum is legal by construction: same stride and channels, equal reach per dim,
    padded branches share one mode (unpadded ones have any), any kernels, dilations, groups, biases."""
    nd = draw(st.integers(1, 3), label="ndim")
    g0 = draw(st.sampled_from([1, 2, 4]))
    cin, cout = g0 * draw(st.integers(1, 2)), g0 * draw(st.integers(1, 2))
    stride = draw(st.tuples(*[st.integers(1, 2)] * nd))
    reach = draw(st.tuples(*[st.integers(-2, 0)] * nd))
    mode = draw(st.sampled_from(PADDING_MODES))
    convs = []
    for _ in range(draw(st.integers(2, 4))):
        dil = draw(st.tuples(*[st.integers(1, 2)] * nd))
        kern = tuple(max(draw(st.integers(1, 4)), 1 - (r // d)) for r, d in zip(reach, dil))
        pads = []
        for r, d, k in zip(reach, dil, kern):
            total = r + d * (k - 1)
            b = draw(st.integers(0, total))
            pads.append((b, total - b))
        padded = any(p for pair in pads for p in pair)
        g = draw(st.sampled_from([v for v in (1, 2, 4) if g0 % v == 0]))
        convs.append(draw(rs.convs(cin, cout, nd, kern, g, stride, dil, tuple(pads), dtype=dtype,
                                   padding_mode=mode if padded else draw(st.sampled_from(PADDING_MODES)))))
    return convs


@FAST
@given(data=st.data(), dtype=st.sampled_from(ALL_DTYPES))
def test_sum_of_aligned_branches_is_exact(data, dtype):
    convs = data.draw(aligned_branches(dtype), label="convs")
    fused = sum_convs(convs)
    assert fused.dtype == dtype and fused.stride == convs[0].stride
    assert fused.groups == gcd(*[c.groups for c in convs])
    padded_modes = {c.padding_mode for c in convs if c.is_padded}
    assert fused.padding_mode == (padded_modes.pop() if padded_modes else "zeros")
    assert (fused.bias is None) == all(c.bias is None for c in convs)
    assert _check_sum(fused, convs, data, dtype) == 3


@st.composite
def arbitrary_branches(draw):
    """2-3 convs drawn independently except that channels and stride are *usually* shared: not filtered."""
    nd = draw(st.integers(1, 2), label="ndim")
    base = draw(rs.conv_params(nd, max_channels=4, max_kernel=4), label="base")
    convs = []
    for _ in range(draw(st.integers(2, 3))):
        same = draw(st.integers(0, 7)) != 5  # usually, not always
        p = draw(rs.conv_params(
            nd, in_channels=base.in_channels if same else None, out_channels=base.out_channels if same else None,
            stride=base.stride if draw(st.integers(0, 7)) != 5 else None,
            max_channels=4, max_kernel=4, max_padding=3))
        if p.in_channels == base.in_channels and draw(st.integers(0, 3)) != 2:  # align reach
            pads = []
            for i in range(nd):
                total = sum(base.padding[i]) - base.dilation[i] * (base.kernel_size[i] - 1) \
                    + p.dilation[i] * (p.kernel_size[i] - 1)
                pads.append(p.padding[i] if total < 0 else (min(p.padding[i][0], total),
                                                           total - min(p.padding[i][0], total)))
            p = rs.ConvParams(**{**p.__dict__, "padding": tuple(pads)})
        convs.append(draw(rs.convs(params=p)))
    return convs


def _accepted_sum_is_exact(data):
    convs = data.draw(arbitrary_branches(), label="convs")
    try:
        fused = sum_convs(convs)
    except NotFusable as err:
        event(f"refused: {str(err).split(':')[1].split('(')[0].strip()}")
        return
    event("accepted")
    note(f"fused: {fused.describe()}")
    _check_sum(fused, convs, data)


@examples(60)
@given(data=st.data())
def test_whatever_sum_convs_accepts_is_exact(data):
    _accepted_sum_is_exact(data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_whatever_sum_convs_accepts_is_exact_sweep(data):
    _accepted_sum_is_exact(data)


def test_sum_repvgg_acnet_dilated_and_grouped():
    rng = np.random.default_rng(0)
    w = rng.standard_normal
    branches = [
        Conv(w((4, 4, 3, 3)), w(4), padding=1),                             # 3x3
        Conv(w((4, 4, 1, 1)), w(4)),                                        # 1x1
        Conv(w((4, 4, 1, 3)), None, padding=((0, 0), (1, 1))),              # ACNet 1x3
        Conv(w((4, 4, 3, 1)), None, padding=((1, 1), (0, 0))),              # ACNet 3x1
        Conv(w((4, 1, 3, 3)), None, padding=2, dilation=2, groups=4),       # dilated depthwise
        Conv(w((4, 2, 2, 2)), None, padding=((1, 0), (0, 1)), groups=2),    # even, asymmetric, grouped
    ]
    fused = sum_convs(branches)
    assert fused.kernel_size == (5, 5) and fused.padding == ((2, 2), (2, 2)) and fused.groups == 1
    assert fused.dilation == (1, 1)
    x = rng.standard_normal((2, 4, 7, 6))
    check_fused(fused, [[c] for c in branches], x)


def test_sum_dilated_branches_keep_the_common_dilation():
    rng = np.random.default_rng(1)
    a = Conv(rng.standard_normal((2, 2, 3)), padding=2, dilation=2)
    b = Conv(rng.standard_normal((2, 2, 1)))
    fused = sum_convs([a, b])
    assert fused.dilation == (2,) and fused.kernel_size == (3,) and fused.padding == ((2, 2),)
    check_fused(fused, [[a], [b]], rng.standard_normal((1, 2, 9)))


def test_sum_same_nonzero_mode_and_unpadded_branch():
    """A reflect 3x3 with a 1x1 that reads no padding (in any mode) and a reflect 5x5: one reflect conv."""
    rng = np.random.default_rng(2)
    convs = [Conv(rng.standard_normal((3, 3, 3, 3)), padding=1, padding_mode="reflect"),
             Conv(rng.standard_normal((3, 3, 1, 1)), padding_mode="zeros"),
             Conv(rng.standard_normal((3, 3, 5, 5)), padding=2, padding_mode="reflect")]
    fused = sum_convs(convs)
    assert fused.padding_mode == "reflect" and fused.padding == ((2, 2), (2, 2))
    check_fused(fused, [[c] for c in convs], rng.standard_normal((1, 3, 5, 6)))


def test_sum_linear_layers_of_any_groups():
    rng = np.random.default_rng(4)
    convs = [Conv(rng.standard_normal((4, 2)), rng.standard_normal(4), groups=2),
             Conv(rng.standard_normal((4, 4))), Conv(rng.standard_normal((4, 1)), groups=4)]
    fused = sum_convs(convs)
    assert fused.groups == 1 and fused.weight.shape == (4, 4)
    check_fused(fused, [[c] for c in convs], rng.standard_normal((3, 4)))


def test_sum_single_and_empty():
    c = Conv(np.ones((2, 2, 3)))
    assert np.array_equal(sum_convs([c]).weight, c.weight)
    with pytest.raises(NotFusable, match="nothing to sum"):
        sum_convs([])


# ---------------------------------------------------------------------------------------- compose

@st.composite
def composable_pairs(draw, dtype=np.float64):
    """(a, b) that compose legally by construction, one case per border regime."""
    nd = draw(st.integers(1, 3), label="ndim")
    case = draw(st.sampled_from(["second_unpadded", "second_zero_padded", "second_mode_padded"]), label="case")
    one = (1,) * nd
    pads = st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * nd).filter(
        lambda p: any(v for pair in p for v in pair))
    if case == "second_unpadded":
        a = draw(rs.convs(ndim=nd, max_channels=4, dtype=dtype, max_kernel=4))
        b = draw(rs.convs(a.out_channels, ndim=nd, padding=0, max_channels=4, dtype=dtype, max_kernel=4))
    elif case == "second_zero_padded":
        a = draw(rs.convs(ndim=nd, kernel_size=one, bias=False, padding_mode="zeros", max_channels=4, dtype=dtype))
        if draw(st.booleans()):
            a = a.with_(bias=np.zeros(a.out_channels, dtype))
        b = draw(rs.convs(a.out_channels, ndim=nd, padding=pads, padding_mode="zeros", max_channels=4,
                          dtype=dtype, max_kernel=4))
    else:
        a = draw(rs.convs(ndim=nd, kernel_size=one, stride=one, padding=0, max_channels=4, dtype=dtype))
        b = draw(rs.convs(a.out_channels, ndim=nd, padding=pads, padding_mode=st.sampled_from(NONZERO_MODES),
                          max_channels=4, dtype=dtype, max_kernel=4))
    return a, b


def _check_compose(fused, a, b, data, dtype=np.float64):
    nd = a.ndim
    count = 0
    for sizes in _sizes(data, [[a, b]], nd):
        x = data.draw(rs.inputs((data.draw(st.integers(1, 2)), a.in_channels, *sizes)), label="x")
        check_fused(fused, [[a, b]], x, dtype)
        count += 1
    return count


@FAST
@given(data=st.data(), dtype=st.sampled_from(ALL_DTYPES))
def test_compose_legal_pairs_are_exact(data, dtype):
    a, b = data.draw(composable_pairs(dtype), label="pair")
    fused = compose(a, b)
    assert fused.dtype == dtype and fused.in_channels == a.in_channels and fused.out_channels == b.out_channels
    assert fused.stride == tuple(x * y for x, y in zip(a.stride, b.stride))
    assert _check_compose(fused, a, b, data, dtype) == 3


@st.composite
def arbitrary_pairs(draw):
    nd = draw(st.integers(1, 2), label="ndim")
    a = draw(rs.convs(ndim=nd, max_channels=4, max_kernel=3, kernel_size=(1,) * nd if draw(st.booleans()) else None))
    if draw(st.booleans()):
        a = a.with_(bias=None)
    if draw(st.booleans()):
        a = a.with_(padding=0)
    cin = a.out_channels if draw(st.integers(0, 5)) else None
    b = draw(rs.convs(cin, ndim=nd, max_channels=4, max_kernel=3))
    return a, b


def _accepted_compose_is_exact(data):
    a, b = data.draw(arbitrary_pairs(), label="pair")
    try:
        fused = compose(a, b)
    except NotFusable as err:
        event(f"refused: {str(err).split(' but ')[-1].split(' (')[0].split(';')[0][:40]}")
        return
    event("accepted")
    note(f"fused: {fused.describe()}")
    # pipelines valid at some size exist as soon as the chain is well-defined; skip when none is small
    if all(pipeline_len([a, b], i, 30) is not None for i in range(a.ndim)):
        _check_compose(fused, a, b, data)


@examples(60)
@given(data=st.data())
def test_whatever_compose_accepts_is_exact(data):
    _accepted_compose_is_exact(data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_whatever_compose_accepts_is_exact_sweep(data):
    _accepted_compose_is_exact(data)


@FAST
@given(data=st.data(), dtype=st.sampled_from(ALL_DTYPES))
def test_compose_per_channel_first(data, dtype):
    """A per-channel first conv (a BN or affine as a depthwise 1x1) scales the second conv's inputs:
    any second conv (groups, stride, dilation, padding mode) when it is bias-free or the second is not
    zero-padded."""
    nd = data.draw(st.integers(0, 3), label="ndim")
    b = data.draw(rs.convs(ndim=nd, max_channels=6, dtype=dtype), label="second")
    c = b.in_channels
    rng = data.draw(rs.rngs())
    scale = data.draw(st.sampled_from(["ones", "random"]), label="scale")
    w = np.ones((c, 1, *(1,) * nd)) if scale == "ones" else rng.standard_normal((c, 1, *(1,) * nd))
    biased = not (b.is_padded and b.padding_mode == "zeros") and data.draw(st.booleans(), label="bias")
    a = Conv(w.astype(dtype), rng.standard_normal(c).astype(dtype) if biased else None, groups=c)
    fused = compose(a, b)
    assert (fused.kernel_size, fused.stride, fused.padding, fused.dilation, fused.groups) == (
        b.kernel_size, b.stride, b.padding, b.dilation, b.groups)
    if nd == 0:
        check_fused(fused, [[a, b]], data.draw(rs.inputs((2, c)), label="x"), dtype)
    else:
        _check_compose(fused, a, b, data, dtype)


def _pair(ka, kb, seed=0, nd=2, **kw):
    rng = np.random.default_rng(seed)
    a = Conv(rng.standard_normal((3, 2, *(ka,) * nd)), kw.get("bias_a"), stride=kw.get("sa", 1),
             padding=kw.get("pa", 0), dilation=kw.get("da", 1))
    b = Conv(rng.standard_normal((4, 3, *(kb,) * nd)), rng.standard_normal(4), stride=kw.get("sb", 1),
             padding=kw.get("pb", 0), dilation=kw.get("db", 1), padding_mode=kw.get("mode", "zeros"))
    return a, b


@pytest.mark.parametrize(("name", "ka", "kb", "kw", "kernel", "stride", "pad", "dil"), [
    ("1x1 then padded 3x3", 1, 3, {"pb": 1}, 3, 1, 1, 1),
    ("3x3 then 1x1", 3, 1, {"pa": 1, "bias_a": np.ones(3)}, 3, 1, 1, 1),
    ("3x3 then 3x3 unpadded", 3, 3, {"bias_a": np.ones(3)}, 5, 1, 0, 1),
    ("strides compose", 3, 3, {"sa": 2, "sb": 2}, 7, 4, 0, 1),
    ("strided 1x1 dilates the second", 1, 3, {"sa": 2, "pb": 1}, 3, 2, 2, 2),
    ("dilations", 3, 3, {"da": 2, "db": 2}, 5, 1, 0, 2),
    ("mixed dilations", 3, 3, {"da": 2, "db": 1, "pa": 2}, 7, 1, 2, 1),
    ("1x1 then reflect 3x3", 1, 3, {"pb": 1, "mode": "reflect", "bias_a": np.ones(3)}, 3, 1, 1, 1),
])
def test_compose_named_cases(name, ka, kb, kw, kernel, stride, pad, dil):
    a, b = _pair(ka, kb, **kw)
    fused = compose(a, b)
    assert fused.kernel_size == (kernel,) * 2, name
    assert fused.stride == (stride,) * 2 and fused.padding == ((pad, pad),) * 2 and fused.dilation == (dil,) * 2
    rng = np.random.default_rng(5)
    for size in (11, 12, 13, 14):  # odd and even: strides do and do not divide
        check_fused(fused, [[a, b]], rng.standard_normal((2, 2, size, size - 1)))


def test_compose_linear_layers_and_groups():
    rng = np.random.default_rng(3)
    a = Conv(rng.standard_normal((6, 2)), rng.standard_normal(6), groups=2)   # grouped linear 4 -> 6
    b = Conv(rng.standard_normal((4, 3)), rng.standard_normal(4), groups=2)   # grouped linear 6 -> 4
    fused = compose(a, b)
    assert fused.groups == 2 and fused.weight.shape == (4, 2)
    check_fused(fused, [[a, b]], rng.standard_normal((3, 4)))
    dw = Conv(rng.standard_normal((4, 1, 3)), None, padding=1, groups=4)
    pw = Conv(rng.standard_normal((4, 2, 1)), groups=2)
    fused = compose(pw, dw)  # 1x1 grouped then padded depthwise: gcd(2, 4) = 2 groups
    assert fused.groups == 2
    check_fused(fused, [[pw, dw]], rng.standard_normal((1, 4, 6)))
