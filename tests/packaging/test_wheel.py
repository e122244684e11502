"""The wheel (``pip wheel . --no-deps``): both packages with py.typed, the LICENSE, metadata, and a README that
tells wheel users how to install, not to run scripts/setup."""

from __future__ import annotations

import re
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def contents(wheel) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _dist_info(contents, name: str) -> bytes:
    (key,) = [k for k in contents if re.fullmatch(rf"reparam-[^/]+\.dist-info/{name}", k)]
    return contents[key]


def test_every_module_and_py_typed(contents):
    for package in ("reparam", "reparam_zoo"):
        modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert modules and modules <= set(contents), sorted(modules - set(contents))
        assert f"{package}/py.typed" in contents
    assert not [k for k in contents if k.startswith(("tests/", "scripts/", "benchmarks/"))]


def test_license_file_and_expression(contents):
    text = _dist_info(contents, "licenses/LICENSE").decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert text == (ROOT / "LICENSE").read_text()
    meta = Parser().parsestr(_dist_info(contents, "METADATA").decode())
    assert meta["License-Expression"] == "Apache-2.0"


def test_metadata_extras_and_entry_point(contents):
    meta = Parser().parsestr(_dist_info(contents, "METADATA").decode())
    assert set(meta.get_all("Provides-Extra")) >= {"torch", "onnx", "bench", "test", "all"}
    assert any(r.startswith("numpy") for r in meta.get_all("Requires-Dist"))
    assert "reparam = reparam.cli:main" in _dist_info(contents, "entry_points.txt").decode()


def _sections(markdown: str) -> list[tuple[str, str]]:
    """(heading, body) pairs of a markdown text, code fences respected."""
    sections, heading, body, fenced = [], "", [], False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            sections.append((heading, "\n".join(body)))
            heading, body = line, []
        else:
            body.append(line)
    return [*sections, (heading, "\n".join(body))]


def test_readme_in_the_wheel_tells_wheel_users_how_to_install(wheel, contents):
    readme = Parser().parsestr(_dist_info(contents, "METADATA").decode()).get_payload()
    sections = _sections(readme)
    install = [body for heading, body in sections if heading.lower().startswith("## install")]
    assert install and 'pip install "reparam[' in install[0]
    assert f"{wheel.name}[all]" in install[0], "the README names the wheel file of this version"
    for heading, body in sections:  # scripts/setup only where the checkout is the subject
        if "scripts/setup" in body:
            assert "checkout" in heading.lower(), f"{heading!r} tells wheel users to run scripts/setup"
