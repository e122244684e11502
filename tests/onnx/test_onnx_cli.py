"""`reparam onnx`: bad inputs fail with one line and write nothing; --check, --report, external data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_testlib import Builder, max_rel_error, ops, random_feeds

import reparam.onnx
from reparam.cli import main
from reparam.core.errors import ReparamError
from reparam.onnx import check as check_mod

C = 16


def repvgg_model(opset: int = 17, c: int = C) -> onnx.ModelProto:
    b = Builder()
    k3 = b.bn(b.conv("x", c, c, bias=False), c)
    k1 = b.bn(b.conv("x", c, c, k=1, bias=False), c)
    y = b.node("Relu", [b.node("Add", [b.node("Add", [k3, k1]), b.bn("x", c)])])
    return b.model([("x", ["N", c, 6, 6])], [(y, ["N", c, 6, 6])], opset=opset)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".reparam-"))


def run_cli(args, capsys) -> tuple[int, str, str]:
    rc = main(["onnx", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    good = repvgg_model().SerializeToString()
    bad_graph = repvgg_model()
    bad_graph.graph.node[0].input[0] = "nowhere"
    old = repvgg_model()
    old.opset_import[0].version = 12
    new = repvgg_model()
    new.opset_import[0].version = 22
    missing_data = repvgg_model()
    onnx.save_model(missing_data, str(tmp / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    (tmp / "ext.onnx.data").unlink()
    (tmp / "adir").mkdir()
    return {
        "missing": tmp / "nope.onnx",
        "directory": tmp / "adir",
        "text": _write(tmp / "text.onnx", b"this is not an onnx model\n" * 20),
        "empty": _write(tmp / "empty.onnx", b""),
        "truncated": _write(tmp / "trunc.onnx", good[: len(good) // 2]),
        "truncated_tail": _write(tmp / "trunc2.onnx", good[:-7]),
        "random": _write(tmp / "rand.onnx", np.random.default_rng(0).bytes(4096)),
        "opset12": _write(tmp / "o12.onnx", old.SerializeToString()),
        "opset22": _write(tmp / "o22.onnx", new.SerializeToString()),
        "invalid_graph": _write(tmp / "invalid.onnx", bad_graph.SerializeToString()),
        "missing_external_data": tmp / "ext.onnx",
    }


BAD = ["missing", "directory", "text", "empty", "truncated", "truncated_tail", "random", "opset12", "opset22",
       "invalid_graph", "missing_external_data"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_fails_with_one_line_and_writes_nothing(kind, tmp_path, capsys):
    src = _bad_inputs(tmp_path)[kind]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, _out, err = run_cli([src, "-o", out_dir / "o.onnx", "--check"], capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reparam onnx: error: "), err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []
    with pytest.raises(ReparamError):
        reparam.onnx.fuse(src)


def test_expected_messages(tmp_path, capsys):
    srcs = _bad_inputs(tmp_path)
    expect = {"missing": "no such file", "directory": "directory", "opset12": "unsupported opset 12",
              "opset22": "unsupported opset 22", "invalid_graph": "invalid ONNX model", "empty": "empty",
              "missing_external_data": "external data"}
    for kind, words in expect.items():
        _, _, err = run_cli([srcs[kind], "-o", tmp_path / "o.onnx"], capsys)
        assert words in err, (kind, err)


def test_bad_input_in_a_subprocess(tmp_path):
    bad = _write(tmp_path / "bad.onnx", b"garbage")
    proc = subprocess.run([sys.executable, "-m", "reparam", "onnx", str(bad), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_fuse_check_report(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save_model(repvgg_model(), str(src))
    dst = tmp_path / "out.onnx"
    rc, out, err = run_cli([src, "-o", dst, "--check", "--report", "--dim", "N=3"], capsys)
    assert rc == 0, err
    assert "check (ok)" in out and "x[3, 16, 6, 6]" in out
    assert "fused regions (1)" in out and "refused (0)" in out
    assert f"wrote {dst}" in out
    fused = onnx.load(str(dst))
    onnx.checker.check_model(fused, full_check=True)
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert fused.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert leftovers(tmp_path) == []


def test_report_lists_refusals(tmp_path, capsys):
    b = Builder()
    y = b.node("Relu", [b.conv(b.bn("x", 4), 4, 4)])
    src = tmp_path / "in.onnx"
    onnx.save_model(b.model([("x", [1, 4, 5, 5])], [(y, None)]), str(src))
    rc, out, _ = run_cli([src, "-o", tmp_path / "out.onnx", "--report"], capsys)
    assert rc == 0
    assert "refused (1)" in out and "border" in out


def test_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.onnx"
    onnx.save_model(repvgg_model(), str(src))
    bad = check_mod.CheckResult([check_mod.OutputDiff("y", 1.0, 0.5, 2.0, 1e-4)], {"x": (1, C, 6, 6)})
    monkeypatch.setattr("reparam.onnx.command.compare", lambda *a, **k: bad)
    rc, _out, err = run_cli([src, "-o", tmp_path / "out.onnx", "--check"], capsys)
    assert rc == 1 and "above tolerance" in err and "nothing was written" in err
    assert not (tmp_path / "out.onnx").exists() and leftovers(tmp_path) == []


def test_in_place_output(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save_model(repvgg_model(), str(src))
    rc, _, _ = run_cli([src, "-o", src], capsys)
    assert rc == 0 and ops(onnx.load(str(src))) == {"Conv": 1, "Relu": 1}


def test_external_data_round_trip(tmp_path, capsys):
    model = repvgg_model()
    src = tmp_path / "in.onnx"
    onnx.save_model(repvgg_model(), str(src), save_as_external_data=True, location="in.onnx.data",
                    size_threshold=0)
    dst = tmp_path / "sub" / "out.onnx"
    dst.parent.mkdir()
    rc, _out, err = run_cli([src, "-o", dst, "--check"], capsys)
    assert rc == 0, err
    assert (dst.parent / "out.onnx.data").exists()
    raw = onnx.load(str(dst), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in raw.graph.initializer)
    onnx.checker.check_model(str(dst), full_check=True)
    feeds = random_feeds(model)
    assert max_rel_error(model, str(dst), feeds) < 1e-5
    rc, _, _ = run_cli([src, "-o", tmp_path / "inline.onnx", "--external-data", "never"], capsys)
    assert rc == 0 and not (tmp_path / "inline.onnx.data").exists()


def test_api_paths_and_save(tmp_path, monkeypatch):
    model = repvgg_model()
    src = tmp_path / "in.onnx"
    onnx.save_model(repvgg_model(), str(src), save_as_external_data=True, location="w.bin", size_threshold=0)
    fused = reparam.onnx.fuse(src)
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    written = reparam.onnx.save_model(fused, tmp_path / "a.onnx", external_data=True)
    assert [p.name for p in written] == ["a.onnx.data", "a.onnx"]
    monkeypatch.setattr("reparam.onnx.io.PROTOBUF_LIMIT", 1000)  # "large": external data automatically
    written = reparam.onnx.save_model(fused, tmp_path / "b.onnx")
    assert [p.name for p in written] == ["b.onnx.data", "b.onnx"]
    assert reparam.onnx.compare(model, tmp_path / "b.onnx").ok
    with pytest.raises(ReparamError, match="does not exist"):
        reparam.onnx.save_model(fused, tmp_path / "missing_dir" / "c.onnx")


def test_unloaded_external_data_proto_is_refused(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save_model(repvgg_model(), str(src), save_as_external_data=True, location="d", size_threshold=0)
    with pytest.raises(ReparamError, match="not loaded"):
        reparam.onnx.fuse(onnx.load(str(src), load_external_data=False))


def test_compare_detects_a_difference():
    a = repvgg_model()
    b = repvgg_model()
    b.graph.node[-1].op_type = "Sigmoid"
    result = reparam.onnx.compare(a, b, dims={"N": 2})
    assert not result.ok and result.max_abs > 0.1 and "FAILED" in result.format()
    assert reparam.onnx.compare(a, reparam.onnx.fuse(a)).ok


def test_dim_argument_is_validated(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save_model(repvgg_model(), str(src))
    rc, _, err = run_cli([src, "-o", tmp_path / "o.onnx", "--check", "--dim", "N"], capsys)
    assert rc == 1 and "NAME=SIZE" in err and not (tmp_path / "o.onnx").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["onnx", "--help"])
    assert exc.value.code == 0
    assert "--check" in capsys.readouterr().out


def test_opset_boundaries_are_accepted():
    for opset in (13, 21):
        fused = reparam.onnx.fuse(repvgg_model(opset))
        assert ops(fused) == {"Conv": 1, "Relu": 1}
        assert fused.opset_import[0].version == opset
    m = repvgg_model()
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    assert reparam.onnx.fuse(m).opset_import[1].domain == "com.example"


def test_check_of_a_training_mode_model_compares_with_its_inference_form(tmp_path, capsys):
    b = Builder()
    y, _, _ = b.node("BatchNormalization", [b.conv("x", 4, 4), *b.bn_params(4)], n_out=3, training_mode=1)
    src = tmp_path / "train.onnx"
    onnx.save_model(b.model([("x", [2, 4, 5, 5])], [(b.node("Relu", [y]), None)], opset=15), str(src))
    rc, out, err = run_cli([src, "-o", tmp_path / "out.onnx", "--check", "--report"], capsys)
    assert rc == 0, err
    assert "converted to inference form" in out and "check (ok)" in out


def test_internal_error_is_one_line(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.onnx"
    onnx.save_model(repvgg_model(), str(src))

    def boom(*a, **k):
        raise ValueError("multi\nline")

    monkeypatch.setattr("reparam.onnx.command.fuse_run", boom)
    rc, _, err = run_cli([src, "-o", tmp_path / "out.onnx"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "internal error" in err
    assert not (tmp_path / "out.onnx").exists()


def test_large_model_path(tmp_path, capsys, monkeypatch):
    """Past the protobuf limit (lowered here): checked on the skeleton all the same, external data written."""
    for mod in ("io", "command"):
        monkeypatch.setattr(f"reparam.onnx.{mod}.PROTOBUF_LIMIT", 1000)
    src = tmp_path / "in.onnx"
    onnx.save_model(repvgg_model(), str(src))
    dst = tmp_path / "out.onnx"
    rc, out, err = run_cli([src, "-o", dst, "--check"], capsys)
    assert rc == 0, err
    assert (tmp_path / "out.onnx.data").exists() and "check (ok)" in out
    onnx.checker.check_model(str(dst), full_check=True)


# -- conventions (issue 11, point 6) -----------------------------------------------------------------------------


def _saved(tmp_path: Path, model=None) -> Path:
    src = tmp_path / "in.onnx"
    onnx.save_model(model if model is not None else repvgg_model(), str(src))
    return src


def test_positional_output_as_onnxsim_takes_it(tmp_path, capsys):
    src = _saved(tmp_path)
    rc, _out, err = run_cli([src, tmp_path / "out.onnx"], capsys)
    assert rc == 0, err
    assert ops(onnx.load(str(tmp_path / "out.onnx"))) == {"Conv": 1, "Relu": 1}
    rc, _, _ = run_cli([src, "-o", tmp_path / "o2.onnx"], capsys)  # -o still accepted
    assert rc == 0 and (tmp_path / "o2.onnx").exists()
    rc, _, _ = run_cli([src, tmp_path / "o3.onnx", "-o", tmp_path / "o3.onnx"], capsys)  # the same path twice
    assert rc == 0


@pytest.mark.parametrize("args,words", [([], "no output given"), (["a.onnx", "-o", "b.onnx"], "two outputs")])
def test_missing_or_conflicting_outputs_are_one_line_errors(tmp_path, capsys, args, words):
    src = _saved(tmp_path)
    rc, _, err = run_cli([src, *args], capsys)
    assert rc == 1 and words in err and len(err.strip().splitlines()) == 1


def test_unknown_dim_name_is_an_error(tmp_path, capsys):
    """Regression: a misspelt --dim was silently ignored."""
    src = _saved(tmp_path)
    rc, _, err = run_cli([src, tmp_path / "o.onnx", "--check", "--dim", "nosuch=4"], capsys)
    assert rc == 1 and "no graph input has a dynamic dimension named 'nosuch'" in err and "(dynamic dims: N)" in err
    assert not (tmp_path / "o.onnx").exists()


def test_json_report_is_one_document_on_stdout(tmp_path, capsys):
    import json

    src = _saved(tmp_path)
    rc, out, err = run_cli([src, tmp_path / "o.onnx", "--json", "--check", "--dim", "N=2"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["report"]["convs_before"] == 2 and doc["report"]["convs_after"] == 1
    assert doc["report"]["regions"][0]["convs_after"] == 1 and doc["check"]["ok"] is True
    assert doc["check"]["input_shapes"] == {"x": [2, C, 6, 6]} and doc["written"] == [str(tmp_path / "o.onnx")]
    assert "wrote" in err  # the summary line goes to stderr


def test_input_shape_override_fixes_dims_and_enables_fixed_size_sums(tmp_path, capsys):
    """TensorFlow-style "same" at stride 2 beside a 1x1: summed only once the spatial size is fixed."""
    b = Builder()
    y = b.node("Relu", [b.node("Add", [b.bn(b.conv("x", C, C, k=3, pad=[0, 0, 1, 1], stride=2, bias=False), C),
                                       b.bn(b.conv("x", C, C, k=1, stride=2, bias=False), C)])])
    src = _saved(tmp_path, b.model([("x", ["N", C, "H", "W"])], [(y, ["N", C, "h", "w"])]))
    rc, out, err = run_cli([src, tmp_path / "dyn.onnx", "--report"], capsys)
    assert rc == 0 and ops(onnx.load(str(tmp_path / "dyn.onnx")))["Conv"] == 2
    rc, out, err = run_cli([src, tmp_path / "fixed.onnx", "--input-shape", "x:N,16,16,16", "--report", "--check",
                            "--dim", "N=2"], capsys)
    assert rc == 0, err
    fixed = onnx.load(str(tmp_path / "fixed.onnx"))
    assert ops(fixed) == {"Conv": 1, "Relu": 1}
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 16, 16, 16]
    assert "exact at the fixed input size 16x16" in out and "check (ok)" in out and "x[2, 16, 16, 16]" in out


@pytest.mark.parametrize("shape,words", [("x:1,3,6,6", "dim 1 is fixed to 16"), ("y:1,16,6,6", "no graph input"),
                                         ("x:1,16,6", "rank 4"), ("x:1;2", "expects NAME:D0,D1")])
def test_bad_input_shapes_are_one_line_errors(tmp_path, capsys, shape, words):
    rc, _, err = run_cli([_saved(tmp_path), tmp_path / "o.onnx", "--input-shape", shape], capsys)
    assert rc == 1 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_input_shape_without_a_name_for_a_single_input(tmp_path, capsys):
    rc, _, err = run_cli([_saved(tmp_path), tmp_path / "o.onnx", "--input-shape", "3,16,6,6"], capsys)
    assert rc == 0, err
    dims = onnx.load(str(tmp_path / "o.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 16, 6, 6]


def test_closed_stdout_is_not_a_traceback(tmp_path):
    """Regression: `reparam onnx ... --report | head` ended in a BrokenPipeError traceback."""
    src = _saved(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "reparam", "onnx", str(src), str(tmp_path / "o.onnx"), "--report"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert ops(onnx.load(str(tmp_path / "o.onnx"))) == {"Conv": 1, "Relu": 1}  # the work was still done


def test_progress_goes_to_stderr_after_a_few_seconds(capsys, monkeypatch):
    import types

    from reparam.onnx.command import Progress

    clock = iter([0.0, 1.0, 2.5, 2.7, 4.0, 0.0, 9.0])
    monkeypatch.setattr("reparam.onnx.command.time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    p = Progress()  # starts at 0.0
    for stage in ("reading", "checking", "planning", "writing"):
        p(stage)
    err = capsys.readouterr().err.splitlines()
    assert err == ["reparam onnx: [2.5 s] checking", "reparam onnx: [4.0 s] writing"]
    quiet = Progress(enabled=False)
    quiet("x")
    assert capsys.readouterr().err == ""


def test_simplify_runs_onnxslim_after_the_fusion(tmp_path, capsys):
    pytest.importorskip("onnxslim")
    b = Builder()
    shape = b.node("Identity", [b.const(np.array([1, C, 6, 6], np.int64))])  # reparam leaves these two
    y = b.node("Reshape", [b.node("Relu", [_repvgg_on(b, "x")]), shape])
    src = _saved(tmp_path, b.model([("x", [1, C, 6, 6])], [(y, [1, C, 6, 6])]))
    rc, _out, _err = run_cli([src, tmp_path / "plain.onnx"], capsys)
    rc2, out2, err2 = run_cli([src, tmp_path / "slim.onnx", "--simplify", "--check", "--report"], capsys)
    assert rc == 0 and rc2 == 0, err2
    plain, slim = onnx.load(str(tmp_path / "plain.onnx")), onnx.load(str(tmp_path / "slim.onnx"))
    assert ops(slim)["Conv"] == ops(plain)["Conv"] == 1 and "BatchNormalization" not in ops(slim)
    assert len(slim.graph.node) < len(plain.graph.node)
    assert "then onnxslim" in out2 and "check (ok)" in out2
    onnx.checker.check_model(slim, full_check=True)


def test_simplify_keeps_initializers_that_are_graph_inputs():
    pytest.importorskip("onnxslim")
    b = Builder()
    w = b.const(b.weight(C, C, 3, 3), "W")
    y = b.node("Relu", [b.bn(b.conv("x", C, C, w=w), C)])
    model = b.model([("x", [1, C, 6, 6])], [(y, None)])
    model.graph.input.append(helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, [C, C, 3, 3]))
    fused = reparam.onnx.fuse(model, simplify=True)
    assert [i.name for i in fused.graph.input] == ["x", w] and w in {t.name for t in fused.graph.initializer}
    assert ops(fused)["BatchNormalization"] == 1


def test_simplify_without_a_simplifier_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_simplifiers(name, *a, **k):
        if name in ("onnxslim", "onnxsim"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_simplifiers)
    monkeypatch.setattr("reparam.onnx.simplify.importlib.import_module", lambda n: no_simplifiers(n))
    with pytest.raises(ReparamError, match=r'--simplify needs the simplify extra .*pip install "reparam\[simplify\]"'):
        reparam.onnx.fuse(repvgg_model(), simplify=True)


def _repvgg_on(b: Builder, x: str, c: int = C) -> str:
    k3 = b.bn(b.conv(x, c, c, bias=False), c)
    k1 = b.bn(b.conv(x, c, c, k=1, bias=False), c)
    return b.node("Add", [b.node("Add", [k3, k1]), b.bn(x, c)])
