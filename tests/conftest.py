"""Suite-wide setup: ``@pytest.mark.slow`` sweeps run only on demand (``-m slow`` or REPARAM_SLOW=1), torch
runs single-threaded (small CPU convs gain nothing from two threads, and on a loaded 2-core machine OpenMP
spinning makes them 10-100x slower), and Hypothesis draws the same examples on every run (each test's seed
comes from the test itself), so a run of the suite, CI's included, passes or fails the same way every time;
REPARAM_HYPOTHESIS=explore draws new examples each run, to look for failures the fixed ones miss."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("REPARAM_HYPOTHESIS", "fixed"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr", "") or "") or os.environ.get("REPARAM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow sweep: run with -m slow or REPARAM_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
