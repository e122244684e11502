"""Suite-wide setup: ``@pytest.mark.slow`` sweeps run only on demand (``-m slow`` or REPARAM_SLOW=1), and torch
runs single-threaded (small CPU convs gain nothing from two threads, and on a loaded 2-core machine OpenMP
spinning makes them 10-100x slower)."""

from __future__ import annotations

import os

import pytest


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
