"""Every entry point, the extras it needs, and what it must print with and without them.

Shared by the default-suite check (packages hidden by ``blocker/sitecustomize.py``) and the slow check in
real fresh venvs (``tests/packaging/test_fresh_venvs.py``).  ``{tmp}`` in arguments is a scratch directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: the extras combinations a user can have installed
COMBOS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "torch": frozenset({"torch"}),
    "onnx": frozenset({"onnx"}),
    "all": frozenset({"torch", "onnx", "bench"}),
}
#: top-level modules each extra installs (what the blocker hides when the extra is absent)
MODULES = {"torch": ["torch"], "onnx": ["onnx", "onnx_graphsurgeon", "onnxruntime", "onnxscript"],
           "bench": ["matplotlib"]}


def hidden_modules(installed: frozenset[str]) -> list[str]:
    return [m for extra, mods in MODULES.items() if extra not in installed for m in mods]


@dataclass(frozen=True)
class EntryPoint:
    name: str
    needs: tuple[str, ...]           # extras, in the order the message names them
    argv: tuple[str, ...] = ()       # arguments of the `reparam` command, or
    code: str = ""                   # Python source run with `python -c`
    ok_rc: int = 0                   # exit code when every needed extra is there
    ok_text: str = ""                # ... and a piece of its output


ENTRY_POINTS = [
    EntryPoint("reparam demo", ("torch", "onnx"), ("demo", "--model", "no_such_model", "--out", "{tmp}/demo"),
               ok_rc=2, ok_text="unknown model 'no_such_model'"),
    EntryPoint("reparam demo --onnx", ("onnx",), ("demo", "--onnx", "{tmp}/missing.onnx", "--out", "{tmp}/demo"),
               ok_rc=1, ok_text="no such file"),
    EntryPoint("reparam onnx IN -o OUT", ("onnx",), ("onnx", "{tmp}/missing.onnx", "-o", "{tmp}/out.onnx", "--check"),
               ok_rc=1, ok_text="no such file"),
    EntryPoint("reparam onnx", ("onnx",), ("onnx",), ok_rc=2, ok_text="usage: reparam onnx"),
    EntryPoint("reparam onnx --help", ("onnx",), ("onnx", "--help"), ok_rc=0, ok_text="--check"),
    EntryPoint("reparam profile", ("torch",), ("profile", "repghostnet_0_5x", "--input-size", "32", "32"),
               ok_text="repghostnet_0_5x"),
    EntryPoint("reparam --help", (), ("--help",), ok_text="COMMAND"),
    EntryPoint("reparam.fuse", ("torch",), code="import reparam; print(reparam.fuse.__name__)", ok_text="fuse"),
    EntryPoint("import reparam.fx", ("torch",), code="import reparam.fx"),
    EntryPoint("reparam.onnx.fuse", ("onnx",), code="import reparam.onnx; print(reparam.onnx.fuse.__name__)",
               ok_text="fuse"),
    EntryPoint("import reparam_zoo", ("torch",), code="import reparam_zoo; print(reparam_zoo.list_models()[0])",
               ok_text="ghostnet"),
    EntryPoint("import reparam.core", (), code="import reparam.core; print(reparam.core.fold_bn.__name__)",
               ok_text="fold_bn"),
]

INSTALL = re.compile(r'pip install "reparam\[([a-z,]+)\]"')


def missing(ep: EntryPoint, installed: frozenset[str]) -> list[str]:
    return [e for e in ep.needs if e not in installed]


def check(ep: EntryPoint, installed: frozenset[str], rc: int | None, out: str, err: str,
          exception: str | None = None) -> None:
    """Assert what ``ep`` must do in an environment with ``installed`` extras.

    ``exception`` is the last traceback line for ``python -c`` entry points (None if it exited cleanly).
    """
    absent = missing(ep, installed)
    where = f"{ep.name} with extras {sorted(installed) or 'none'}"
    if ep.argv:
        assert "Traceback" not in err + out, f"{where}: traceback\n{err}"
        if absent and ep.argv != ("--help",):
            assert rc == 2, f"{where}: exit {rc}, expected 2\n{out}\n{err}"
            lines = err.strip().splitlines()
            assert len(lines) == 1, f"{where}: expected one line, got\n{err}"
            found = INSTALL.search(lines[0])
            assert found and found.group(1).split(",") == absent, f"{where}: {lines[0]}"
            assert lines[0].startswith(f"reparam {ep.argv[0]}") and " needs the " in lines[0], lines[0]
            return
        assert rc == ep.ok_rc, f"{where}: exit {rc}, expected {ep.ok_rc}\n{out}\n{err}"
        assert ep.ok_text in out + err, f"{where}: {ep.ok_text!r} not in\n{out}\n{err}"
        if ep.argv == ("--help",):  # the listing names the extra each unavailable command needs
            flat = re.sub(r"\s+", " ", out)
            for extra in {"torch", "onnx"} - installed:
                assert f'pip install "reparam[{extra}]"' in flat, out
        else:
            assert "needs the" not in err, f"{where}: false alarm\n{err}"
        return
    if absent:
        assert exception is not None, f"{where}: imported without the extra?\n{out}"
        assert exception.startswith("reparam._extras.MissingExtra: "), f"{where}: {exception}"
        found = INSTALL.search(exception)
        assert found and found.group(1).split(",") == absent, f"{where}: {exception}"
        return
    assert exception is None, f"{where}: {exception}\n{err}"
    assert rc == 0 and ep.ok_text in out, f"{where}: exit {rc}\n{out}\n{err}"
