"""The region planner on small LinearGraphs, and chain / sum_branches / collapse built on it.

Every plan is checked by evaluating the rewritten graph (each region's exit = sum of its terms, applied to
its sources with the reference) against the unfused graph evaluated op by op with the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from core_helpers import FAST, SLOW, check_fused, check_plan, mul, out_len, relu
from hypothesis import event, given, note
from hypothesis import strategies as st

from reparam.core import (
    Add,
    Affine,
    AvgPool,
    BatchNorm,
    Conv,
    Identity,
    LinearGraph,
    NotFusable,
    Pad,
    chain,
    collapse,
    fold_bn,
    macs_per_output,
    plan,
    sum_branches,
)
from reparam.testing import strategies as rs

RNG = np.random.default_rng(1234)


def conv(cin, cout, k, nd=2, pad=None, groups=1, bias=True, **kw):
    """A conv with random weights; ``pad=None`` means 'same' padding for odd k."""
    pad = (k - 1) // 2 if pad is None else pad
    return Conv(RNG.standard_normal((cout, cin // groups, *(k,) * nd)), RNG.standard_normal(cout) if bias else None,
                padding=pad, groups=groups, **kw)


def bn(c, shift=True):
    mean = RNG.standard_normal(c) if shift else np.zeros(c)
    return BatchNorm(mean, RNG.uniform(0.5, 2, c), RNG.standard_normal(c), RNG.standard_normal(c) if shift else None)


def x_of(c, *spatial, n=2):
    return {"x": RNG.standard_normal((n, c, *spatial))}


def repvgg_graph(c=4):
    g = LinearGraph()
    g.input("x", c, 2)
    g.add("c3", conv(c, c, 3, bias=False), ["x"])
    g.add("b3", bn(c), ["c3"])
    g.add("c1", conv(c, c, 1, bias=False), ["x"])
    g.add("b1", bn(c), ["c1"])
    g.add("bid", bn(c), ["x"])
    g.add("sum", Add(), ["b3", "b1", "bid"])
    g.add("act", None, ["sum"], payload=relu)
    g.mark_output("act")
    return g


# ------------------------------------------------------------------------------------- unit graphs

def test_repvgg_block_is_one_region_one_conv():
    g = repvgg_graph()
    p = plan(g)
    assert p.refusals == []
    (r,) = p.regions
    assert r.exit == "sum" and r.nodes == ["c3", "b3", "c1", "b1", "bid", "sum"]
    (t,) = r.terms
    assert t.source == "x" and not t.identity and t.conv.kernel_size == (3, 3) and t.conv.bias is not None
    assert (r.ops_before, r.ops_after, r.worthwhile) == (6, 1, True)
    check_plan(g, p, x_of(4, 6, 5))


def test_conv_bn_linear_layer_chain():
    g = LinearGraph()
    g.input("x")
    g.add("fc", conv(6, 3, 1, nd=0), ["x"])
    g.add("bn", bn(3), ["fc"])
    g.mark_output("bn")
    p = plan(g)
    (r,) = p.regions
    assert r.nodes == ["fc", "bn"] and r.terms[0].conv.weight.shape == (3, 6)
    check_plan(g, p, {"x": RNG.standard_normal((4, 6))})


def test_multi_source_value_conv_of_h_plus_x():
    """y = bn(conv(relu(x))) + x: one region, two terms: a conv of h and the identity of x."""
    g = LinearGraph()
    g.input("x", 3, 2)
    g.add("h", None, ["x"], channels=3, ndim=2, payload=relu)
    g.add("c", conv(3, 3, 3), ["h"])
    g.add("b", bn(3), ["c"])
    g.add("y", Add(), ["b", "x"])
    g.mark_output("y")
    p = plan(g)
    (r,) = p.regions
    assert [(t.source, t.identity) for t in r.terms] == [("x", True), ("h", False)]
    assert r.ops_after == 2 and r.ops_before == 3
    check_plan(g, p, x_of(3, 5, 4))


def test_sum_of_sources_keeps_identity_terms_and_places_the_bias():
    """y = relu(x) + affine(x): the affine's shift must land on a term, which then is no identity."""
    g = LinearGraph()
    g.input("x", 2, 1)
    g.add("h", None, ["x"], channels=2, ndim=1, payload=relu)
    g.add("a", Affine(shift=np.array([1.0, -2.0])), ["x"])
    g.add("y", Add(), ["h", "a"])
    g.mark_output("y")
    (r,) = plan(g).regions  # by default the shift may not become a conv of its own
    assert r.blocked and "no conv" in r.blocked and not r.worthwhile
    p = plan(g, allow_costlier=True)
    (r,) = p.regions
    assert sum(not t.identity for t in r.terms) == 1
    check_plan(g, p, x_of(2, 5))
    g2 = LinearGraph()
    g2.input("x", 2, 1)
    g2.add("h", None, ["x"], channels=2, ndim=1, payload=relu)
    g2.add("y", Add(), ["h", "x"])
    g2.mark_output("y")
    (r,) = plan(g2).regions
    assert all(t.identity for t in r.terms) and not r.worthwhile


def test_bn_before_padded_conv_is_cut_with_a_reason():
    g = LinearGraph()
    g.input("x", 3, 2)
    g.add("bn", bn(3), ["x"])
    g.add("c", conv(3, 4, 3), ["bn"])
    g.mark_output("c")
    p = plan(g)
    (f,) = p.refusals
    assert f.node == "c" and "pads" in f.reason and "bias" in f.reason
    assert [(r.exit, r.nodes, r.terms[0].source) for r in p.regions] == [("bn", ["bn"], "x"), ("c", ["c"], "bn")]
    check_plan(g, p, x_of(3, 5, 5))
    # a BN with no shift (mean 0, beta 0) puts no bias under the padding: it folds
    g2 = LinearGraph()
    g2.input("x", 3, 2)
    g2.add("bn", bn(3, shift=False), ["x"])
    g2.add("c", conv(3, 4, 3), ["bn"])
    g2.mark_output("c")
    p2 = plan(g2)
    assert p2.refusals == [] and len(p2.regions) == 1
    check_plan(g2, p2, x_of(3, 5, 5))


def test_kxk_then_padded_kxk_is_cut():
    g = LinearGraph()
    g.input("x", 2, 1)
    g.add("a", conv(2, 2, 3, nd=1, pad=0, bias=False), ["x"])
    g.add("b", conv(2, 2, 3, nd=1), ["a"])
    g.mark_output("b")
    p = plan(g, allow_costlier=True)
    assert [f.node for f in p.refusals] == ["b"] and "the first has kernel" in p.refusals[0].reason
    check_plan(g, p, x_of(2, 9))


def test_cost_guard_refuses_and_allow_costlier_permits():
    """Depthwise 3x3 + dense 1x1 would become a dense 3x3 (costlier); 3x3 then 3x3 a 5x5."""
    c = 4
    g = LinearGraph()
    g.input("x", c, 2)
    g.add("dw", conv(c, c, 3, groups=c), ["x"])
    g.add("pw", conv(c, c, 1), ["x"])
    g.add("y", Add(), ["dw", "pw"])
    g.mark_output("y")
    p = plan(g)
    assert [f.node for f in p.refusals] == ["y"] and "allow_costlier" in p.refusals[0].reason
    assert {r.exit for r in p.regions} == {"dw", "pw", "y"}
    check_plan(g, p, x_of(c, 5, 5))
    p = plan(g, allow_costlier=True)
    assert p.refusals == [] and [r.exit for r in p.regions] == ["y"]
    check_plan(g, p, x_of(c, 5, 5))

    g = LinearGraph()
    g.input("x", c, 2)
    g.add("a", conv(c, c, 3, pad=0), ["x"])
    g.add("b", conv(c, c, 3, pad=0), ["a"])
    g.mark_output("b")
    p = plan(g)
    assert "composing would cost" in p.refusals[0].reason and len(p.regions) == 2
    check_plan(g, p, x_of(c, 7, 8))
    p = plan(g, allow_costlier=True)
    assert p.refusals == [] and p.regions[0].terms[0].conv.kernel_size == (5, 5)
    check_plan(g, p, x_of(c, 7, 8))


def test_cost_guard_is_per_region():
    """dw 3x3 + dense 1x1 alone would become a costlier dense 3x3, but followed by a 1x1 reducing to one
    channel the whole region collapses into a cheap 3x3 (c -> 1): accepted without any refusal."""
    c = 4
    g = LinearGraph()
    g.input("x", c, 2)
    g.add("dw", conv(c, c, 3, groups=c), ["x"])
    g.add("pw", conv(c, c, 1), ["x"])
    g.add("y", Add(), ["dw", "pw"])
    g.add("head", conv(c, 1, 1), ["y"])
    g.mark_output("head")
    p = plan(g)
    assert p.refusals == [] and [r.exit for r in p.regions] == ["head"]
    (t,) = p.regions[0].terms
    assert macs_per_output(t.conv) == 9 * c < 9 * c + c * c + c
    check_plan(g, p, x_of(c, 5, 6))


def test_bn_after_a_residual_sum_folds_into_the_next_conv():
    """InceptionNeXt's stage change: ``y = gamma * fc2(h) + x`` then BN then an unpadded 2x2/2 conv.  Composed
    through the sum, the BN's region would need a conv for ``x``'s path of its own (refused); planned again
    without folding into sums, the layer scale folds into fc2 and the BN into the 2x2 conv."""
    c = 4
    g = LinearGraph()
    g.input("x", c, 2)
    g.add("h", None, ["x"], channels=2 * c, ndim=2, payload=lambda vs: np.concatenate([relu(vs), vs[0]], 1))
    g.add("fc2", conv(2 * c, c, 1), ["h"])
    g.add("scale", Affine(scale=RNG.uniform(0.5, 2, c)), ["fc2"])
    g.add("y", Add(), ["scale", "x"])
    g.add("norm", bn(c), ["y"])
    g.add("down", conv(c, 2 * c, 2, pad=0, stride=2), ["norm"])
    g.mark_output("down")
    p = plan(g)
    applied = [r for r in p.regions if r.worthwhile]
    assert sorted(r.exit for r in applied) == ["down", "y"], p
    assert sum(r.convs_after for r in applied) == 2 and not [r for r in p.regions if r.blocked]
    check_plan(g, p, x_of(c, 6, 4))


def test_shared_value_and_outputs_are_materialized():
    g = LinearGraph()
    g.input("x", 3, 1)
    g.add("c", conv(3, 3, 3, nd=1), ["x"])
    g.add("b", bn(3), ["c"])                        # used twice: materialized
    g.add("h", None, ["b"], channels=3, ndim=1, payload=relu)
    g.add("a", Affine(scale=np.array([2.0])), ["b"])
    g.add("y", Add(), ["a", "h"])
    g.add("z", Identity(), ["y"])
    g.mark_output("z", "a")                         # "a" is read outside: materialized too
    p = plan(g)
    assert [r.exit for r in p.regions] == ["b", "a", "z"]
    check_plan(g, p, x_of(3, 6))


def test_refused_op_is_kept_and_the_rest_still_fuses():
    """An avgpool with ceil_mode cannot be a conv: it stays, and conv+bn on each side still fold."""
    g = LinearGraph()
    g.input("x", 2, 2)
    g.add("c1", conv(2, 2, 3), ["x"])
    g.add("b1", bn(2), ["c1"])
    g.add("pool", AvgPool((2, 2), ceil_mode=True), ["b1"])
    g.add("c2", conv(2, 3, 1), ["pool"])
    g.add("b2", bn(3), ["c2"])
    g.mark_output("b2")
    p = plan(g)
    assert any(f.node == "pool" and "ceil_mode" in f.reason for f in p.refusals)
    assert [r.exit for r in p.regions] == ["b1", "b2"]
    check_plan(g, p, x_of(2, 5, 7))


def test_pad_and_pool_nodes_fold():
    g = LinearGraph()
    g.input("x", 2, 2)
    g.add("pad", Pad(((1, 0), (2, 1)), "reflect"), ["x"])
    g.add("c", conv(2, 2, 3, pad=0), ["pad"])
    g.add("pool", AvgPool((3, 3), (1, 1), 1), ["c"])
    g.add("zp", Pad(((1, 0), (2, 1))), ["x"])
    g.add("c2", conv(2, 2, 3, pad=0, bias=False), ["zp"])
    g.add("y", Add(), ["pool", "c2"])
    g.mark_output("y")
    p = plan(g, allow_costlier=True)
    # the pool pads with zeros after a reflect-padded conv: refused and cut, the rest folds
    assert all("pads" in f.reason for f in p.refusals)
    check_plan(g, p, x_of(2, 6, 7))


def test_planner_refusal_reasons():
    g = LinearGraph()
    g.input("x")                                    # channel count unknown, first user is a BN
    g.add("bn", bn(3), ["x"])
    g.add("pad", Pad(((1, 1),)), ["bn"])            # 1-d pad on a 2-d value
    g.mark_output("pad")
    p = plan(g)
    assert any("channel count of 'x' is unknown" in f.reason for f in p.refusals)
    g = LinearGraph()
    g.input("x", 3, 2)
    g.add("pad", Pad(((1, 1),)), ["x"])
    g.mark_output("pad")
    assert "1 spatial dims, the value has 2" in plan(g).refusals[0].reason
    g = LinearGraph()
    g.input("x", 3, 2)
    g.input("y", 4, 2)
    g.add("s", Add(), ["x", "y"])
    g.mark_output("s")
    assert "different channels" in plan(g).refusals[0].reason


def test_collapse():
    g = repvgg_graph()
    (t,) = collapse(g, "sum")
    assert t.source == "x"
    with pytest.raises(NotFusable, match="not the exit"):
        collapse(g, "b3")
    g = LinearGraph()
    g.input("x", 3, 2)
    g.add("bn", bn(3), ["x"])
    g.add("c", conv(3, 4, 3), ["bn"])
    g.mark_output("c")
    with pytest.raises(NotFusable, match="bias"):
        collapse(g, "c")
    assert collapse(g, "bn")[0].source == "x"


def test_macs_per_output():
    assert macs_per_output(conv(4, 6, 3, groups=2)) == 6 * 2 * 9
    assert macs_per_output(conv(4, 6, 1, nd=0)) == 24


# ----------------------------------------------------------------------------- chain, sum_branches

def test_chain_matches_fold_bn_and_keeps_dtype():
    c = conv(3, 4, 3)
    b = bn(4)
    c32 = c.with_(weight=c.weight.astype(np.float32), bias=c.bias.astype(np.float32))
    fused = chain([c32, b])
    assert fused.dtype == np.float32
    np.testing.assert_allclose(fused.weight, fold_bn(c32, b).weight, rtol=1e-6)
    x = RNG.standard_normal((1, 3, 5, 5))
    check_fused(fused, [[c32, b]], x)
    assert chain([c32, b], dtype=np.float64).dtype == np.float64


def test_chain_bn_then_conv():
    b, c = bn(3), conv(3, 2, 3, pad=0)
    check_fused(chain([b, c], 3, 2), [[b, c]], RNG.standard_normal((2, 3, 6, 5)))
    with pytest.raises(NotFusable, match="bias"):
        chain([b, conv(3, 2, 3)], 3, 2)


def test_sum_branches_repvgg_dbb_and_identity():
    c = 4
    branches = [
        [conv(c, c, 3, bias=False), bn(c)],
        [conv(c, c, 1, bias=False), bn(c)],
        [conv(c, c, 1, bias=False, pad=0), bn(c, shift=False), conv(c, c, 3, bias=False), bn(c)],  # DBB 1x1-kxk
        [AvgPool((3, 3), (1, 1), 1), bn(c)],                                                         # DBB avg
        [bn(c)],
        [],                                                                                         # identity
    ]
    fused = sum_branches(branches)
    assert fused.dtype == np.float64 and fused.kernel_size == (3, 3) and fused.padding == ((1, 1),) * 2
    check_fused(fused, branches, RNG.standard_normal((2, c, 6, 7)))
    ident = sum_branches([[]], 3, 1)
    assert ident.dtype == np.float64 and ident.groups == 3 and np.array_equal(ident.weight, np.ones((3, 1, 1)))


def test_sum_branches_refusals():
    c = 2
    with pytest.raises(NotFusable, match="windows do not align"):
        sum_branches([[conv(c, c, 3)], [conv(c, c, 3, pad=0)]])
    with pytest.raises(NotFusable, match="stride differs"):
        sum_branches([[conv(c, c, 3, stride=2)], [conv(c, c, 3)]])
    with pytest.raises(NotFusable, match="padding modes differ"):
        sum_branches([[conv(c, c, 3, padding_mode="reflect")], [conv(c, c, 3)]])


@pytest.mark.parametrize(("case", "reason"), [("bn first, channels not given", "channel count of 'x'"),
                                            ("avgpool ceil_mode", "ceil_mode"), ("pad value 2", "value 2.0")])
def test_chain_refuses_when_an_op_is_not_fusable(case, reason):
    """A refused op mid-chain is kept by plan() as a source; chain must not return the rest as 'the' conv."""
    first, last = conv(2, 2, 3, nd=1, pad=0), conv(2, 2, 1, nd=1, pad=0)
    ops = {"bn first, channels not given": [bn(2), last],
           "avgpool ceil_mode": [first, AvgPool((2,), ceil_mode=True), last],
           "pad value 2": [first, Pad(((1, 1),), "constant", 2.0), last]}[case]
    with pytest.raises(NotFusable, match=reason):
        chain(ops)


def test_sum_branches_refuses_when_a_middle_op_is_not_fusable():
    first, last = conv(2, 2, 3, nd=1, pad=0), conv(2, 2, 1, nd=1, pad=0)
    with pytest.raises(NotFusable, match="ceil_mode"):
        sum_branches([[first, AvgPool((2,), (1,), ceil_mode=True), last], [conv(2, 2, 4, nd=1, pad=0)]])


# -------------------------------------------------------------------------------- random graphs

KINDS = ("conv", "conv", "same_conv", "same_conv", "bn", "affine", "identity", "pool", "pad", "add", "add",
         "relu", "mul", "input")


@st.composite
def graphs(draw, max_nodes=8):
    """A random DAG of linear and opaque nodes with consistent shapes (not filtered for fusability)."""
    nd = draw(st.sampled_from([1, 2, 0]), label="ndim")  # 0: linear layers
    c0 = draw(st.sampled_from([2, 4]), label="channels")
    size = tuple(draw(st.integers(5, 8)) for _ in range(nd))
    rng = draw(rs.rngs())
    g = LinearGraph()
    g.input("x", c0, nd)
    shapes = {"x": (c0, size)}
    inputs = {"x": rng.standard_normal((2, c0, *size))}
    for i in range(draw(st.integers(1, max_nodes), label="nodes")):
        kind = draw(st.sampled_from(KINDS))
        names = list(shapes)[::-1]  # most recent first: chains are likelier than fan-out
        src = draw(st.sampled_from(names))
        c, sz = shapes[src]
        name, ins, op, out = f"{kind}{i}", [src], None, (c, sz)
        if kind == "input":
            g.input(name, c0, nd)
            shapes[name] = (c0, size)
            inputs[name] = rng.standard_normal((2, c0, *size))
            continue
        if nd == 0 and kind in ("pool", "pad"):
            continue
        if kind in ("conv", "same_conv"):
            if kind == "same_conv":
                k = draw(st.sampled_from([1, 3]))
                d = draw(st.integers(1, 2))
                p = draw(rs.conv_params(nd, in_channels=c, out_channels=st.sampled_from([c, 2 * c]),
                                        kernel_size=k, stride=1, dilation=d, padding=d * (k - 1) // 2,
                                        padding_mode=st.sampled_from(["zeros", "zeros", "reflect"])))
            else:
                p = draw(rs.conv_params(nd, in_channels=c, max_padding=1))
            op = draw(rs.convs(params=p))
            lens = tuple(out_len(op, j, sz[j]) for j in range(nd))
            if any(n is None or n < 2 for n in lens):
                continue
            out = (op.out_channels, lens)
        elif kind == "bn":
            op = draw(rs.batch_norms(c))
        elif kind == "affine":
            op = draw(rs.affines(c))
        elif kind == "identity":
            op = Identity()
        elif kind == "pool":
            k = draw(st.integers(1, 3))
            pad = draw(st.integers(0, k // 2))
            op = AvgPool((k,) * nd, (1,) * nd, pad, count_include_pad=draw(st.booleans()),
                         ceil_mode=draw(st.integers(0, 4)) == 0)
            out = (c, tuple(n + 2 * pad - k + 1 for n in sz))
            if min(out[1]) < 2:
                continue
        elif kind == "pad":
            pads = tuple((draw(st.integers(0, 1)), draw(st.integers(0, 1))) for _ in range(nd))
            op = Pad(pads, draw(st.sampled_from(["zeros", "reflect", "replicate"])))
            out = (c, tuple(n + b + e for n, (b, e) in zip(sz, pads)))
        elif kind in ("add", "mul"):
            same = [n for n in names if shapes[n] == (c, sz)]
            ins = [src] + draw(st.lists(st.sampled_from(same), min_size=1, max_size=2 if kind == "add" else 1))
            op = Add() if kind == "add" else None
        if op is None:
            g.add(name, None, ins, channels=out[0], ndim=nd, payload=mul if kind == "mul" else relu)
        else:
            g.add(name, op, ins)
        shapes[name] = out
    names = list(shapes)
    g.mark_output(names[-1], *draw(st.lists(st.sampled_from(names), max_size=2)))
    return g, inputs


def _plan_is_exact(data):
    g, inputs = data.draw(graphs(), label="graph")
    costlier = data.draw(st.booleans(), label="allow_costlier")
    p = plan(g, allow_costlier=costlier)
    note("\n".join(f"{n.name}: {type(n.op).__name__ if n.op else 'opaque'} <- {n.inputs}" for n in g.nodes.values()))
    note(f"regions {[(r.exit, r.nodes, [t.source for t in r.terms]) for r in p.regions]}")
    note(f"refusals {p.refusals}")
    event(f"regions: {min(len(p.regions), 3)}, refusals: {min(len(p.refusals), 2)}")
    members = [n for r in p.regions for n in r.nodes]
    assert len(members) == len(set(members)), "a node is in two regions"
    assert all(f.reason for f in p.refusals)
    check_plan(g, p, inputs)


@FAST
@given(data=st.data())
def test_plan_of_random_graphs_is_exact(data):
    _plan_is_exact(data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_plan_of_random_graphs_is_exact_sweep(data):
    _plan_is_exact(data)
