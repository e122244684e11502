"""Training-time re-parameterizable blocks of the common families, each with a hand-written deploy form.

They are plain PyTorch modules with no folding code of their own: ``reparam.fuse`` collapses them.  The
``deploy=True`` forms (a single conv) exist to measure that the fused model is as fast as a model written
directly in deploy form.  DBB's 1x1->kxk branch is written without DBB's custom border-padding layer:
a bias-free 1x1 conv followed by the padded kxk conv and its BN, which folds exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0,
            groups: int = 1) -> nn.Sequential:
    """A bias-free conv followed by BN, the branch every family is built from."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


def _deploy_conv(cin: int, cout: int, k: int, stride: int, groups: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)


class RepVGGBlock(nn.Module):
    """RepVGG: 3x3 conv+BN + 1x1 conv+BN (+ BN identity when shapes allow), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.reparam = _deploy_conv(cin, cout, 3, stride, groups)
        else:
            self.dense = conv_bn(cin, cout, 3, stride, 1, groups)
            self.pointwise = conv_bn(cin, cout, 1, stride, 0, groups)
            self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.reparam(x))
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class ACBlock(nn.Module):
    """ACNet: 3x3 + 1x3 + 3x1 asymmetric convs, each with BN, summed."""

    def __init__(self, cin: int, cout: int, stride: int = 1, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.reparam = _deploy_conv(cin, cout, 3, stride, 1)
        else:
            self.square = conv_bn(cin, cout, 3, stride, 1)
            self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
            self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.reparam(x))
        return self.act(self.square(x) + self.hor(x) + self.ver(x))


class DBBlock(nn.Module):
    """Diverse-branch block: kxk+BN, 1x1+BN, 1x1->kxk+BN, avg-pool branch (1x1 conv first, unpadded pool)."""

    def __init__(self, cin: int, cout: int, k: int = 3, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.reparam = _deploy_conv(cin, cout, k, 1, 1)
        else:
            self.origin = conv_bn(cin, cout, k, 1, k // 2)
            self.one = conv_bn(cin, cout, 1)
            self.chain = nn.Sequential(nn.Conv2d(cin, cin, 1, bias=False),
                                       nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout))
            self.avg = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(k, 1, k // 2),
                                     nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.reparam(x))
        return self.act(self.origin(x) + self.one(x) + self.chain(x) + self.avg(x))


class MobileOneBlock(nn.Module):
    """MobileOne: ``k`` over-parameterized conv+BN branches, a 1x1 scale branch, a BN skip branch."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, k: int = 4,
                 deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.reparam = _deploy_conv(cin, cout, kernel, stride, groups)
        else:
            self.branches = nn.ModuleList(conv_bn(cin, cout, kernel, stride, kernel // 2, groups) for _ in range(k))
            self.scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
            self.skip = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.reparam(x))
        out = sum(b(x) for b in self.branches)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.skip is not None:
            out += self.skip(x)
        return self.act(out)


class RepVGGNet(nn.Module):
    """A RepVGG-style classifier: stages of RepVGG blocks, stride 2 at each stage's first block."""

    def __init__(self, blocks: tuple[int, ...] = (1, 4, 6, 16, 1), widths: tuple[int, ...] = (64, 192, 384, 768, 2560),
                 num_classes: int = 1000, deploy: bool = False) -> None:
        super().__init__()
        layers, cin = [], 3
        for n, cout in zip(blocks, widths):
            for i in range(n):
                layers.append(RepVGGBlock(cin, cout, 2 if i == 0 else 1, deploy=deploy))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Bottleneck(nn.Module):
    """A ResNet-50 bottleneck; ``deploy=True`` is the same network with every BN folded by hand."""

    def __init__(self, cin: int, mid: int, stride: int, deploy: bool = False) -> None:
        super().__init__()
        cout = mid * 4

        def cb(a, b, k, s):
            return nn.Conv2d(a, b, k, s, k // 2, bias=True) if deploy else conv_bn(a, b, k, s, k // 2)

        self.conv1, self.conv2, self.conv3 = cb(cin, mid, 1, 1), cb(mid, mid, 3, stride), cb(mid, cout, 1, 1)
        self.down = cb(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNet50Like(nn.Module):
    """ResNet-50's layout (3, 4, 6, 3 bottlenecks) for fusion benchmarks."""

    def __init__(self, num_classes: int = 1000, deploy: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 7, 2, 3, bias=True) if deploy else conv_bn(3, 64, 7, 2, 3)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for i, (n, mid) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            for j in range(n):
                layers.append(Bottleneck(cin, mid, 2 if j == 0 and i > 0 else 1, deploy))
                cin = mid * 4
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.pool(self.relu(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
