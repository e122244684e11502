"""Training form -> deploy form: exact equivalence, deploy layout, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_helpers import REPARAM_VARIANTS, REPGHOST_FACTS, assert_close_outputs, randomize_bn_

import reparam_zoo
from reparam.core.errors import NotFusable, ReparamError

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _check_equivalent(model: nn.Module, x: torch.Tensor = X64, rel: float = 1e-10) -> nn.Module:
    model.eval()
    deployed = reparam_zoo.convert(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    with torch.no_grad():
        assert_close_outputs(model(x), deployed(x), rel)
    return deployed


def _deploy_twin(model: nn.Module, factory, **options) -> nn.Module:
    twin = factory(deploy=True, **options).to(next(model.parameters()).dtype)
    reparam_zoo.load_checkpoint(twin, {"state_dict": model.state_dict()}, strict=True)
    return twin.eval()


@pytest.mark.parametrize("variant", REPARAM_VARIANTS)
def test_repghostnet_1_0x_variants_equivalent(variant: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn_(reparam_zoo.repghostnet_1_0x(reparam=variant).double(), seed=3)
    deployed = _check_equivalent(model)
    twin = _deploy_twin(deployed, reparam_zoo.repghostnet_1_0x)
    with torch.no_grad():
        assert torch.equal(twin(X64), deployed(X64))


@pytest.mark.parametrize(
    "options", [{"shortcut": False}, {"se": False}, {"reparam": "none", "cheap_relu": True}])
def test_repghostnet_other_ablations_equivalent(options: dict) -> None:
    torch.manual_seed(0)
    model = randomize_bn_(reparam_zoo.repghostnet_1_0x(**options).double(), seed=4)
    deployed = _check_equivalent(model)
    _deploy_twin(deployed, reparam_zoo.repghostnet_1_0x, **options)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPGHOST_FACTS))
@pytest.mark.parametrize("variant", REPARAM_VARIANTS)
def test_all_widths_all_variants_equivalent(name: str, variant: str) -> None:
    torch.manual_seed(0)
    factory = getattr(reparam_zoo, name)
    model = randomize_bn_(factory(reparam=variant).double(), seed=5)
    deployed = _check_equivalent(model)
    _deploy_twin(deployed, factory)


def test_float32_conversion_is_tight() -> None:
    torch.manual_seed(0)
    model = randomize_bn_(reparam_zoo.repghostnet_0_5x(), seed=6).eval()
    deployed = reparam_zoo.convert(model)
    assert deployed.conv_stem.weight.dtype == torch.float32
    with torch.no_grad():
        assert_close_outputs(model(X64.float()), deployed(X64.float()), 1e-4)


def test_convert_after_training_steps() -> None:
    torch.manual_seed(0)
    model = reparam_zoo.repghostnet_0_5x(reparam="bn+dwconv1x1_bn", num_classes=10).double().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert model.training
    deployed = reparam_zoo.convert(model)
    assert model.training and deployed.training, "the training flag is kept"
    _check_equivalent(model)
    # the deploy model is trainable too (no BN left; dropout only)
    deployed.train()
    nn.functional.cross_entropy(deployed(X64), torch.tensor([1, 2])).backward()


def test_convert_to_deploy_in_place_and_copy_leaves_original() -> None:
    model = randomize_bn_(reparam_zoo.repghostnet_0_5x().double(), seed=7).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = reparam_zoo.convert(model)
    assert copy is not model
    assert set(model.state_dict()) == set(before), "convert() must not touch its argument"
    with torch.no_grad():
        expected = model(X64)
    model.convert_to_deploy()
    assert model.deploy and model.blocks[0][0].ghost1.deploy
    assert set(model.state_dict()) == set(copy.state_dict())
    with torch.no_grad():
        assert_close_outputs(expected, model(X64), 1e-10)
    model.convert_to_deploy()  # idempotent on a deploy model
    with torch.no_grad():
        assert_close_outputs(expected, model(X64), 1e-10)


def test_plus_relu_variant_refused() -> None:
    model = reparam_zoo.repghostnet_0_5x(cheap_relu=True).eval()
    keys = list(model.state_dict())
    with pytest.raises(NotFusable, match=r"blocks\.0\.0\.ghost1.*ReLU.*not a linear"):
        reparam_zoo.convert(model)
    with pytest.raises(NotFusable):
        model.convert_to_deploy()
    assert list(model.state_dict()) == keys, "a refused conversion leaves the model unchanged"
    assert isinstance(model.blocks[0][0].ghost1.fusion_bn[0], nn.BatchNorm2d)


@pytest.mark.parametrize("factory", [reparam_zoo.ghostnet_0_5x, reparam_zoo.ghostnet_1_0x])
def test_ghostnet_bn_folding(factory) -> None:
    model = randomize_bn_(factory().double(), seed=8)
    deployed = _check_equivalent(model)
    _deploy_twin(deployed, factory)


def test_features_only_conversion() -> None:
    model = randomize_bn_(reparam_zoo.repghostnet_1_0x(features_only=True).double(), seed=9).eval()
    deployed = reparam_zoo.convert(model)
    with torch.no_grad():
        for a, b in zip(model(X64), deployed(X64)):
            assert_close_outputs(a, b, 1e-10)


def test_non_zoo_model_refused() -> None:
    with pytest.raises(ReparamError, match=r"reparam\.fuse"):
        reparam_zoo.convert(nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)))
