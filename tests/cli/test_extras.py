"""Each entry point names the missing extra and its install line, with every combination of extras.

The combinations are simulated by hiding packages (``blocker/sitecustomize.py``) from a subprocess of the
project venv: one interpreter per combination runs every entry point (``extras_driver.py``), and the
core-only combination also runs each entry point in its own interpreter, as a user would.  The slow
``tests/packaging/test_fresh_venvs.py`` repeats the check in real venvs built from the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from extras_matrix import COMBOS, ENTRY_POINTS, check, hidden_modules

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _env(hidden: list[str]) -> dict[str, str]:
    path = [str(HERE / "blocker"), str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path)), "REPARAM_TEST_HIDE": ",".join(hidden),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_every_entry_point_with_each_combination_of_extras(combo, tmp_path):
    installed = COMBOS[combo]
    proc = subprocess.run([sys.executable, str(HERE / "extras_driver.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=_env(hidden_modules(installed)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    outcomes = {o["name"]: o for o in json.loads(proc.stdout)}
    for ep in ENTRY_POINTS:
        o = outcomes[ep.name]
        check(ep, installed, o["rc"], o["out"], o["err"], o["exception"])


@pytest.mark.parametrize("ep", ENTRY_POINTS, ids=lambda ep: ep.name)
def test_core_only_install_in_separate_interpreters(ep, tmp_path):
    installed = COMBOS["none"]
    args = ([sys.executable, "-m", "reparam", *(a.replace("{tmp}", str(tmp_path)) for a in ep.argv)] if ep.argv
            else [sys.executable, "-c", ep.code])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(hidden_modules(installed)),
                          cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else None
    exception = last if (not ep.argv and proc.returncode != 0) else None
    check(ep, installed, proc.returncode, proc.stdout, proc.stderr, exception)


def test_the_blocker_hides_what_it_should(tmp_path):
    code = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('numpy') is not None)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=_env(["torch"]), cwd=tmp_path)
    assert proc.stdout.split() == ["None", "True"], proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=60,
                          env=_env(["torch"]), cwd=tmp_path)
    assert "ModuleNotFoundError: No module named 'torch'" in proc.stderr


def _conv_bn_model(path: Path) -> None:
    """A two-branch conv+BN graph (the demo's --onnx half needs no torch, so this runs in a second)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w3", rng.standard_normal((4, 4, 3, 3))), ("w1", rng.standard_normal((4, 4, 1, 1))),
        ("g", rng.random(4) + 0.5), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)),
        ("v", rng.random(4) + 0.5)]]
    nodes = [helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["an"]),
             helper.make_node("Conv", ["x", "w1"], ["c"]),
             helper.make_node("Add", ["an", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_demo_without_matplotlib_skips_the_chart(tmp_path):
    """Also: ``demo --onnx`` runs with only the onnx extra (torch hidden too)."""
    _conv_bn_model(tmp_path / "m.onnx")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "reparam", "demo", "--onnx", str(tmp_path / "m.onnx"), "--repeats", "1",
            "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=_env(["matplotlib", "torch"]),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'chart skipped: matplotlib is not installed (pip install "reparam[bench]" adds it)' in proc.stdout
    assert (out / "demo.json").is_file() and not (out / "demo.png").exists()
    assert "Traceback" not in proc.stderr
    assert json.loads((out / "demo.json").read_text())["onnx"]["regions"] == 1


def test_missing_extra_is_an_import_error_naming_the_module():
    from reparam._extras import EXTRAS, MissingExtra, missing_extras

    err = MissingExtra("reparam.thing", {"onnx": ["onnx-graphsurgeon"]})
    assert isinstance(err, ModuleNotFoundError) and err.name == "onnx_graphsurgeon"
    assert str(err) == ('reparam.thing needs the onnx extra (onnx-graphsurgeon is not installed); '
                        'install it with: pip install "reparam[onnx]"')
    assert missing_extras(EXTRAS) == {}, "the project venv has every extra"
