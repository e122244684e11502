"""tests/core setup: skip the ``@pytest.mark.slow`` sweeps unless asked for (``-m slow`` or REPARAM_SLOW=1).
Helpers live in core_helpers.py (imported as a plain module); torch is optional here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr", "") or "") or os.environ.get("REPARAM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow sweep: run with -m slow or REPARAM_SLOW=1")
    for item in items:
        if "slow" in item.keywords and _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
