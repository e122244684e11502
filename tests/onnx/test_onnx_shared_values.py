"""Values read several times inside one region: exporters merge equal parameter-free branches (two
average pools, two default BNs of one input) into one node read twice, and the region must still collapse."""

from __future__ import annotations

from onnx_testlib import Builder, fuse_checked, ops

from reparam import core


def test_value_read_twice_by_one_add_is_inside_the_region():
    """pool(x) + pool(x) exported as Add(p, p)."""
    b = Builder()
    p = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    y = b.node("Relu", [b.node("Add", [b.conv("x", 4, 4), b.node("Add", [p, p])])])
    fused, _ = fuse_checked(b.model([("x", [1, 4, 6, 6])], [(y, None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def test_core_plan_add_of_same_value_twice():
    g = core.LinearGraph()
    g.input("x", 4, 2)
    g.add("p", core.AvgPool((3, 3), (1, 1), 1), ["x"])
    g.add("s", core.Add(), ["p", "p"])
    g.add("r", None, ["s"])
    g.mark_output("r")
    plan = core.plan(g, allow_costlier=True)  # by default a pool alone is not turned into a conv
    (region,) = [r for r in plan.regions if r.exit == "s"]
    assert region.nodes == ["p", "s"]


def test_value_used_twice_inside_one_sum_tree():
    """One BN node read by two Adds of the same branch-sum tree."""
    b = Builder()
    bn = b.bn("x", 4)
    s = b.node("Add", [b.node("Add", [b.conv("x", 4, 4), bn]), b.node("Add", [b.conv("x", 4, 4, k=1), bn])])
    fused, _ = fuse_checked(b.model([("x", [1, 4, 6, 6])], [(b.node("Relu", [s]), None)]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def test_pool_read_twice_beside_a_conv_becomes_a_mul_not_a_second_conv():
    """Found by the 300-export sweep: pool(x) + conv(x) + pool(x) with the pool read twice; the pool's term
    (2 * pool) would have been a depthwise conv beyond the region's one conv and the region was kept with
    its BN; now the per-channel term is a Mul and the BN goes."""
    b = Builder()
    p = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    y = b.node("Relu", [b.node("Add", [b.node("Add", [p, b.bn(b.conv("x", 4, 4, k=1), 4)]), p])])
    fused, report = fuse_checked(b.model([("x", [1, 4, 6, 6])], [(y, None)]))
    counts = ops(fused)
    assert counts["BatchNormalization"] == 0 and counts["Conv"] <= 1, report.format()
