"""Real third-party models (timm, torchvision): never wrong, never broken, never costlier, every BN left with a
reason, and the families with a hand-written deploy form fused to it.  Skipped where timm / torchvision are
not installed (the project's CI venv has neither); run them in the venv of ../shared/scripts/thirdparty-env."""

from __future__ import annotations

import copy

import pytest
import torch

import reparam
from reparam.testing import assert_outputs_close, count_executed_ops, randomize_bn_

pytestmark = pytest.mark.thirdparty
timm = pytest.importorskip("timm")

# (model, timm's deploy form has 0 BN): a re-parameterizable member of each family, and a plain net of each
# idiom the issue names (BatchNormAct asserts, TF-same convs, MixConv, LeViT tokens, ShuffleNet-like shuffles)
MODELS = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "ghostnetv3_050", "repghostnet_050", "resnet18",
          "tf_efficientnet_b0", "mixnet_s", "levit_128s", "resnest14d", "densenet121", "resnetv2_50",
          "regnetx_002", "efficientvit_m0", "nfnet_l0"]


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    randomize_bn_(model, 0)
    return model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_timm_model(name: str) -> None:
    model = _model(name)
    x = torch.randn(1, 3, 224, 224)
    before = count_executed_ops(model, x)
    fused = reparam.fuse(model, x)
    rep = fused.reparam_report
    after = count_executed_ops(fused, x)
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        truth, own, got = ref64(x.double()), model(x), fused(x)
    own_err = float((own.double() - truth).abs().max() / truth.abs().max())
    got_err = float((got.double() - truth).abs().max() / truth.abs().max())
    assert got_err <= max(4 * own_err, 1e-5), rep  # as exact as the float32 model itself
    assert after["conv"] <= before["conv"], rep
    assert after["batch_norm"] == len(rep.bn_left), rep  # every BN that runs has a reason
    assert all(x.reason for x in rep.bn_left)
    if hasattr(timm.utils, "reparameterize_model") and any(hasattr(m, "reparameterize") for m in model.modules()):
        deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
        theirs = count_executed_ops(deploy, x)
        assert after["conv"] <= theirs["conv"] and after["batch_norm"] <= theirs["batch_norm"], (rep, theirs)


def test_fuse_features_of_a_timm_model() -> None:
    """docs/models.md: fuse a module whose forward is the model's forward_features."""
    model = _model("repvgg_a0")

    class Features(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.forward_features(x)

    x = torch.randn(1, 3, 224, 224)
    features = reparam.fuse(Features(model), x)
    assert_outputs_close(model.forward_features(x), features(x), rtol=1e-4)
    assert count_executed_ops(features, x)["batch_norm"] == 0


def test_torchvision_detection_fuses_in_parts() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    randomize_bn_(model, 0)
    model.eval()
    images = [torch.rand(3, 320, 320)]
    fused = reparam.fuse(model, (images,))
    assert isinstance(fused, type(model))
    assert count_executed_ops(fused, (images,))["batch_norm"] == 0, fused.reparam_report
    with torch.no_grad():
        fused(images)  # it runs, and keeps the detection API
