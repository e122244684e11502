"""Branch sums at fixed spatial sizes: ``sum_convs(convs, sizes)`` and the planner's ``spatial`` hint.

Where the input size is fixed, branches whose windows do not align for every size may still give equal
output sizes (TensorFlow "same" padding at stride 2: a 3x3 with pads (0, 1) beside an unpadded 1x1). Whatever
the rule accepts at a size must be exact at that size (checked with the float64 reference), and without
sizes the rule is unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
from core_helpers import check_fused, examples
from hypothesis import event, given, note
from hypothesis import strategies as st

from reparam.core import Add, BatchNorm, Conv, LinearGraph, NotFusable, plan, sum_convs
from reparam.testing import reference as ref
from reparam.testing import strategies as rs


@st.composite
def branches_and_size(draw):
    """2-3 zero-padded convs with shared channels and stride but independent kernels, pads and dilations
    (reaches usually differ), and an input size at which every branch has at least one output."""
    nd = draw(st.integers(1, 2), label="ndim")
    cin, cout = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.tuples(*[st.integers(1, 3)] * nd))
    convs = [draw(rs.convs(cin, cout, nd, stride=stride, groups=1, padding_mode="zeros", max_kernel=4,
                           max_padding=3)) for _ in range(draw(st.integers(2, 3)))]
    sizes = []
    for i in range(nd):
        need = max(max(1, c.dilation[i] * (c.kernel_size[i] - 1) + 1 - sum(c.padding[i])) for c in convs)
        sizes.append(need + draw(st.integers(0, 6), label=f"size{i}"))
    return convs, tuple(sizes)


@examples(80)
@given(data=st.data())
def test_whatever_the_fixed_size_rule_accepts_is_exact_at_that_size(data):
    convs, sizes = data.draw(branches_and_size(), label="branches")
    try:
        fused = sum_convs(convs, sizes)
    except NotFusable as err:
        event("refused")
        note(str(err))
        outs = {ref.run_conv(c, np.zeros((1, convs[0].in_channels, *sizes))).shape for c in convs}
        if "at input size" in str(err):
            assert len(outs) > 1  # refused only where the output sizes really differ
        return
    event("accepted")
    x = data.draw(rs.inputs((1, convs[0].in_channels, *sizes)), label="x")
    assert len({ref.run_conv(c, x).shape for c in convs}) == 1
    check_fused(fused, [[c] for c in convs], x)


def test_tensorflow_same_padding_at_stride_2():
    rng = np.random.default_rng(0)
    k3 = Conv(rng.standard_normal((4, 4, 3, 3)), rng.standard_normal(4), stride=2, padding=((0, 1), (0, 1)))
    k1 = Conv(rng.standard_normal((4, 4, 1, 1)), rng.standard_normal(4), stride=2)
    with pytest.raises(NotFusable, match="for some input sizes"):
        sum_convs([k3, k1])  # unchanged without sizes
    fused = sum_convs([k3, k1], (16, 16))
    assert fused.kernel_size == (3, 3) and fused.padding == ((0, 1), (0, 1))
    x = rng.standard_normal((2, 4, 16, 16))
    check_fused(fused, [[k3], [k1]], x)
    k2 = Conv(rng.standard_normal((4, 4, 2, 2)), stride=2)
    padded = Conv(k3.weight, stride=2, padding=1)
    check_fused(sum_convs([padded, k2], (8, 8)), [[padded], [k2]], rng.standard_normal((1, 4, 8, 8)))
    with pytest.raises(NotFusable, match=r"at input size 9 \(\[4, 5\]"):
        sum_convs([padded, k2], (9, 9))  # 5 vs 4 outputs


def _block(spatial):
    """x -> (conv3 pads (0,1) s2 -> BN) + (conv1 s2 -> BN) -> relu, with ``spatial`` on the input."""
    rng = np.random.default_rng(1)

    def bn():
        return BatchNorm(rng.standard_normal(4), rng.uniform(0.5, 2, 4), rng.standard_normal(4),
                         rng.standard_normal(4))

    g = LinearGraph()
    g.input("x", 4, 2, spatial=spatial)
    g.add("c3", Conv(rng.standard_normal((4, 4, 3, 3)), stride=2, padding=((0, 1), (0, 1))), ["x"])
    g.add("b3", bn(), ["c3"])
    g.add("c1", Conv(rng.standard_normal((4, 4, 1, 1)), stride=2), ["x"])
    g.add("b1", bn(), ["c1"])
    g.add("sum", Add(), ["b3", "b1"])
    g.add("relu", None, ["sum"])
    g.mark_output("relu")
    return g


def test_planner_uses_fixed_sizes_and_says_so():
    p = plan(_block((16, 16)))
    (region,) = p.regions
    assert region.nodes == ["c3", "b3", "c1", "b1", "sum"] and not p.refusals
    assert p.sized == {"sum"}
    (term,) = region.terms
    x = np.random.default_rng(2).standard_normal((1, 4, 16, 16))
    g = _block((16, 16))
    expected = sum(ref.run_op(g.nodes[b].op, ref.run_conv(g.nodes[c].op, x)) for c, b in (("c3", "b3"), ("c1", "b1")))
    np.testing.assert_allclose(ref.run_conv(term.conv, x), expected, rtol=1e-10, atol=1e-10)


def test_planner_without_sizes_keeps_the_rule_for_every_size():
    p = plan(_block(None))
    assert p.sized == set()
    assert any("windows do not align" in r.reason for r in p.refusals)
    assert not any(r.exit == "sum" and len(r.terms) == 1 for r in p.regions)
