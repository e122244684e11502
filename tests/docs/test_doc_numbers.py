"""Figures quoted in docs/zoo.md's model table match what the code computes now (params and MACs of freshly
built models) and the committed benchmark results (latency), so the table cannot go stale silently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `(\w+)` \| `\w+\(\)` \| ([\d,]+) \| ([\d.]+)M \| ([\d,]+) \| ([\d.]+)M "
                 r"\| ([\d.]+) / ([\d.]+) ms \|$", re.M)


def _rows() -> list[tuple[str, ...]]:
    rows = ROW.findall((ROOT / "docs" / "zoo.md").read_text())
    assert len(rows) >= 11, "the model table of docs/zoo.md changed shape; update this test"
    return rows


@pytest.mark.parametrize("row", _rows(), ids=lambda r: r[0])
def test_zoo_table_params_and_macs(row):
    reparam_zoo = pytest.importorskip("reparam_zoo")
    name, params, macs, d_params, d_macs = row[:5]
    got_macs, got_params = reparam_zoo.profile(reparam_zoo.create_model(name))
    got_d_macs, got_d_params = reparam_zoo.profile(reparam_zoo.create_model(name, deploy=True))
    assert (f"{got_params:,}", f"{got_macs / 1e6:.2f}") == (params, macs)
    assert (f"{got_d_params:,}", f"{got_d_macs / 1e6:.2f}") == (d_params, d_macs)


def test_zoo_table_latency_is_the_benchmarks():
    results = json.loads((ROOT / "benchmarks" / "results" / "latency_vs_macs.json").read_text())
    measured = {m["model"]: m["latency_s"] for m in results["models"]}
    for name, *_, torch_ms, ort_ms in _rows():
        lat = measured[name]
        assert torch_ms == f"{lat['torch']['deploy'] * 1e3:.1f}", name
        assert ort_ms == f"{lat['onnxruntime']['deploy'] * 1e3:.2f}", name
