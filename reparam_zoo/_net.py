"""The skeleton shared by GhostNet and RepGhostNet: stem, staged bottlenecks, 1x1 conv, head, features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBnAct, conv_bn, make_divisible

# One bottleneck row of a stage config: kernel, mid channels, out channels, SE ratio, stride.
BlockCfg = tuple[int, int, int, float, int]
BlockFactory = Callable[..., nn.Module]

HEAD_CHANNELS = 1280


class GhostFamilyNet(nn.Module):
    """Stem conv, ``blocks`` (one ``nn.Sequential`` per config stage, plus a final 1x1 ConvBnAct), then
    global pool, 1x1 ``conv_head`` with bias, ReLU, dropout and a linear ``classifier``.

    With ``features_only=True`` the head (pool, ``conv_head``, ``classifier``) is not built and ``forward``
    returns the feature maps listed by ``out_indices`` (indices into :attr:`feature_info`; level ``i`` has
    stride ``2 ** (i + 1)``).
    """

    # State-dict prefixes a checkpoint may carry that this model has no slot for (dropped head).
    checkpoint_ignore_prefixes: tuple[str, ...] = ()

    def __init__(
        self,
        cfgs: Sequence[Sequence[BlockCfg]],
        block: BlockFactory,
        block_kwargs: dict[str, Any],
        width: float,
        final_channels: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
        deploy: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        super().__init__()
        self.width = width
        self.deploy = deploy
        self.dropout = dropout
        self.num_classes = num_classes
        self.features_only = features_only

        channels = make_divisible(16 * width, 4)
        self.conv_stem, self.bn1 = conv_bn(3, channels, 3, stride=2, deploy=deploy)
        self.act1 = nn.ReLU(inplace=True)

        stages: list[nn.Module] = []
        stage_strides: list[int] = []
        stride = 2
        for cfg in cfgs:
            layers = []
            for kernel, mid, out, se_ratio, s in cfg:
                out_ch = make_divisible(out * width, 4)
                mid_ch = make_divisible(mid * width, 4)
                layers.append(block(channels, mid_ch, out_ch, kernel, s, se_ratio=se_ratio, deploy=deploy,
                                    **block_kwargs))
                channels = out_ch
                stride *= s
            stages.append(nn.Sequential(*layers))
            stage_strides.append(stride)
        stages.append(nn.Sequential(ConvBnAct(channels, final_channels, 1, deploy=deploy)))
        stage_strides.append(stride)
        stage_channels = [_stage_out_channels(st) for st in stages[:-1]] + [final_channels]
        self.blocks = nn.Sequential(*stages)

        # A feature level is the last stage before the stride changes, and the final 1x1 stage.
        self.feature_info: list[dict[str, Any]] = []
        for i, s in enumerate(stage_strides):
            last = i == len(stage_strides) - 1
            if last or stage_strides[i + 1] != s:
                if last and self.feature_info and self.feature_info[-1]["reduction"] == s:
                    self.feature_info.pop()
                self.feature_info.append(
                    {"num_chs": stage_channels[i], "reduction": s, "module": f"blocks.{i}"})
        self._feature_stage = [int(f["module"].split(".")[1]) for f in self.feature_info]

        if features_only:
            levels = len(self.feature_info)
            out_indices = tuple(int(i) for i in out_indices)
            bad = [i for i in out_indices if not -levels <= i < levels]
            if bad or not out_indices:
                strides = [f["reduction"] for f in self.feature_info]
                raise ValueError(f"out_indices {out_indices} must be non-empty indices into the {levels} "
                                 f"feature levels (strides {strides})")
            self.out_indices = tuple(i % levels for i in out_indices)
            self.checkpoint_ignore_prefixes = ("conv_head.", "classifier.")
        else:
            self.out_indices = ()
            self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
            self.conv_head = nn.Conv2d(final_channels, HEAD_CHANNELS, 1, 1, 0, bias=True)
            self.act2 = nn.ReLU(inplace=True)
            self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and all bottleneck stages (the 960*width-channel, stride-32 map)."""
        return self.blocks(self.act1(self.bn1(self.conv_stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            wanted = {self._feature_stage[i]: i for i in self.out_indices}
            out: dict[int, torch.Tensor] = {}
            x = self.act1(self.bn1(self.conv_stem(x)))
            for idx, stage in enumerate(self.blocks):
                x = stage(x)
                if idx in wanted:
                    out[wanted[idx]] = x
                    if len(out) == len(wanted):
                        break
            return [out[i] for i in self.out_indices]
        x = self.global_pool(self.forward_features(x))
        x = self.act2(self.conv_head(x)).flatten(1)
        if self.dropout > 0.0:
            x = F.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)

    def convert_to_deploy(self) -> None:
        """Fold every BatchNorm and re-parameterization branch into convs, in place (see :func:`convert`)."""
        from .conversion import convert_

        convert_(self)


def _stage_out_channels(stage: nn.Sequential) -> int:
    return stage[-1].out_channels
