"""GhostNet (C-GhostNet, Han et al., 2020): the concatenation baseline RepGhostNet is compared to.

Ghost module with ratio 2: a 1x1 conv makes ``ceil(out/2)`` intrinsic maps, a cheap depthwise conv makes as
many "ghost" maps, and the two are concatenated (then cropped to ``out``).  Module names follow the reference
implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._net import BlockCfg, GhostFamilyNet
from .layers import SqueezeExcite, conv_bn, make_divisible
from .registry import register_model

__all__ = [
    "GhostBottleneck",
    "GhostModule",
    "GhostNet",
    "ghostnet",
    "ghostnet_0_5x",
    "ghostnet_1_0x",
    "ghostnet_1_3x",
]


class GhostModule(nn.Module):
    """``cat(p, cheap_operation(p))[:, :out]`` with ``p = primary_conv(x)``; ReLU in both halves if ``relu``.

    Deploy form: BatchNorms folded into the convs (conv with bias, ``nn.Identity`` in the BN slot).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        relu: bool = True,
        ratio: int = 2,
        dw_size: int = 3,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        init_channels = math.ceil(out_channels / ratio)
        new_channels = init_channels * (ratio - 1)
        conv, norm = conv_bn(in_channels, init_channels, 1, deploy=deploy)
        self.primary_conv = nn.Sequential(conv, norm, nn.ReLU(inplace=True) if relu else nn.Sequential())
        conv, norm = conv_bn(init_channels, new_channels, dw_size, groups=init_channels, deploy=deploy)
        self.cheap_operation = nn.Sequential(conv, norm, nn.ReLU(inplace=True) if relu else nn.Sequential())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.out_channels]


class GhostBottleneck(nn.Module):
    """Ghost module (ReLU), optional stride-2 depthwise conv+BN, optional SE, Ghost module (linear), shortcut
    (identity when ``in == out`` and stride 1, else depthwise kxk conv+BN then 1x1 conv+BN)."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        dw_kernel_size: int = 3,
        stride: int = 1,
        se_ratio: float = 0.0,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.ghost1 = GhostModule(in_channels, mid_channels, relu=True, deploy=deploy)
        if stride > 1:
            self.conv_dw, self.bn_dw = conv_bn(mid_channels, mid_channels, dw_kernel_size, stride=stride,
                                               groups=mid_channels, deploy=deploy)
        self.se = SqueezeExcite(mid_channels, se_ratio) if se_ratio and se_ratio > 0 else None
        self.ghost2 = GhostModule(mid_channels, out_channels, relu=False, deploy=deploy)
        if in_channels == out_channels and stride == 1:
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
        return self.ghost2(y) + self.shortcut(x)


# GhostNet 1.0x configuration: (k, mid, out, SE ratio, stride) per bottleneck, grouped as the reference does.
GHOSTNET_CFGS: list[list[BlockCfg]] = [
    [(3, 16, 16, 0, 1)],
    [(3, 48, 24, 0, 2)],
    [(3, 72, 24, 0, 1)],
    [(5, 72, 40, 0.25, 2)],
    [(5, 120, 40, 0.25, 1)],
    [(3, 240, 80, 0, 2)],
    [(3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1),
     (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)],
    [(5, 672, 160, 0.25, 2)],
    [(5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)],
]


class GhostNet(GhostFamilyNet):
    """GhostNet at a given width multiplier; see :func:`ghostnet`."""

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
        se: bool = True,
        deploy: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        cfgs = [[(k, m, c, r if se else 0.0, s) for k, m, c, r, s in stage] for stage in GHOSTNET_CFGS]
        last_mid = cfgs[-1][-1][1]
        super().__init__(
            cfgs,
            GhostBottleneck,
            {},
            width=width,
            final_channels=make_divisible(last_mid * width, 4),
            num_classes=num_classes,
            dropout=dropout,
            deploy=deploy,
            features_only=features_only,
            out_indices=out_indices,
        )
        self.use_se = se

    def extra_repr(self) -> str:
        return f"width={self.width}, se={self.use_se}, deploy={self.deploy}"


def ghostnet(width: float = 1.0, **options: Any) -> GhostNet:
    """Build a GhostNet.

    Options: ``num_classes`` (1000), ``dropout`` (0.2), ``se`` (True), ``deploy`` (False; True builds the
    BN-folded form), ``features_only`` and ``out_indices`` as for :func:`reparam_zoo.repghostnet`.
    """
    return GhostNet(width=width, **options)


@register_model
def ghostnet_0_5x(**options: Any) -> GhostNet:
    """GhostNet 0.5x (2.6M params)."""
    return ghostnet(0.5, **options)


@register_model
def ghostnet_1_0x(**options: Any) -> GhostNet:
    """GhostNet 1.0x (5.2M params)."""
    return ghostnet(1.0, **options)


@register_model
def ghostnet_1_3x(**options: Any) -> GhostNet:
    """GhostNet 1.3x (7.4M params)."""
    return ghostnet(1.3, **options)
