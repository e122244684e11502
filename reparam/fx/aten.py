"""ATen graphs (``torch.export`` programs, before or after ``run_decompositions()``) in the torch-level form the
translation reads.

An exported graph calls ATen overloads (``aten.convolution.default``, ``aten._native_batch_norm_legit_no_training
.default`` and its ``getitem``, ``aten.addmm.default`` of a transposed weight...).  :func:`normalize` rewrites
each one that has a torch-level twin into that twin (``F.conv2d``, ``F.batch_norm``, ``F.linear``, ``operator.add``,
``torch.flatten``...), with the same arguments in the twin's order, so one translation serves traced modules and
exported programs alike.  Ops without a twin here stay ATen calls, which the translation treats as opaque.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


def _convolution(node: fx.Node) -> tuple[Callable, tuple] | None:
    x, w, b = node.args[:3]
    stride, padding, dilation, transposed, _, groups = (_arg(node, i, n) for i, n in enumerate(
        ("stride", "padding", "dilation", "transposed", "output_padding", "groups"), start=3))
    if transposed:
        return None
    nd = len(w.meta["val"].shape) - 2 if isinstance(w, fx.Node) and "val" in w.meta else len(stride)
    return _CONV[nd], (x, w, b, stride, padding, dilation, groups)


def _conv(nd: int) -> Callable[[fx.Node], tuple[Callable, tuple]]:
    def make(node: fx.Node) -> tuple[Callable, tuple]:
        return _CONV[nd], tuple(node.args)
    return make


def _batch_norm(node: fx.Node) -> tuple[Callable, tuple]:
    x, w, b, mean, var, training, momentum, eps = (_arg(node, i, n) for i, n in enumerate(
        ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")))
    return F.batch_norm, (x, mean, var, w, b, training, momentum, eps)


def _linear(node: fx.Node) -> tuple[Callable, tuple]:
    return F.linear, tuple(node.args)


def _binary(op: Callable) -> Callable[[fx.Node], tuple[Callable, tuple] | None]:
    def make(node: fx.Node) -> tuple[Callable, tuple] | None:
        if _arg(node, 2, "alpha", 1) != 1 or len(node.args) < 2:
            return None
        return op, tuple(node.args[:2])
    return make


def _avg_pool(nd: int) -> Callable[[fx.Node], tuple[Callable, tuple]]:
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]

    def make(node: fx.Node) -> tuple[Callable, tuple]:
        return fn, tuple(node.args)
    return make


def _pad(node: fx.Node) -> tuple[Callable, tuple]:
    return F.pad, (node.args[0], node.args[1], "constant", _arg(node, 2, "value", 0.0))


def _dropout(node: fx.Node) -> tuple[Callable, tuple]:
    """``aten.dropout(x, p, train)``: an identity when ``train`` is False (a program exported in eval mode)."""
    return F.dropout, (node.args[0], _arg(node, 1, "p", 0.5), _arg(node, 2, "train", True))


def _same(fn: Callable) -> Callable[[fx.Node], tuple[Callable, tuple]]:
    def make(node: fx.Node) -> tuple[Callable, tuple]:
        return fn, tuple(node.args)
    return make


_TWINS: dict[Any, Callable[[fx.Node], tuple[Callable, tuple] | None]] = {
    aten.convolution.default: _convolution,
    aten.conv1d.default: _conv(1), aten.conv2d.default: _conv(2), aten.conv3d.default: _conv(3),
    aten.batch_norm.default: _batch_norm,
    aten.linear.default: _linear,
    aten.add.Tensor: _binary(operator.add), aten.sub.Tensor: _binary(operator.sub),
    aten.mul.Tensor: _binary(operator.mul), aten.div.Tensor: _binary(operator.truediv),
    aten.add_.Tensor: _binary(operator.iadd), aten.sub_.Tensor: _binary(operator.isub),
    aten.mul_.Tensor: _binary(operator.imul), aten.div_.Tensor: _binary(operator.itruediv),
    aten.neg.default: _same(operator.neg),
    aten.avg_pool1d.default: _avg_pool(1), aten.avg_pool2d.default: _avg_pool(2), aten.avg_pool3d.default: _avg_pool(3),
    aten.constant_pad_nd.default: _pad,
    aten.flatten.using_ints: _same(torch.flatten), aten.view.default: _same(torch.reshape),
    aten.reshape.default: _same(torch.reshape), aten.permute.default: _same(torch.permute),
    aten.t.default: _same(torch.t), aten.cat.default: _same(torch.cat), aten.mean.dim: _same(torch.mean),
    aten.split.Tensor: _same(torch.split), aten.split_with_sizes.default: _same(torch.split),
    aten.chunk.default: _same(torch.chunk), aten.dropout.default: _dropout,
}


_AS_METHODS = {aten.reshape_as.default: "reshape_as", aten.view_as.default: "view_as",
               aten.expand_as.default: "expand_as", aten.type_as.default: "type_as"}


def is_aten(graph: fx.Graph) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes)


def normalize(graph: fx.Graph) -> int:
    """Rewrite the ATen calls of ``graph`` that have a torch-level twin; returns how many were rewritten."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target is aten._native_batch_norm_legit_no_training.default:
            done += _legit_bn(graph, node)
            continue
        if node.target is aten.addmm.default:
            done += _addmm(graph, node)
            continue
        if node.target in _AS_METHODS:  # ``y.reshape_as(x)`` reads only the shape of x: a method, as traced
            with graph.inserting_before(node):
                new = graph.call_method(_AS_METHODS[node.target], tuple(node.args))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            done += 1
            continue
        if node.target is aten.clone.default and _plain_clone(node):
            node.replace_all_uses_with(node.args[0])  # what eval-mode dropout decomposes to
            graph.erase_node(node)
            done += 1
            continue
        make = _TWINS.get(node.target)
        twin = make(node) if make is not None else None
        if twin is None:
            continue
        fn, args = twin
        with graph.inserting_before(node):
            new = graph.call_function(fn, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    return done


def _plain_clone(node: fx.Node) -> bool:
    """A copy that only a functional graph's nodes read: dropping it changes no value (nothing in an ATen
    graph writes in place) and no memory format, and the program does not return it (it would then alias
    its input)."""
    fmt = node.kwargs.get("memory_format")
    return (isinstance(node.args[0], fx.Node) and fmt in (None, torch.preserve_format)
            and all(u.op != "output" for u in node.users))


def _legit_bn(graph: fx.Graph, node: fx.Node) -> int:
    """``_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]`` -> ``F.batch_norm``."""
    users = list(node.users)
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in users if u.users) or not users:
        return 0
    x, w, b, mean, var, momentum, eps = node.args[:7]
    with graph.inserting_before(node):
        new = graph.call_function(F.batch_norm, (x, mean, var, w, b, False, momentum, eps))
    for u in users:
        if u.args[1] == 0:
            new.meta.update(u.meta)
            u.replace_all_uses_with(new)
        graph.erase_node(u)
    graph.erase_node(node)
    return 1


def _addmm(graph: fx.Graph, node: fx.Node) -> int:
    """``addmm(b, x, permute(w, [1, 0]))`` (a decomposed Linear) -> ``F.linear(x, w, b)``."""
    bias, x, wt = node.args[:3]
    if node.kwargs or not isinstance(wt, fx.Node) or wt.op != "call_function":
        return 0
    if not ((wt.target in (aten.permute.default, torch.permute) and list(wt.args[1]) == [1, 0])
            or wt.target in (aten.t.default, torch.t)):  # (the transpose before it may be rewritten already)
        return 0
    with graph.inserting_before(node):
        new = graph.call_function(F.linear, (x, wt.args[0], bias))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if not wt.users:
        graph.erase_node(wt)
    return 1


__all__ = ["is_aten", "normalize"]
