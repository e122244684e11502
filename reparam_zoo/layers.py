"""Building blocks shared by the zoo models: channel rounding, the SE gate, conv-BN-ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 4, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10%.

    This is the rounding rule of the MobileNet family, used by GhostNet and RepGhostNet to scale channel
    counts by the width multiplier: ``max(d, int(v + d/2) // d * d)``, bumped up by ``d`` when that falls
    below ``0.9 * v``.
    """
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear sigmoid ``relu6(x + 3) / 6`` (the SE gate of GhostNet and RepGhostNet)."""
    return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 reduce, ReLU, 1x1 expand, hard-sigmoid gate.

    The reduced width is ``make_divisible(channels * se_ratio, 4)``.  Submodule names (``conv_reduce``,
    ``conv_expand``) match the reference checkpoints.
    """

    def __init__(self, channels: int, se_ratio: float = 0.25, divisor: int = 4) -> None:
        super().__init__()
        reduced = make_divisible(channels * se_ratio, divisor)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x))))
        return x * hard_sigmoid(scale)


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    deploy: bool = False,
) -> tuple[nn.Conv2d, nn.Module]:
    """A ``(conv, norm)`` pair with "same" padding.

    Training form: bias-free conv and a BatchNorm.  Deploy form (``deploy=True``): the BN is folded away, so
    the conv carries a bias and the norm slot holds an ``nn.Identity`` (no state, same module name).
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                     bias=deploy)
    norm: nn.Module = nn.Identity() if deploy else nn.BatchNorm2d(out_channels)
    return conv, norm


class ConvBnAct(nn.Module):
    """Conv, BatchNorm, ReLU with reference key names ``conv``, ``bn1`` (the 960-channel layer)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, deploy: bool = False
    ) -> None:
        super().__init__()
        self.conv, self.bn1 = conv_bn(in_channels, out_channels, kernel_size, deploy=deploy)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))
