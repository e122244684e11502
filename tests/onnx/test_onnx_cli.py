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
