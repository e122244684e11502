"""Training form -> deploy form for the zoo models, computed with the core weight algebra.

Every BatchNorm that follows a conv is folded into it (the BN slot becomes ``nn.Identity``), and each RepGhost
module's cheap depthwise conv+BN and re-parameterization branches collapse into one depthwise conv with bias.
The result has exactly the structure and state-dict keys of the same model built with ``deploy=True``.

All fusion math is done by :mod:`reparam.core` (``chain`` / ``sum_branches``, float64 inside); this module
only decides which modules form which branches.  For arbitrary models use ``reparam.fuse``.
"""

from __future__ import annotations

import copy
from typing import TypeVar

from torch import nn

from reparam.core.errors import NotFusable, ReparamError

from ._net import GhostFamilyNet
from .ghostnet import GhostBottleneck, GhostModule
from .layers import ConvBnAct
from .repghost import RepGhostBottleneck, RepGhostModule

__all__ = ["bn_slots", "convert", "convert_"]

M = TypeVar("M", bound=nn.Module)

# A pending edit: set ``parent.<attr> = new`` (applied only once every fusion of the model succeeded).
_Edit = tuple[nn.Module, str, nn.Module]


def _torch_ops():
    from reparam import core
    from reparam.torch_ops import to_core, to_module

    return core, to_core, to_module


def _as_core_ops(modules: list[nn.Module], where: str) -> list[object]:
    _, to_core, _ = _torch_ops()
    ops = []
    for m in modules:
        if isinstance(m, nn.Identity):
            continue
        try:
            ops.append(to_core(m))
        except NotFusable as exc:
            raise NotFusable(f"{where}: {exc}") from exc
    return ops


def _to_conv_module(fused: object, like: nn.Conv2d) -> nn.Conv2d:
    _, _, to_module = _torch_ops()
    module = to_module(fused, dtype=like.weight.dtype, device=like.weight.device)
    if type(module) is not nn.Conv2d:  # e.g. asymmetric padding would need an explicit pad module
        raise ReparamError(f"fused result {type(module).__name__} is not a plain Conv2d (deploy layout)")
    return module


def _fold_pair(parent: nn.Module, conv_attr: str, bn_attr: str, where: str) -> list[_Edit]:
    """Fold ``parent.<bn_attr>`` into ``parent.<conv_attr>`` (nothing to do if the BN slot is empty)."""
    core, _, _ = _torch_ops()
    conv = getattr(parent, conv_attr)
    norm = getattr(parent, bn_attr)
    if isinstance(norm, nn.Identity):
        return []
    if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d):
        raise ReparamError(f"{where}: expected Conv2d then BatchNorm2d at {conv_attr!r}/{bn_attr!r}, "
                           f"got {type(conv).__name__} and {type(norm).__name__}")
    fused = core.chain(_as_core_ops([conv, norm], where))
    return [(parent, conv_attr, _to_conv_module(fused, conv)), (parent, bn_attr, nn.Identity())]


def bn_slots(module: nn.Module) -> list[tuple[str, str, str]]:
    """The conv+BN pairs a zoo block owns: ``(parent path relative to module, conv attr, BN attr)``.

    A RepGhost module's cheap operation is not listed: it is a branch sum, see :func:`_repghost_module`.
    """
    if isinstance(module, RepGhostModule):
        return [("primary_conv", "0", "1")]
    if isinstance(module, GhostModule):
        return [("primary_conv", "0", "1"), ("cheap_operation", "0", "1")]
    if isinstance(module, (RepGhostBottleneck, GhostBottleneck)):
        slots = [("", "conv_dw", "bn_dw")] if module.stride > 1 else []
        return slots + ([("shortcut", "0", "1"), ("shortcut", "2", "3")] if len(module.shortcut) else [])
    if isinstance(module, ConvBnAct):
        return [("", "conv", "bn1")]
    if isinstance(module, GhostFamilyNet):
        return [("", "conv_stem", "bn1")]
    return []


def _repghost_module(m: RepGhostModule, where: str) -> list[_Edit]:
    """The cheap depthwise conv+BN and the re-parameterization branches summed into one depthwise conv."""
    core, _, _ = _torch_ops()
    if isinstance(m.cheap_operation, nn.Conv2d):  # already the deploy form
        return []
    dw, dw_norm = m.cheap_operation[0], m.cheap_operation[1]
    if m.cheap_relu and len(m.fusion_conv):
        raise NotFusable(
            f"{where}: a ReLU follows the cheap depthwise conv+BN inside the re-parameterized sum "
            f"(cheap_relu=True, the paper's '+ReLU' ablation); relu(conv(x)) + branch(x) is not a linear "
            f"function of x, so it cannot be collapsed into one conv")
    branches = [_as_core_ops([dw, dw_norm], f"{where}.cheap_operation")]
    for i, (conv, bn) in enumerate(zip(m.fusion_conv, m.fusion_bn)):
        branches.append(_as_core_ops([conv, bn], f"{where}.fusion[{i}]"))
    try:
        fused = core.sum_branches(branches, m.out_channels, 2)
    except NotFusable as exc:
        raise NotFusable(f"{where}: {exc}") from exc
    return [(m, "cheap_operation", _to_conv_module(fused, dw)),
            (m, "fusion_conv", nn.Sequential()), (m, "fusion_bn", nn.Sequential())]


_BLOCKS = (RepGhostModule, GhostModule, RepGhostBottleneck, GhostBottleneck, ConvBnAct, GhostFamilyNet)


def _edits(module: nn.Module, name: str) -> list[_Edit]:
    edits: list[_Edit] = []
    for parent_path, conv_attr, bn_attr in bn_slots(module):
        parent = module.get_submodule(parent_path) if parent_path else module
        where = ".".join(filter(None, [name, parent_path])) or "<model>"
        edits += _fold_pair(parent, conv_attr, bn_attr, where)
    if isinstance(module, RepGhostModule):
        edits += _repghost_module(module, name)
    return edits


def convert_(model: M) -> M:
    """Convert a zoo model (or a module containing zoo blocks) to its deploy form, in place; returns it.

    Weights are computed from BN running statistics (inference semantics), whatever the training flag; the
    flag is left as it was.  Nothing is modified if any block cannot be fused (e.g. ``cheap_relu=True`` raises
    :class:`reparam.core.NotFusable` naming the block).
    """
    edits: list[_Edit] = []
    converted: list[nn.Module] = []
    was_training = model.training
    model.eval()  # fusion reads running statistics; make sure no frontend sees a training-mode BN
    try:
        for name, module in model.named_modules():
            if isinstance(module, _BLOCKS):
                edits += _edits(module, name)
                converted.append(module)
    finally:
        model.train(was_training)
    if not converted:
        raise ReparamError(f"{type(model).__name__} contains no reparam_zoo blocks to convert; "
                           "use reparam.fuse for arbitrary models")
    for parent, attr, new in edits:
        setattr(parent, attr, new)
    model.train(was_training)
    for module in converted:
        if hasattr(module, "deploy"):
            module.deploy = True
        if isinstance(module, RepGhostModule):
            module.branches = ()
    return model


def convert(model: M) -> M:
    """Return a converted deep copy of ``model`` (see :func:`convert_`); the original is untouched."""
    return convert_(copy.deepcopy(model))
