"""Checkpoints written by the reference implementation's converter (``convert.py``: only each RepGhost module's
cheap operation is fused with its BN branch, 48 BN are kept) load into ``deploy=True`` models directly.

The converted checkpoint is built here the way the reference converter builds it, from our training-form
model, with the BN fold written out in plain torch (not with the zoo's converter).
"""

from __future__ import annotations

import pytest
import torch

import reparam_zoo
from reparam_zoo import CheckpointError, load_checkpoint


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def _bn_scale_shift(state: dict, prefix: str, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    std = (state[f"{prefix}.running_var"] + eps).sqrt()
    scale = state[f"{prefix}.weight"] / std
    return scale, state[f"{prefix}.bias"] - state[f"{prefix}.running_mean"] * scale


def reference_convert(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the reference ``convert.py`` saves for a training-form RepGhostNet with BN re-param branches:
    per RepGhost module, cheap_operation = one depthwise conv with bias (cheap conv+BN plus the BN branch),
    no fusion_* modules; every other BN as it was."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, m in model.named_modules() if isinstance(m, reparam_zoo.RepGhostModule)]
    for p in modules:
        scale, shift = _bn_scale_shift(state, f"{p}.cheap_operation.1")
        kernel = state.pop(f"{p}.cheap_operation.0.weight") * scale[:, None, None, None]
        bias = shift.clone()
        b_scale, b_shift = _bn_scale_shift(state, f"{p}.fusion_bn.0")  # the BN-only branch: BN(identity)
        kernel[:, 0, kernel.shape[2] // 2, kernel.shape[3] // 2] += b_scale
        bias += b_shift
        for stale in [k for k in state if k.startswith((f"{p}.cheap_operation.1.", f"{p}.fusion_bn."))]:
            del state[stale]
        state[f"{p}.cheap_operation.weight"], state[f"{p}.cheap_operation.bias"] = kernel, bias
    return state


@pytest.fixture(scope="module")
def trained():
    return _randomize(reparam_zoo.repghostnet_1_0x())


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_reference_converted_checkpoint_loads_into_deploy_form(trained, tmp_path):
    converted = reference_convert(trained)
    assert sum(k.endswith(".running_mean") for k in converted) == 48  # the reference keeps these
    path = tmp_path / "repghostnet_1_0x_deploy.pth"
    torch.save(converted, path)  # convert.py saves a plain state dict

    deploy = reparam_zoo.repghostnet_1_0x(deploy=True)
    result = load_checkpoint(deploy, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_rel(deploy.eval()(x), trained(x)) < 1e-5


def test_reference_converted_checkpoint_into_training_form_says_what_to_do(trained):
    model = reparam_zoo.repghostnet_1_0x()
    before = model.conv_stem.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, reference_convert(trained))
    msg = str(info.value)
    assert "reference implementation's convert.py output" in msg and "48 BatchNorm layers are kept" in msg
    assert "build the model with deploy=True" in msg and "\n" not in msg
    assert torch.equal(model.conv_stem.weight, before)


def test_training_checkpoint_without_branches_loads_into_deploy_form():
    """GhostNet and RepGhostNet without re-param branches: the training checkpoint is every BN to fold (the
    reference converter leaves a branch-less RepGhost module as it is)."""
    for build in (reparam_zoo.ghostnet_0_5x, lambda **kw: reparam_zoo.repghostnet_0_5x(reparam="none", **kw)):
        train = _randomize(build())
        deploy = build(deploy=True)
        load_checkpoint(deploy, train.state_dict())
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert _max_rel(deploy.eval()(x), train(x)) < 1e-5


def test_training_checkpoint_with_branches_into_deploy_form_still_hints(trained):
    with pytest.raises(CheckpointError, match="build the model with deploy=False"):
        load_checkpoint(reparam_zoo.repghostnet_1_0x(deploy=True), trained.state_dict())


def test_a_wrong_width_reference_checkpoint_reports_the_mismatch(trained):
    with pytest.raises(CheckpointError, match=r"shape mismatch.*conv_stem\.weight"):
        load_checkpoint(reparam_zoo.repghostnet_0_5x(deploy=True), reference_convert(trained))
