"""Model construction, options, registry, feature extraction and trainability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam_zoo
from reparam_zoo import RepGhostModule, parse_reparam


def test_registry() -> None:
    names = reparam_zoo.list_models()
    for w in ("0_5x", "0_58x", "0_8x", "1_0x", "1_11x", "1_3x", "1_5x", "2_0x"):
        assert f"repghostnet_{w}" in names
        assert getattr(reparam_zoo, f"repghostnet_{w}") is not None
    assert {"ghostnet_0_5x", "ghostnet_1_0x", "ghostnet_1_3x"} <= set(names)
    assert reparam_zoo.list_models("ghostnet_*") == ["ghostnet_0_5x", "ghostnet_1_0x", "ghostnet_1_3x"]
    model = reparam_zoo.create_model("repghostnet_0_5x", num_classes=10)
    assert model.classifier.out_features == 10
    with pytest.raises(ValueError, match="unknown model 'repghostnet_9x'"):
        reparam_zoo.create_model("repghostnet_9x")


def test_general_factory_matches_named() -> None:
    a, b = reparam_zoo.repghostnet(width=1.11), reparam_zoo.repghostnet_1_11x()
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [
        (k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("bn", ("bn",)),
        ("none", ()),
        (None, ()),
        ((), ()),
        ("identity+bn", ("bn", "identity")),
        (["dwconv1x1_bn", "bn"], ("bn", "dwconv1x1_bn")),
        ("bn + identity + dwconv1x1_bn", ("bn", "identity", "dwconv1x1_bn")),
    ],
)
def test_parse_reparam(spec, expected) -> None:
    assert parse_reparam(spec) == expected


def test_parse_reparam_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown re-parameterization branch"):
        parse_reparam("bn+conv3x3")


def test_ablation_structures() -> None:
    m = reparam_zoo.repghostnet_0_5x(reparam="bn+dwconv1x1_bn")
    g1 = m.blocks[0][0].ghost1
    assert [type(x) for x in g1.fusion_conv] == [nn.Identity, nn.Conv2d]
    assert [type(x) for x in g1.fusion_bn] == [nn.BatchNorm2d, nn.BatchNorm2d]
    assert g1.fusion_conv[1].groups == g1.out_channels and g1.fusion_conv[1].kernel_size == (1, 1)
    none = reparam_zoo.repghostnet_0_5x(reparam="none")
    assert len(none.blocks[0][0].ghost1.fusion_bn) == 0
    # "+ReLU": a ReLU after the cheap op in modules with a trailing ReLU only (ghost1), as in the Ghost module
    relu = reparam_zoo.repghostnet_0_5x(cheap_relu=True)
    assert isinstance(relu.blocks[0][0].ghost1.cheap_act, nn.ReLU)
    assert isinstance(relu.blocks[0][0].ghost2.cheap_act, nn.Identity)
    # Table 7: 11 identity shortcuts dropped, downsampling shortcut blocks kept; params unchanged
    base, wo = reparam_zoo.repghostnet_0_5x(), reparam_zoo.repghostnet_0_5x(shortcut=False)
    blocks = [b for stage in wo.blocks[:-1] for b in stage]
    assert sum(not b.use_shortcut for b in blocks) == 11
    assert reparam_zoo.count_params(base) == reparam_zoo.count_params(wo)
    no_se = reparam_zoo.repghostnet_0_5x(se=False)
    assert not any(isinstance(x, reparam_zoo.SqueezeExcite) for x in no_se.modules())


def test_shortcut_off_changes_function() -> None:
    torch.manual_seed(0)
    a = reparam_zoo.repghostnet_0_5x().eval()
    b = reparam_zoo.repghostnet_0_5x(shortcut=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(a(x), b(x))


def test_deploy_structure() -> None:
    m = reparam_zoo.repghostnet_0_5x(deploy=True)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    mod = m.blocks[0][0].ghost1
    assert isinstance(mod, RepGhostModule)
    assert isinstance(mod.cheap_operation, nn.Conv2d) and mod.cheap_operation.bias is not None
    assert len(mod.fusion_conv) == 0 and len(mod.fusion_bn) == 0
    keys = set(m.state_dict())
    assert {"conv_stem.bias", "blocks.0.0.ghost1.primary_conv.0.bias",
            "blocks.0.0.ghost1.cheap_operation.weight", "blocks.1.0.conv_dw.bias", "blocks.1.0.shortcut.0.bias",
            "blocks.1.0.shortcut.2.bias", "blocks.9.0.conv.bias"} <= keys


@pytest.mark.parametrize("factory", [reparam_zoo.repghostnet_1_0x, reparam_zoo.ghostnet_1_0x])
def test_features_only(factory) -> None:
    model = factory(features_only=True).eval()
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16, 32]
    assert not hasattr(model, "classifier") and not hasattr(model, "conv_head")
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape[2:]) for f in feats] == [(128 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in feats] == [model.feature_info[i]["num_chs"] for i in (1, 2, 3, 4)]
    if factory is reparam_zoo.repghostnet_1_0x:
        assert [f.shape[1] for f in feats] == [24, 40, 112, 960]
    two = factory(features_only=True, out_indices=(0, -1)).eval()
    with torch.no_grad():
        a, b = two(x)
    assert a.shape[2:] == (64, 48) and b.shape[2:] == (4, 3)
    with pytest.raises(ValueError, match="out_indices"):
        factory(features_only=True, out_indices=(5,))


def test_training_forward_backward() -> None:
    torch.manual_seed(0)
    model = reparam_zoo.repghostnet_0_5x(reparam="bn+identity+dwconv1x1_bn", num_classes=7).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 5])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
