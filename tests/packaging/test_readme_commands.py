"""The README's two fresh-machine commands exist as written, and CI runs exactly the test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = "scripts/setup && .venv/bin/reparam demo"
TESTS = "scripts/setup && .venv/bin/python -m pytest -q"


def _bash_blocks(text: str) -> list[str]:
    return [line.strip() for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
            for line in block.splitlines()]


def test_readme_has_the_two_commands():
    lines = _bash_blocks((ROOT / "README.md").read_text())
    assert DEMO in lines and TESTS in lines


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in script if line.strip() and not line.lstrip().startswith("#")]
    assert TESTS in commands, commands


def test_setup_pins_torch_with_the_constraints_file():
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "-c constraints.txt" in setup
    assert re.search(r"^torch==\d+\.\d+\.\d+$", (ROOT / "constraints.txt").read_text(), re.M)
