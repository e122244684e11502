"""Checkpoint compatibility with the reference implementation's key layout, and loader edge cases.

The expected state dict is generated here from the documented layout (Table 2 plus the reference's rounding
and module names), not from the zoo model, so a renamed or reshaped module fails these tests.
"""

from __future__ import annotations

import math

import pytest
import torch

import reparam_zoo
from reparam.core.errors import ReparamError
from reparam_zoo import CheckpointError, load_checkpoint

# (kernel, mid, out, SE, stride) per block, grouped into the nine stages the reference builds.
REPGHOST_TABLE2 = [
    [(3, 8, 16, False, 1)],
    [(3, 24, 24, False, 2)],
    [(3, 36, 24, False, 1)],
    [(5, 36, 40, True, 2)],
    [(5, 60, 40, True, 1)],
    [(3, 120, 80, False, 2)],
    [(3, 100, 80, False, 1), (3, 120, 80, False, 1), (3, 120, 80, False, 1), (3, 240, 112, True, 1),
     (3, 336, 112, True, 1)],
    [(5, 336, 160, True, 2)],
    [(5, 480, 160, False, 1), (5, 480, 160, True, 1), (5, 480, 160, False, 1), (5, 480, 160, True, 1)],
]
GHOSTNET_TABLE = [
    [(3, 16, 16, False, 1)],
    [(3, 48, 24, False, 2)],
    [(3, 72, 24, False, 1)],
    [(5, 72, 40, True, 2)],
    [(5, 120, 40, True, 1)],
    [(3, 240, 80, False, 2)],
    [(3, 200, 80, False, 1), (3, 184, 80, False, 1), (3, 184, 80, False, 1), (3, 480, 112, True, 1),
     (3, 672, 112, True, 1)],
    [(5, 672, 160, True, 2)],
    [(5, 960, 160, False, 1), (5, 960, 160, True, 1), (5, 960, 160, False, 1), (5, 960, 160, True, 1)],
]


def _round(v: float, d: int = 4) -> int:
    r = max(d, int(v + d / 2) // d * d)
    return r + d if r < 0.9 * v else r


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())]


def _layout(table, width: float, ghost: str) -> list[tuple[str, tuple[int, ...]]]:
    """Reference key order and shapes; ghost='rep' (RepGhost, BN re-param branch) or 'cat' (GhostNet)."""
    keys: list[tuple[str, tuple[int, ...]]] = []
    stem = _round(16 * width)
    keys += [("conv_stem.weight", (stem, 3, 3, 3)), *_bn("bn1", stem)]

    def module(p: str, cin: int, cout: int) -> None:
        init = cout if ghost == "rep" else math.ceil(cout / 2)
        keys.extend([(f"{p}.primary_conv.0.weight", (init, cin, 1, 1)), *_bn(f"{p}.primary_conv.1", init)])
        if ghost == "rep":
            keys.extend(_bn(f"{p}.fusion_bn.0", init))
        keys.append((f"{p}.cheap_operation.0.weight", (init, 1, 3, 3)))
        keys.extend(_bn(f"{p}.cheap_operation.1", init))

    cin = stem
    for s, stage in enumerate(table):
        for b, (k, mid, out, se, stride) in enumerate(stage):
            p = f"blocks.{s}.{b}"
            mid_c, out_c = _round(mid * width), _round(out * width)
            module(f"{p}.ghost1", cin, mid_c)
            if stride > 1:
                keys += [(f"{p}.conv_dw.weight", (mid_c, 1, k, k)), *_bn(f"{p}.bn_dw", mid_c)]
            if se:
                red = _round(mid_c * 0.25)
                keys += [(f"{p}.se.conv_reduce.weight", (red, mid_c, 1, 1)),
                         (f"{p}.se.conv_reduce.bias", (red,)),
                         (f"{p}.se.conv_expand.weight", (mid_c, red, 1, 1)),
                         (f"{p}.se.conv_expand.bias", (mid_c,))]
            module(f"{p}.ghost2", mid_c, out_c)
            if not (cin == out_c and stride == 1):
                keys += [(f"{p}.shortcut.0.weight", (cin, 1, k, k)), *_bn(f"{p}.shortcut.1", cin),
                         (f"{p}.shortcut.2.weight", (out_c, cin, 1, 1)), *_bn(f"{p}.shortcut.3", out_c)]
            cin = out_c
    last = _round(960 * width)
    keys += [("blocks.9.0.conv.weight", (last, cin, 1, 1)), *_bn("blocks.9.0.bn1", last)]
    keys += [("conv_head.weight", (1280, last, 1, 1)), ("conv_head.bias", (1280,)),
             ("classifier.weight", (1000, 1280)), ("classifier.bias", (1000,))]
    return keys


def _synthetic(layout, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout:
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1234)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


@pytest.fixture(scope="module")
def ref_state() -> dict[str, torch.Tensor]:
    return _synthetic(_layout(REPGHOST_TABLE2, 1.0, "rep"))


def test_repghostnet_keys_shapes_and_order_match_reference() -> None:
    model = reparam_zoo.repghostnet_1_0x()
    expected = _layout(REPGHOST_TABLE2, 1.0, "rep")
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected


@pytest.mark.parametrize("width", [0.5, 1.3])
def test_ghostnet_keys_shapes_match_reference(width: float) -> None:
    model = reparam_zoo.ghostnet(width)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == _layout(GHOSTNET_TABLE, width, "cat")


def test_load_wrapped_prefixed_checkpoint(ref_state: dict[str, torch.Tensor]) -> None:
    ema = {f"module.{k}": v for k, v in ref_state.items()}
    plain = {f"module.{k}": torch.zeros_like(v) for k, v in ref_state.items()}
    model = reparam_zoo.repghostnet_1_0x()
    result = load_checkpoint(model, {"state_dict": plain, "state_dict_ema": ema, "epoch": 299})
    assert result.missing_keys == [] and result.unexpected_keys == []
    sd = model.state_dict()
    for k, v in ref_state.items():
        assert torch.equal(sd[k], v), k
    # prefer_ema=False takes the plain weights
    load_checkpoint(model, {"state_dict": plain, "state_dict_ema": ema}, prefer_ema=False)
    assert float(model.conv_stem.weight.detach().abs().sum()) == 0.0


def test_load_from_pth_file(tmp_path, ref_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "repghostnet_1_0x.pth"
    torch.save({"state_dict": ref_state}, path)
    model = reparam_zoo.create_model("repghostnet_1_0x")
    load_checkpoint(model, path)
    assert torch.equal(model.classifier.weight, ref_state["classifier.weight"])
    load_checkpoint(model, str(path))


def test_missing_and_unexpected_keys_are_listed(ref_state: dict[str, torch.Tensor]) -> None:
    broken = dict(ref_state)
    del broken["blocks.3.0.se.conv_reduce.weight"]
    broken["blocks.3.0.extra.weight"] = torch.zeros(1)
    model = reparam_zoo.repghostnet_1_0x()
    before = model.conv_stem.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, broken)
    msg = str(info.value)
    assert "1 missing key(s): blocks.3.0.se.conv_reduce.weight" in msg
    assert "1 unexpected key(s): blocks.3.0.extra.weight" in msg
    assert isinstance(info.value, ReparamError) and isinstance(info.value, ValueError)
    assert torch.equal(model.conv_stem.weight, before), "a failed strict load must not modify the model"
    result = load_checkpoint(model, broken, strict=False)
    assert result.missing_keys == ["blocks.3.0.se.conv_reduce.weight"]
    assert result.unexpected_keys == ["blocks.3.0.extra.weight"]
    assert torch.equal(model.conv_stem.weight, ref_state["conv_stem.weight"])


def test_wrong_width_reports_shape_mismatch(ref_state: dict[str, torch.Tensor]) -> None:
    pattern = r"shape mismatch.*conv_stem\.weight: checkpoint \(16, 3, 3, 3\) vs model \(8, 3, 3, 3\)"
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(reparam_zoo.repghostnet_0_5x(), ref_state, strict=False)


def test_missing_file_and_bad_input(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(reparam_zoo.repghostnet_0_5x(), tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_checkpoint(reparam_zoo.repghostnet_0_5x(), {"conv_stem.weight": [1, 2]})


def test_training_checkpoint_into_deploy_model_hints(ref_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="deploy=False"):
        load_checkpoint(reparam_zoo.repghostnet_1_0x(deploy=True), ref_state)


def test_features_only_ignores_head(ref_state: dict[str, torch.Tensor]) -> None:
    model = reparam_zoo.repghostnet_1_0x(features_only=True)
    load_checkpoint(model, ref_state)
    assert torch.equal(model.blocks[9][0].conv.weight, ref_state["blocks.9.0.conv.weight"])
