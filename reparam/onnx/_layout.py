"""Layout: a Transpose moved ahead of the constant Mul/Add/Sub/Div chain before it, to share one transposed value.

tf2onnx converts an NHWC Keras graph to NCHW convolutions with Transposes, but a batch norm it could not fold
into a conv (the BN-only identity branch of a RepVGG block) stays as a Mul and an Add on the NHWC value,
followed by a Transpose of its own: ``Transpose(x*s + t)`` beside the ``Transpose(x)`` the convs read.  As
``Transpose(f(x, c)) == f(Transpose(x), Transpose(c))`` for an elementwise ``f`` (with ``c`` broadcast to
the full rank), the chain is rebuilt on the existing ``Transpose(x)``: the constants become per-channel in
the NCHW layout and the whole block is one branch sum.  Only chains whose input already has a Transpose
with the same permutation are moved, so nothing is added to graphs where it would not help.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ._graph import Inferred, Names, TensorInfo, is_default_domain
from ._translate import Translator

CHAIN_OPS = frozenset({"Mul", "Add", "Sub", "Div"})


def _perm(node: gs.Node) -> list[int] | None:
    p = node.attrs.get("perm") if node.op == "Transpose" and is_default_domain(node) else None
    return None if p is None else [int(v) for v in p]


def _chain(t: gs.Node, tl: Translator, rank: int) -> tuple[list[tuple[gs.Node, int]], gs.Tensor]:
    """The constant elementwise nodes read by ``t`` only, nearest first, with their constant input's index."""
    chain: list[tuple[gs.Node, int]] = []
    v = t.inputs[0]
    while len(v.inputs) == 1 and len(v.outputs) == 1 and v.name not in tl.graph_outputs and v.name not in tl.captured:
        e = v.inputs[0]
        if e.op not in CHAIN_OPS or not is_default_domain(e) or len(e.inputs) != 2:
            break
        consts = [tl.const(x) for x in e.inputs]
        if sum(c is not None for c in consts) != 1:
            break
        k = 0 if consts[0] is not None else 1
        data = e.inputs[1 - k]
        if consts[k].ndim > rank or tl.info(data.name).rank != rank:
            break
        chain.append((e, k))
        v = data
    return chain, v


def share_transposes(graph: gs.Graph, tl: Translator, inferred: Inferred, names: Names) -> int:
    """Rebuild each qualifying chain on the existing Transpose of its input; returns how many moved."""
    moved = 0
    for t in list(graph.nodes):
        perm = _perm(t)
        if perm is None or not t.inputs or not t.outputs:
            continue
        chain, base = _chain(t, tl, len(perm))
        twin = next((n for n in base.outputs if n is not t and _perm(n) == perm and n.outputs), None)
        if not chain or twin is None:
            continue
        cur = twin.outputs[0]
        final = t.outputs[0]
        t.inputs.clear()
        t.outputs.clear()
        for e, k in reversed(chain):
            c = np.asarray(tl.const(e.inputs[k]))
            c = np.ascontiguousarray(c.reshape((1,) * (len(perm) - c.ndim) + c.shape).transpose(perm))
            const = gs.Constant(names.fresh(f"{e.inputs[k].name}/reparam/transposed"), c)
            if e is chain[0][0]:
                out = final
            else:
                out = gs.Variable(names.fresh(f"{e.outputs[0].name}/reparam/transposed"))
                src = tl.info(e.outputs[0].name)
                shape = None if src.shape is None else tuple(src.shape[p] for p in perm)
                inferred.infos[out.name] = TensorInfo(src.elem_type, shape)
                if final.name in inferred.spatial:
                    inferred.spatial[out.name] = inferred.spatial[final.name]
            ins = [const, cur] if k == 0 else [cur, const]
            graph.nodes.append(gs.Node(e.op, names.fresh(f"{e.name}/reparam/transposed"), dict(e.attrs), ins, [out]))
            cur = out
        moved += 1
    return moved


__all__ = ["share_transposes"]
