"""Shared helpers of the fx tests (imported as a plain module)."""

from __future__ import annotations

import os
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from torch import nn

import reparam
from reparam.fx import FuseReport
from reparam.testing import assert_equivalent, count_executed_ops, randomize_bn_

C = 4

_SCALE = float(os.environ.get("REPARAM_FX_EXAMPLES", "1"))
_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


def examples(n: int) -> settings:
    """Hypothesis settings with ``n`` examples (scaled by REPARAM_FX_EXAMPLES), no deadline."""
    return settings(max_examples=max(1, int(n * _SCALE)), deadline=None, suppress_health_check=_HEALTH,
                    print_blob=True)


KEYS = ("conv", "batch_norm", "linear")


def ops(model: nn.Module, inputs: Any) -> dict[str, int]:
    """Executed conv / batch-norm / linear counts."""
    c = count_executed_ops(model, inputs)
    return {k: c[k] for k in KEYS}


def fuse_checked(model: nn.Module, inputs: Any, *, rtol: float = 1e-5, example: bool = True, seed: int = 0,
                 randomize: bool = True, **kw: Any) -> tuple[nn.Module, FuseReport]:
    """Randomize BN stats, fuse (with example inputs unless ``example=False``), assert equivalence."""
    if randomize:
        randomize_bn_(model, seed)
    model.eval()
    fused, rep = reparam.fuse(model, inputs if example else None, report=True, **kw)
    assert_equivalent(model, fused, inputs, rtol=rtol)
    return fused, rep


def refusals(rep: FuseReport) -> str:
    return "\n".join(f"{w}: {why}" for w, why in rep.refused)


def skips(rep: FuseReport) -> str:
    return "\n".join(f"{w}: {why}" for w, why in rep.skipped)


def x_of(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def conv_bn(cin: int, cout: int, k, nd: int = 2, stride=1, padding=None, groups: int = 1, dilation=1,
            bias: bool = False) -> nn.Sequential:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[nd - 1]
    if padding is None:
        padding = tuple(dilation * (kk - 1) // 2 for kk in k) if isinstance(k, tuple) else dilation * (k - 1) // 2
    return nn.Sequential(conv(cin, cout, k, stride, padding, dilation, groups, bias=bias), bn(cout))


# --------------------------------------------------------------------------------------------- blocks


class RepVGG(nn.Module):
    """RepVGG: 3x3+BN, 1x1+BN and an identity BN, summed, then ReLU."""

    def __init__(self, c: int = C, stride: int = 1) -> None:
        super().__init__()
        self.dense = conv_bn(c, c, 3, stride=stride)
        self.one = conv_bn(c, c, 1, stride=stride, padding=0)
        self.identity = nn.BatchNorm2d(c) if stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class ACNet(nn.Module):
    """ACNet: square 3x3, vertical 3x1 and horizontal 1x3 conv+BN branches."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.square = conv_bn(c, c, 3)
        self.ver = conv_bn(c, c, (3, 1))
        self.hor = conv_bn(c, c, (1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.ver(x) + self.hor(x)
