"""A zero Pad in front of a MaxPool, folded into the pool's own padding where that is exact.

MaxPool's padding is minus infinity (padded cells never win), a Pad's is its constant.  The two agree when
no input value is below the constant: after a Relu (or a Clip whose minimum is at least 0) every value is
>= 0, so zero cells never change a window's maximum, provided every window still holds a real cell (each
side's total padding below the kernel size, no dilation; ``ceil_mode`` only at stride 1, where it
changes nothing).  timm's HGNetV2 stem pads a Relu output for both
a conv (the fusion folds it there) and a MaxPool; this removes the Pad that is then left.  onnxoptimizer's
``fuse_pad_into_pool`` does the same fold without the Relu condition, which changes the result whenever a
padded window holds only negative values.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import core
from ._graph import is_default_domain
from ._translate import Translator, _Opaque

_NON_NEGATIVE = ("Relu",)


def _non_negative(t: gs.Tensor, tl: Translator) -> bool:
    """``t`` is the output of an op whose values are all >= 0 (NaN aside, which both forms propagate)."""
    if len(t.inputs) != 1 or not is_default_domain(t.inputs[0]):
        return False
    node = t.inputs[0]
    if node.op in _NON_NEGATIVE:
        return True
    if node.op == "Clip":  # Relu6 and friends; the minimum is an input from opset 11, an attribute before
        low = node.attrs.get("min") if len(node.inputs) < 2 else tl.const(node.inputs[1])
        return low is not None and np.asarray(low).size == 1 and float(np.asarray(low).reshape(-1)[0]) >= 0.0
    return False


def _zero_pad(node: gs.Node, tl: Translator) -> tuple[gs.Tensor, tuple[tuple[int, int], ...]] | None:
    """The input and spatial padding of a constant-zero, non-negative Pad, else None."""
    if node.op != "Pad" or not is_default_domain(node) or len(node.outputs) != 1:
        return None
    try:
        op, data, _, _ = tl.translate(node)
    except (_Opaque, ValueError, LookupError, TypeError):
        return None
    if not isinstance(op, core.Pad) or op.mode != "zeros" or len(data) != 1:
        return None
    if any(b < 0 or e < 0 for b, e in op.padding):
        return None
    return data[0], op.padding


def _pool_padding(pool: gs.Node, extra: tuple[tuple[int, int], ...]) -> list[int] | None:
    """The MaxPool's ``pads`` with ``extra`` added, or None when the fold would not be exact or allowed."""
    if pool.op != "MaxPool" or not is_default_domain(pool):
        return None
    if len([o for o in pool.outputs if not o.is_empty()]) != 1 or pool.outputs[0].is_empty():
        return None  # the Indices output would index the padded tensor
    auto = pool.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    kernel = list(pool.attrs.get("kernel_shape", []))
    n = len(kernel)
    if auto != "NOTSET" or n != len(extra):
        return None
    if int(pool.attrs.get("ceil_mode", 0)) and any(int(s) != 1 for s in pool.attrs.get("strides", [1] * n)):
        return None  # rounding up may add a window that starts in the padding; at stride 1 it never does
    if any(int(d) != 1 for d in pool.attrs.get("dilations", [1] * n)):
        return None
    pads = [int(p) for p in pool.attrs.get("pads", [0] * (2 * n))]
    begins = [pads[i] + extra[i][0] for i in range(n)]
    ends = [pads[i + n] + extra[i][1] for i in range(n)]
    if any(p >= k for p, k in zip(begins + ends, kernel + kernel)):
        return None  # a window could lie wholly in the padding: -inf there, 0 with the Pad
    return begins + ends


def fold_pads_into_max_pools(graph: gs.Graph, tl: Translator) -> int:
    """Rewire each MaxPool that reads a foldable Pad to the Pad's input; returns how many were rewired
    (a Pad left without readers is removed by the graph's cleanup)."""
    folded = 0
    for pad in list(graph.nodes):
        found = _zero_pad(pad, tl)
        if found is None or not _non_negative(found[0], tl):
            continue
        src, extra = found
        for pool in list(pad.outputs[0].outputs):
            pads = _pool_padding(pool, extra)
            if pads is None or pool.inputs[0] is not pad.outputs[0]:
                continue
            pool.inputs[0] = src
            pool.attrs["pads"] = pads
            folded += 1
    return folded


__all__ = ["fold_pads_into_max_pools"]
