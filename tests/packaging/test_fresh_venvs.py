"""Slow: the wheel in real fresh venvs, one per combination of extras (none, torch, onnx, all), every entry
point in its own interpreter, as a user would run it.  The default suite runs the same matrix with packages
hidden (tests/cli/test_extras.py).

pip installs from the machine's configured indexes with ``-c constraints.txt``, so torch is the pinned CPU
build; the venvs do not see the system site-packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from extras_matrix import COMBOS, ENTRY_POINTS, INSTALL, check

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = {"none": "", "torch": "[torch]", "onnx": "[onnx]", "all": "[all]"}

pytestmark = pytest.mark.slow


def _venv(path: Path, wheel: Path, extras: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    _pip(path, f"{wheel}{extras}")
    return path / "bin"


def _pip(venv: Path, *requirements: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout leaks in
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
                           str(ROOT / "constraints.txt"), *requirements], capture_output=True, text=True, timeout=1800,
                          env=env)
    assert proc.returncode == 0, proc.stderr


def _entry_point(bin_dir: Path, ep, tmp: Path) -> tuple[int, str, str, str | None]:
    args = ([str(bin_dir / "reparam"), *(a.replace("{tmp}", str(tmp)) for a in ep.argv)] if ep.argv
            else [str(bin_dir / "python"), "-c", ep.code])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else None
    return proc.returncode, proc.stdout, proc.stderr, (last if not ep.argv and proc.returncode else None)


@pytest.mark.parametrize("combo", list(COMBOS))
def test_entry_points_in_a_fresh_venv(combo, wheel, tmp_path):
    bin_dir = _venv(tmp_path / "venv", wheel, EXTRAS[combo])
    installed = COMBOS[combo]
    for ep in ENTRY_POINTS:
        check(ep, installed, *_entry_point(bin_dir, ep, tmp_path))
    if combo == "none":  # the advice works: run the pip line the message gives, and the command starts
        onnx_cli = next(ep for ep in ENTRY_POINTS if ep.name == "reparam onnx IN -o OUT")
        _, _, err, _ = _entry_point(bin_dir, onnx_cli, tmp_path)
        _pip(tmp_path / "venv", f"reparam[{INSTALL.search(err).group(1)}]")
        check(onnx_cli, frozenset({"onnx"}), *_entry_point(bin_dir, onnx_cli, tmp_path))
    if combo == "all":  # the installed demo runs to the end and writes its chart
        proc = subprocess.run([str(bin_dir / "reparam"), "demo", "--model", "repghostnet_0_5x", "--image-size", "32",
                               "--train-steps", "1", "--repeats", "1", "--out", str(tmp_path / "demo")],
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (tmp_path / "demo" / "demo.png").is_file()
