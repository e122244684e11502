"""Zoo test setup: skip the ``@pytest.mark.slow`` sweeps unless asked for (``-m slow`` or REPARAM_SLOW=1),
run single-threaded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr", "") or "") or os.environ.get("REPARAM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow sweep: run with -m slow or REPARAM_SLOW=1")
    for item in items:
        if "slow" in item.keywords and _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread: these small CPU convs gain nothing from two, and on a loaded 2-core machine
    OpenMP spinning makes them 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
