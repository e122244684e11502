"""The generic ``reparam.fuse`` reaches the structure of the zoo's hand-written deploy form (counted by executed
aten ops, not module attributes), and refuses the "+ReLU" ablation instead of mis-fusing it."""

from __future__ import annotations

import pytest
import torch
from zoo_helpers import REPARAM_VARIANTS, assert_close_outputs, randomize_bn_

import reparam
import reparam_zoo
from reparam.testing import count_executed_ops

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _structure(model: torch.nn.Module) -> dict[str, int]:
    c = count_executed_ops(model, X)
    return {k: int(c.get(k, 0)) for k in ("conv", "batch_norm", "add")}


@pytest.mark.parametrize("variant", REPARAM_VARIANTS)
def test_fuse_matches_hand_written_deploy(variant: str) -> None:
    model = randomize_bn_(reparam_zoo.repghostnet_0_5x(reparam=variant).double(), seed=5).eval()
    fused = reparam.fuse(model)
    hand = reparam_zoo.convert(model)
    with torch.no_grad():
        assert_close_outputs(model(X), fused(X), 1e-10)
    got, want = _structure(fused), _structure(hand)
    assert got["conv"] == want["conv"] and got["batch_norm"] == 0 == want["batch_norm"]
    # the SE gate's "+ 3" folds into conv_expand's bias, so fuse may leave fewer adds than the hand form
    assert got["add"] <= want["add"]


@pytest.mark.parametrize("factory", [reparam_zoo.ghostnet_0_5x])
def test_fuse_ghostnet_folds_every_bn(factory) -> None:
    model = randomize_bn_(factory().double(), seed=6).eval()
    fused = reparam.fuse(model)
    with torch.no_grad():
        assert_close_outputs(model(X), fused(X), 1e-10)
    assert _structure(fused)["conv"] == _structure(reparam_zoo.convert(model))["conv"]
    assert _structure(fused)["batch_norm"] == 0


def test_plus_relu_variant_is_refused_not_misfused() -> None:
    model = randomize_bn_(reparam_zoo.repghostnet_0_5x(reparam="bn", cheap_relu=True).double(), seed=7).eval()
    fused = reparam.fuse(model)
    with torch.no_grad():
        assert_close_outputs(model(X), fused(X), 1e-10)
    plain = randomize_bn_(reparam_zoo.repghostnet_0_5x(reparam="bn").double(), seed=7).eval()
    # the ReLU between the cheap depthwise conv and the fusion add keeps the BN branch separate in ghost1
    n_relu_modules = sum(1 for name, _ in model.named_modules() if name.endswith("ghost1"))
    assert _structure(fused)["add"] - _structure(reparam.fuse(plain))["add"] == n_relu_modules
    assert _structure(fused)["conv"] == _structure(reparam.fuse(plain))["conv"]
