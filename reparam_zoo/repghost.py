"""RepGhostNet (Chen et al., 2022, arXiv:2211.06088): Ghost modules whose concatenation is replaced by an add
that structural re-parameterization folds into the cheap depthwise conv.

Module names and the order of registered parameters follow the reference implementation, so its checkpoints
load strictly (see :func:`reparam_zoo.load_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._net import BlockCfg, GhostFamilyNet
from .layers import SqueezeExcite, conv_bn, make_divisible
from .registry import register_model

__all__ = [
    "REPARAM_BRANCHES",
    "RepGhostBottleneck",
    "RepGhostModule",
    "RepGhostNet",
    "parse_reparam",
    "repghostnet",
    "repghostnet_0_5x",
    "repghostnet_0_8x",
    "repghostnet_0_58x",
    "repghostnet_1_0x",
    "repghostnet_1_3x",
    "repghostnet_1_5x",
    "repghostnet_1_11x",
    "repghostnet_2_0x",
]

#: Kinds of re-parameterization branch a RepGhost module may add next to its cheap depthwise conv, in the
#: canonical order in which they are registered (``fusion_conv.{i}`` / ``fusion_bn.{i}``).
REPARAM_BRANCHES = ("bn", "identity", "dwconv1x1_bn")

ReparamSpec = str | Sequence[str] | None


def parse_reparam(spec: ReparamSpec) -> tuple[str, ...]:
    """Normalize a re-parameterization spec to a tuple of branch kinds in canonical order.

    Accepts ``"bn"``, ``"identity"``, ``"dwconv1x1_bn"``, ``"none"`` (or ``None`` / empty), a ``+``-joined
    combination such as ``"bn+identity"``, or a sequence of kinds.
    """
    if spec is None:
        return ()
    tokens = [t.strip() for t in spec.split("+")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    tokens = [t for t in tokens if t]
    if tokens == ["none"]:
        return ()
    unknown = [t for t in tokens if t not in REPARAM_BRANCHES]
    if unknown:
        raise ValueError(f"unknown re-parameterization branch {unknown}; choose from {REPARAM_BRANCHES}, "
                         f"a '+'-joined combination of them, or 'none'")
    return tuple(kind for kind in REPARAM_BRANCHES if kind in tokens)


class RepGhostModule(nn.Module):
    """1x1 conv+BN(+ReLU) followed by a cheap depthwise conv+BN summed with re-parameterization branches.

    Training form (reference layout)::

        primary_conv = [Conv1x1, BN, ReLU | -]
        cheap_operation = [DWConv kxk, BN]
        fusion_conv[i], fusion_bn[i]   one pair per branch: (Identity, BN) for "bn",
                                       (Identity, Identity) for "identity",
                                       (DWConv1x1, BN) for "dwconv1x1_bn"
        p = primary_conv(x)
        out = relu(cheap_act(cheap_operation(p)) + sum_i fusion_bn[i](fusion_conv[i](p)))

    ``cheap_act`` is a ReLU only for the paper's "+ReLU" ablation (``cheap_relu=True``, and only in modules
    that have the trailing ReLU, as in the Ghost module); it makes the branch sum non-linear, so the module
    cannot be fused.

    Deploy form: ``primary_conv = [Conv1x1 with bias, Identity, ReLU | -]``, ``cheap_operation`` is a single
    depthwise conv with bias, no fusion branches.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        relu: bool = True,
        reparam: ReparamSpec = "bn",
        cheap_relu: bool = False,
        dw_size: int = 3,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deploy = deploy
        self.branches = () if deploy else parse_reparam(reparam)
        self.cheap_relu = bool(cheap_relu and relu)

        conv, norm = conv_bn(in_channels, out_channels, 1, deploy=deploy)
        self.primary_conv = nn.Sequential(conv, norm, nn.ReLU(inplace=True) if relu else nn.Sequential())

        self.fusion_conv = nn.Sequential()
        self.fusion_bn = nn.Sequential()
        for kind in self.branches:
            if kind == "bn":
                self.fusion_conv.append(nn.Identity())
                self.fusion_bn.append(nn.BatchNorm2d(out_channels))
            elif kind == "identity":
                self.fusion_conv.append(nn.Identity())
                self.fusion_bn.append(nn.Identity())
            else:  # dwconv1x1_bn
                self.fusion_conv.append(
                    nn.Conv2d(out_channels, out_channels, 1, groups=out_channels, bias=False))
                self.fusion_bn.append(nn.BatchNorm2d(out_channels))

        dw, dw_norm = conv_bn(out_channels, out_channels, dw_size, groups=out_channels, deploy=deploy)
        self.cheap_operation: nn.Module = dw if deploy else nn.Sequential(dw, dw_norm)
        self.cheap_act = nn.ReLU() if self.cheap_relu else nn.Identity()
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_act(self.cheap_operation(x1))
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)


class RepGhostBottleneck(nn.Module):
    """RepGhost bottleneck: RepGhost module (ReLU), optional stride-2 depthwise conv+BN (no activation),
    optional SE, RepGhost module (no ReLU), plus a shortcut.

    The shortcut is the identity when ``in == out`` and ``stride == 1`` (dropped when ``shortcut=False``, the
    Table 7 ablation), otherwise depthwise kxk conv+BN then 1x1 conv+BN (kept even with ``shortcut=False``).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        dw_kernel_size: int = 3,
        stride: int = 1,
        se_ratio: float = 0.0,
        shortcut: bool = True,
        reparam: ReparamSpec = "bn",
        cheap_relu: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.identity_shortcut = in_channels == out_channels and stride == 1
        self.use_shortcut = shortcut or not self.identity_shortcut

        self.ghost1 = RepGhostModule(in_channels, mid_channels, relu=True, reparam=reparam,
                                     cheap_relu=cheap_relu, deploy=deploy)
        if stride > 1:
            self.conv_dw, self.bn_dw = conv_bn(mid_channels, mid_channels, dw_kernel_size, stride=stride,
                                               groups=mid_channels, deploy=deploy)
        self.se = SqueezeExcite(mid_channels, se_ratio) if se_ratio and se_ratio > 0 else None
        self.ghost2 = RepGhostModule(mid_channels, out_channels, relu=False, reparam=reparam,
                                     cheap_relu=cheap_relu, deploy=deploy)
        if self.identity_shortcut:
            self.shortcut = nn.Sequential()
        else:
            dw, dw_norm = conv_bn(in_channels, in_channels, dw_kernel_size, stride=stride, groups=in_channels,
                                  deploy=deploy)
            pw, pw_norm = conv_bn(in_channels, out_channels, 1, deploy=deploy)
            self.shortcut = nn.Sequential(dw, dw_norm, pw, pw_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost1(x)
        if self.stride > 1:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        y = self.ghost2(y)
        return y + self.shortcut(x) if self.use_shortcut else y


# Table 2 of the paper, grouped into stages as the reference builds them: (k, mid, out, SE ratio, stride).
REPGHOST_CFGS: list[list[BlockCfg]] = [
    [(3, 8, 16, 0, 1)],
    [(3, 24, 24, 0, 2)],
    [(3, 36, 24, 0, 1)],
    [(5, 36, 40, 0.25, 2)],
    [(5, 60, 40, 0.25, 1)],
    [(3, 120, 80, 0, 2)],
    [(3, 100, 80, 0, 1), (3, 120, 80, 0, 1), (3, 120, 80, 0, 1),
     (3, 240, 112, 0.25, 1), (3, 336, 112, 0.25, 1)],
    [(5, 336, 160, 0.25, 2)],
    [(5, 480, 160, 0, 1), (5, 480, 160, 0.25, 1), (5, 480, 160, 0, 1), (5, 480, 160, 0.25, 1)],
]


class RepGhostNet(GhostFamilyNet):
    """RepGhostNet at a given width multiplier; see :func:`repghostnet` for the options."""

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
        reparam: ReparamSpec = "bn",
        cheap_relu: bool = False,
        shortcut: bool = True,
        se: bool = True,
        deploy: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        branches = parse_reparam(reparam)
        cfgs = [[(k, m, c, r if se else 0.0, s) for k, m, c, r, s in stage] for stage in REPGHOST_CFGS]
        last_mid = cfgs[-1][-1][1]
        super().__init__(
            cfgs,
            RepGhostBottleneck,
            {"shortcut": shortcut, "reparam": branches, "cheap_relu": cheap_relu},
            width=width,
            final_channels=make_divisible(last_mid * width * 2, 4),
            num_classes=num_classes,
            dropout=dropout,
            deploy=deploy,
            features_only=features_only,
            out_indices=out_indices,
        )
        self.reparam = branches
        self.cheap_relu = cheap_relu
        self.use_shortcut = shortcut
        self.use_se = se

    def extra_repr(self) -> str:
        reparam = "+".join(self.reparam) or "none"
        return (f"width={self.width}, reparam={reparam}, cheap_relu={self.cheap_relu}, "
                f"shortcut={self.use_shortcut}, se={self.use_se}, deploy={self.deploy}")


def repghostnet(width: float = 1.0, **options: Any) -> RepGhostNet:
    """Build a RepGhostNet.

    Args:
        width: channel width multiplier (paper: 0.5, 0.58, 0.8, 1.0, 1.11, 1.3, 1.5, 2.0).
        num_classes: classifier outputs (1000).
        dropout: dropout before the classifier (0.2).
        reparam: re-parameterization branches of every RepGhost module (Table 6): ``"bn"`` (default),
            ``"identity"``, ``"dwconv1x1_bn"`` (1x1 depthwise conv + BN), ``"none"``, or a combination
            such as ``"bn+identity"`` / ``("bn", "dwconv1x1_bn")``.
        cheap_relu: the Table 6 "+ReLU" ablation: a ReLU after the cheap depthwise conv+BN, before the sum
            (not fusable; conversion raises ``NotFusable``).
        shortcut: keep the identity shortcuts (Table 7 ablation: ``False`` drops the 11 identity shortcuts,
            keeping the downsampling shortcut blocks).
        se: use the squeeze-and-excitation blocks of Table 2.
        deploy: build the inference form (every BN folded, one depthwise conv per RepGhost module).
        features_only: return multi-scale feature maps instead of logits.
        out_indices: feature levels to return; level ``i`` has stride ``2 ** (i + 1)`` (default strides
            4, 8, 16, 32).
    """
    return RepGhostNet(width=width, **options)


# Named widths of the paper (Table 3).  Each accepts the keyword options of :func:`repghostnet`.


@register_model
def repghostnet_0_5x(**options: Any) -> RepGhostNet:
    """RepGhostNet 0.5x (2.3M params, 43M MACs)."""
    return repghostnet(0.5, **options)


@register_model
def repghostnet_0_58x(**options: Any) -> RepGhostNet:
    """RepGhostNet 0.58x (2.5M params, 60M MACs)."""
    return repghostnet(0.58, **options)


@register_model
def repghostnet_0_8x(**options: Any) -> RepGhostNet:
    """RepGhostNet 0.8x (3.3M params, 96M MACs)."""
    return repghostnet(0.8, **options)


@register_model
def repghostnet_1_0x(**options: Any) -> RepGhostNet:
    """RepGhostNet 1.0x (4.1M params, 142M MACs)."""
    return repghostnet(1.0, **options)


@register_model
def repghostnet_1_11x(**options: Any) -> RepGhostNet:
    """RepGhostNet 1.11x (4.5M params, 170M MACs)."""
    return repghostnet(1.11, **options)


@register_model
def repghostnet_1_3x(**options: Any) -> RepGhostNet:
    """RepGhostNet 1.3x (5.5M params, 231M MACs)."""
    return repghostnet(1.3, **options)


@register_model
def repghostnet_1_5x(**options: Any) -> RepGhostNet:
    """RepGhostNet 1.5x (6.6M params, 301M MACs)."""
    return repghostnet(1.5, **options)


@register_model
def repghostnet_2_0x(**options: Any) -> RepGhostNet:
    """RepGhostNet 2.0x (9.8M params, 516M MACs)."""
    return repghostnet(2.0, **options)
