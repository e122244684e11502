"""Parameter and MAC counts: the profiler's convention and the published numbers of every model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_helpers import GHOSTNET_PARAMS, REPGHOST_FACTS

import reparam_zoo
from reparam_zoo.cli import profile_main


def _check_facts(name: str) -> None:
    params, macs_m = REPGHOST_FACTS[name]
    model = reparam_zoo.create_model(name)
    macs, counted = reparam_zoo.profile(model, (1, 3, 224, 224))
    assert counted == params
    assert round(macs / 1e6, 2) == macs_m


def test_repghostnet_1_0x_params_and_macs() -> None:
    _check_facts("repghostnet_1_0x")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPGHOST_FACTS))
def test_repghostnet_all_widths_params_and_macs(name: str) -> None:
    _check_facts(name)


@pytest.mark.parametrize("name", sorted(GHOSTNET_PARAMS))
def test_ghostnet_params(name: str) -> None:
    assert reparam_zoo.count_params(reparam_zoo.create_model(name)) == GHOSTNET_PARAMS[name]


def test_profile_convention_on_arbitrary_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),          # 8*16*16 * (3*9 + 1)
        nn.BatchNorm2d(8),                                   # 0
        nn.ReLU(),                                           # 0
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False),  # 8*8*8 * (2*9)
        nn.ConvTranspose2d(8, 4, 2, stride=2),               # 4*16*16 * (8*4 + 1)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),                                    # 4 * 10
    )
    model.train()
    macs, params = reparam_zoo.profile(model, (1, 3, 16, 16))
    assert macs == 2048 * 28 + 512 * 18 + 1024 * 33 + 40
    assert params == (8 * 27 + 8) + 16 + 8 * 2 * 9 + (8 * 4 * 4 + 4) + (40 + 10)
    assert model.training, "profile must restore the training flag"
    assert all(not m._forward_hooks for m in model.modules()), "hooks must be removed"


def test_profile_counts_shared_module_per_call_and_batch() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.fc(x)

    macs, params = reparam_zoo.profile(Twice(), (2, 5))
    assert macs == 2 * (5 * 2 * 3)
    assert params == 18


def test_profile_table_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    table = reparam_zoo.profile_table(["repghostnet_0_5x", "ghostnet_0_5x"])
    assert "2,313,968" in table and "43.32M" in table and "2,587,292" in table
    assert profile_main(["repghostnet_0_5x", "--input-size", "224", "224"]) == 0
    out = capsys.readouterr().out
    assert "repghostnet_0_5x" in out and "43.32M" in out
    assert profile_main(["no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: reparam profile") and "Traceback" not in err
    assert err.splitlines()[-1] == ("reparam profile: error: unknown model(s) no_such_model; "
                                    "`reparam profile --list` lists them")
    assert profile_main(["--list"]) == 0
    assert capsys.readouterr().out.split() == reparam_zoo.list_models()
