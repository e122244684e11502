"""The wheel, built once per session from a copy of the working tree (so the build leaves nothing in it)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                               ".ruff_cache", ".hypothesis", "reparam-demo", "out")


def _setuptools_ok() -> bool:
    """The venv's setuptools can build without isolation (what pyproject's build-system asks for)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    return int(version("setuptools").split(".")[0]) >= 77


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src, out = base / "src", base / "dist"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    # without isolation when the venv's setuptools will do: seconds instead of a fresh build env
    args = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(out), "-q",
            *(["--no-build-isolation"] if _setuptools_ok() else [])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (built,) = out.glob("reparam-*.whl")
    return built
