"""Shared helpers of the core tests (imported as a plain module): settings, tolerances, shape arithmetic,
magnitude bounds and an op-by-op evaluator of LinearGraphs and of the regions a Plan rewrites them into.

Everything here evaluates with :mod:`reparam.testing.reference` (float64 numpy), never with the core.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, settings

from reparam.core import Add, Affine, BatchNorm, Conv, ConvTranspose, LinearGraph, Plan
from reparam.testing import reference as ref

# Modest by default (the whole tests/core run stays well under a minute on 2 cores); REPARAM_CORE_EXAMPLES
# scales every property test, and the ``slow`` sweeps run many more.
_SCALE = float(os.environ.get("REPARAM_CORE_EXAMPLES", "1"))
_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile("reparam-core", max_examples=max(1, int(25 * _SCALE)), deadline=None,
                          suppress_health_check=_HEALTH, print_blob=True)
FAST = settings.get_profile("reparam-core")
SLOW = settings(FAST, max_examples=max(1, int(400 * _SCALE)))


def examples(n: int) -> settings:
    """FAST with ``n`` examples (scaled like every other property test)."""
    return settings(FAST, max_examples=max(1, int(n * _SCALE)))


BF16 = np.dtype(ml_dtypes.bfloat16)
HALF_DTYPES = (np.dtype(np.float16), BF16)
ALL_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), *HALF_DTYPES)


def f64(a):
    """float64 view of any array (bfloat16 included); None stays None."""
    return None if a is None else np.asarray(a).astype(np.float64)


# ------------------------------------------------------------------------------------------- shapes

def out_len(conv: Conv, dim: int, n: int) -> int | None:
    """Output length of ``conv`` along ``dim`` for input length ``n``; None if the reference refuses it."""
    (b, e), k, s, d = conv.padding[dim], conv.kernel_size[dim], conv.stride[dim], conv.dilation[dim]
    if conv.padding_mode == "reflect" and max(b, e) >= n:
        return None
    if conv.padding_mode == "circular" and max(b, e) > n:
        return None
    span = n + b + e - d * (k - 1)
    return None if span < 1 else (span - 1) // s + 1


def pipeline_len(convs, dim: int, n: int) -> int | None:
    """Length after applying ``convs`` in sequence (None if any step is invalid)."""
    for c in convs:
        n = out_len(c, dim, n)
        if n is None:
            return None
    return n


def min_len(convs, dim: int, start: int = 1) -> int:
    """Smallest input length valid for the pipeline ``convs`` along ``dim``."""
    n = start
    while pipeline_len(convs, dim, n) is None:
        n += 1
        assert n < 200, "no valid input length"
    return n


# ---------------------------------------------------------------------------------------- tolerance

def eps_of(dtype) -> float:
    return float(ml_dtypes.finfo(dtype).eps)


def rtol_of(dtype) -> float:
    """float64 ~1e-10 and float32 ~1e-5 (both far above their rounding); half types: their eps."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return 1e-10
    if dtype == np.float32:
        return 1e-5
    return eps_of(dtype)


def assert_close(got, expected, mag, dtype=np.float64, floor=None) -> None:
    """``|got - expected| <= rtol(dtype) * mag`` elementwise (plus a tiny floor).

    ``mag`` bounds the size of every product summed into an element (the unfused computation run on
    absolute values, see :func:`abs_op`), so cancellation to ~0 never makes the check flaky while a
    wrong tap, channel or border is still caught: those errors are of the order of ``mag`` itself.
    """
    got, expected, mag = f64(got), f64(expected), np.broadcast_to(f64(mag), np.shape(expected))
    assert got.shape == expected.shape, f"shape {got.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(got)), "non-finite output"
    rtol = rtol_of(dtype)
    tiny = 1e-300 if floor is None else floor
    bound = rtol * mag + 1e-12 * float(np.max(mag, initial=0.0)) + tiny
    err = np.abs(got - expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), (
        f"max excess at {worst}: |{got[worst]} - {expected[worst]}| = {err[worst]:.3g} > {bound[worst]:.3g} "
        f"(rtol {rtol:.1e}, mag {mag[worst]:.3g})")


# ------------------------------------------------------------------------------------ absolute values

def abs_op(op):
    """The op on absolute values: applied to ``|x|`` it bounds every product summed by ``op`` on ``x``."""
    if isinstance(op, Conv):
        return op.with_(weight=np.abs(f64(op.weight)), bias=None if op.bias is None else np.abs(f64(op.bias)))
    if isinstance(op, ConvTranspose):
        return ConvTranspose(np.abs(f64(op.weight)), None if op.bias is None else np.abs(f64(op.bias)),
                             op.stride, op.padding, op.output_padding, op.dilation, op.groups)
    if isinstance(op, BatchNorm):
        c = op.channels
        inv = 1 / np.sqrt(f64(op.running_var) + op.eps)
        gamma = np.ones(c) if op.gamma is None else f64(op.gamma)
        beta = np.zeros(c) if op.beta is None else f64(op.beta)
        s = np.abs(gamma * inv)
        return Affine(scale=s, shift=s * np.abs(f64(op.running_mean)) + np.abs(beta))
    if isinstance(op, Affine):
        return Affine(None if op.scale is None else np.abs(f64(op.scale)),
                      None if op.shift is None else np.abs(f64(op.shift)))
    return op  # Identity, AvgPool (positive weights), Pad (zeros or copies), Add


def run_ops(ops, x, absolute: bool = False):
    """Apply a chain of core ops with the reference (on ``|x|`` with :func:`abs_op` when ``absolute``)."""
    y = np.abs(f64(x)) if absolute else f64(x)
    for op in ops:
        y = ref.run_op(abs_op(op) if absolute else op, y)
    return y


def run_branches(branches, x, absolute: bool = False):
    """Sum of op chains applied to the same input (an empty chain is the identity)."""
    return sum(run_ops(ops, x, absolute) for ops in branches)


def check_fused(fused: Conv, branches, x, dtype=None) -> None:
    """The fused conv on ``x`` equals the unfused branches, within the tolerance of ``dtype``."""
    dtype = fused.dtype if dtype is None else dtype
    expected = run_branches(branches, x)
    mag = run_branches(branches, x, absolute=True)
    floor = None
    if np.dtype(dtype) in HALF_DTYPES:  # underflow of tiny fused weights is absolute, not relative
        ones = fused.with_(weight=np.ones(fused.weight.shape), bias=None)
        floor = float(ml_dtypes.finfo(dtype).smallest_subnormal) * ref.run_conv(ones, np.abs(f64(x)))
    assert_close(ref.run_conv(fused, x), expected, mag, dtype, floor)


# --------------------------------------------------------------------------------------- graphs

def relu(xs):
    return np.maximum(xs[0], 0.0)


def mul(xs):
    return xs[0] * xs[1]


def eval_graph(graph: LinearGraph, inputs: dict, absolute: bool = False) -> dict:
    """Every value of ``graph``, op by op with the reference; opaque nodes carry a callable payload."""
    vals = {}
    for name, node in graph.nodes.items():
        if not node.inputs and node.op is None:
            vals[name] = np.abs(f64(inputs[name])) if absolute else f64(inputs[name])
        elif node.op is None:
            vals[name] = node.payload([vals[i] for i in node.inputs])
        elif isinstance(node.op, Add):
            vals[name] = ref.run_op(node.op, [vals[i] for i in node.inputs])
        else:
            vals[name] = ref.run_op(abs_op(node.op) if absolute else node.op, vals[node.inputs[0]])
    return vals


def eval_plan(graph: LinearGraph, plan: Plan, inputs: dict) -> dict:
    """The graph as a frontend would rewrite it: each region's exit is the sum of its terms (identity
    terms emit the source), region-internal nodes vanish, everything else runs unchanged.
    Returns the values of the nodes that still exist."""
    exits = {r.exit: r for r in plan.regions}
    inner = {n for r in plan.regions for n in r.nodes if n != r.exit}
    vals = {}
    for name, node in graph.nodes.items():
        if name in exits:
            parts = [vals[t.source] if t.identity else ref.run_conv(t.conv, vals[t.source])
                     for t in exits[name].terms]
            vals[name] = np.sum(parts, axis=0)
        elif name in inner:
            continue
        elif not node.inputs and node.op is None:
            vals[name] = f64(inputs[name])
        elif node.op is None:
            vals[name] = node.payload([vals[i] for i in node.inputs])
        elif isinstance(node.op, Add):
            vals[name] = ref.run_op(node.op, [vals[i] for i in node.inputs])
        else:
            vals[name] = ref.run_op(node.op, vals[node.inputs[0]])
    return vals


def check_plan(graph: LinearGraph, plan: Plan, inputs: dict, outputs=None) -> None:
    """The rewritten graph equals the original (op by op, reference) at every output and region exit."""
    want = eval_graph(graph, inputs)
    mag = eval_graph(graph, inputs, absolute=True)
    got = eval_plan(graph, plan, inputs)
    names = set(outputs or graph.outputs) | {r.exit for r in plan.regions}
    for name in sorted(names):
        assert name in got, f"{name} vanished from the rewritten graph"
        assert_close(got[name], want[name], mag[name])
    for r in plan.regions:
        assert r.nodes[-1] == r.exit and len(set(r.nodes)) == len(r.nodes)
        for t in r.terms:
            if t.identity:
                assert t.conv.is_pointwise and not t.conv.is_padded


__all__ = [
    "ALL_DTYPES", "BF16", "FAST", "HALF_DTYPES", "SLOW", "abs_op",
    "assert_close", "check_fused", "check_plan", "eps_of", "eval_graph", "eval_plan", "examples", "f64",
    "min_len", "mul", "out_len", "pipeline_len", "relu", "rtol_of", "run_branches", "run_ops",
]
