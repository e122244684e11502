"""Constants and helpers shared by the reparam_zoo tests (imported as a plain module)."""

from __future__ import annotations

import torch
from torch import nn

# Widths of the paper with (train params, MACs at 224x224) measured from the reference code (DESIGN.md).
REPGHOST_FACTS = {
    "repghostnet_0_5x": (2_313_968, 43.32),
    "repghostnet_0_58x": (2_546_388, 59.81),
    "repghostnet_0_8x": (3_278_968, 95.52),
    "repghostnet_1_0x": (4_073_604, 142.40),
    "repghostnet_1_11x": (4_539_984, 170.13),
    "repghostnet_1_3x": (5_478_612, 231.13),
    "repghostnet_1_5x": (6_575_336, 301.32),
    "repghostnet_2_0x": (9_796_124, 515.88),
}
GHOSTNET_PARAMS = {"ghostnet_0_5x": 2_587_292, "ghostnet_1_0x": 5_182_508, "ghostnet_1_3x": 7_358_820}

# Table 6 re-parameterization structures (the "+ReLU" row is tested separately).
REPARAM_VARIANTS = [
    "bn", "identity", "dwconv1x1_bn", "none", "bn+identity", "bn+dwconv1x1_bn", "identity+dwconv1x1_bn",
    "bn+identity+dwconv1x1_bn",
]


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
            elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == m.in_channels > 1:
                # 1x1 depthwise (re-parameterization) convs start at default init; make them distinctive
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 1.0)
    return model


def assert_close_outputs(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = max(a.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} exceeds {rel:.1e} * {scale:.3e}"
