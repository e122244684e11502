"""docs/api.md lists every public name and is regenerated whenever the public API changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_page_is_current() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
