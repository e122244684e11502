"""The fuse-time benchmark (benchmarks/fuse_time.py) on the sweep's tiny local models, and its docs section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fuse_time
import summarize
from test_model_sweep import ConvBNNet, PreActNet, local


def test_times_every_model_and_renders_the_section(tmp_path, monkeypatch) -> None:
    specs = [local(ConvBNNet), local(PreActNet)]
    monkeypatch.setattr(fuse_time.M, "select", lambda rows: list(specs))
    monkeypatch.setattr(fuse_time.M, "scanned_rows", lambda *a, **k: [])
    out = tmp_path / "fuse_time.json"
    assert fuse_time.main(["--out", str(out), "--rounds", "2", "--extra", ""]) == 0
    data = json.loads(out.read_text())
    recs = {r["id"]: r for r in data["models"]}
    assert set(recs) == {"local:ConvBNNet", "local:PreActNet"}
    for r in recs.values():
        assert r["status"] == "ok" and not r["extra"] and "library" not in r
        assert len(r["times_s"]["reparam"]) == len(r["times_s"]["deepcopy"]) == 2
        assert r["paired_ratio"]["reparam/deepcopy"] > 0
    spread = data["totals"]["reparam/deepcopy"]
    assert spread["models"] == 2 and spread["p25"] <= spread["median"] <= spread["p75"] <= spread["worst"]
    assert data["totals"]["reparam/library"] is None  # no local model has a library conversion
    assert out.with_suffix(".png").exists()
    # --resume keeps what is recorded; the docs section renders from the file
    first = recs["local:ConvBNNet"]["times_s"]
    assert fuse_time.main(["--out", str(out), "--resume", "--extra", ""]) == 0
    assert {r["id"]: r for r in json.loads(out.read_text())["models"]}["local:ConvBNNet"]["times_s"] == first
    text = summarize.fuse_time(json.loads(out.read_text()))
    assert "`reparam.fuse` / `copy.deepcopy`" in text and "local:ConvBNNet" in text


def test_extra_models_must_be_timm() -> None:
    assert fuse_time.extra_spec("timm:repvgg_b3").name == "repvgg_b3"
    with pytest.raises(SystemExit, match="timm:<name>"):
        fuse_time.extra_spec("tv:resnet18")
