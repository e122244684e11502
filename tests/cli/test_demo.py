"""``reparam demo`` end to end (one run with the defaults, shared): its figures against independent counts,
its timings against each other, its report, its chart, and the transcript in docs/demo.md."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

import reparam_zoo

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_demo_docs", ROOT / "scripts" / "gen_demo_docs.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    rc, output, result = gen.run_demo(["--report"], out=str(out))  # the defaults, as in docs/demo.md
    return {"rc": rc, "output": output, "result": result, "out": out}


def _summary(demo) -> str:
    return gen.summary_part(demo["output"])


def test_runs_and_writes_its_files(demo):
    assert demo["rc"] == 0 and demo["result"]["ok"]
    assert (demo["out"] / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((demo["out"] / "demo.json").read_text()) == demo["result"]


def test_docs_transcript_is_current(demo):
    """docs/demo.md shows a real run: regenerate it with scripts/gen_demo_docs.py when this fails."""
    page = gen.page_transcript(gen.PAGE.read_text())
    assert gen.normalize(page) == gen.normalize(_summary(demo)), "docs/demo.md is stale"


def test_step_times_are_the_summarys_times(demo):
    text = _summary(demo)
    step = re.search(r"\] reparam\.fuse \(torch\.fx\) \.\.\. done \((\d+\.\d+) s\)", text).group(1)
    summary = re.search(r"reparam\.fuse took (\d+\.\d+) s", text).group(1)
    assert step == summary
    step = re.search(r"\] reparam\.onnx\.fuse \(graph pass\) \.\.\. done \((\d+\.\d+) s\)", text).group(1)
    summary = re.search(r"reparam\.onnx\.fuse took (\d+\.\d+) s", text).group(1)
    assert step == summary
    r = demo["result"]
    assert r["torch"]["fuse_seconds"] == next(s["seconds"] for s in r["steps"] if s["step"].startswith("reparam.fuse"))


def test_params_and_macs_match_independent_profiles(demo):
    """Training form and deploy=True counted by the zoo profiler on freshly built models (weights do not
    change params or MACs), against the table and the MAC explanation."""
    r, text = demo["result"], _summary(demo)
    macs, params = reparam_zoo.profile(reparam_zoo.create_model("repghostnet_1_0x"))
    d_macs, d_params = reparam_zoo.profile(reparam_zoo.create_model("repghostnet_1_0x", deploy=True))
    assert (r["macs"]["before"], r["params"]["before"]) == (macs, params) == (142_397_872, 4_073_604)
    assert (r["macs"]["deploy"], r["params"]["deploy"]) == (d_macs, d_params)
    assert re.search(rf"params\s+{params:,}\s+{r['params']['after']:,}", text)
    assert f"deploy=True {d_macs / 1e6:.2f}M = " in " ".join(text.split())
    for key in ("before", "after", "deploy"):
        split = r["mac_split"][key]
        assert split["weights"] + split["biases"] == r["macs"][key]
    # the same kernels in every form; the fused model needs fewer biases than deploy=True
    assert r["mac_split"]["before"]["weights"] == r["mac_split"]["after"]["weights"] == d_macs - r["mac_split"][
        "deploy"]["biases"]
    fewer = d_params - r["params"]["after"]
    assert fewer > 0 and f"keeps {fewer:,} more bias values" in text


def test_the_output_says_why_macs_change(demo):
    text = " ".join(_summary(demo).split())
    assert "Why the MACs change" in text and "Folding a BatchNorm gives its conv a bias" in text
    assert "the whole difference is biases" in text


def test_report_lists_every_refusal_with_its_reason(demo):
    r, tail = demo["result"], demo["output"][len(_summary(demo)):]
    assert "reparam.fuse report (torch.fx):" in tail and "reparam.onnx.fuse report (ONNX graph):" in tail
    torch_part, onnx_part = tail.split("reparam.onnx.fuse report (ONNX graph):")
    refused = [line for line in torch_part.splitlines() if re.match(r"    \S+ \(\w+\): \S", line)]
    assert len(refused) == r["torch"]["refused"] > 0, torch_part  # every leftover, with its module and reason
    assert "refused" in onnx_part and str(r["onnx"]["refused"]) in onnx_part


def test_chart_carries_params_macs_and_error(demo):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from reparam.demo import _figure

    r = demo["result"]
    fig = _figure(r)
    try:
        texts = {t.get_text() for ax in fig.axes for t in [*ax.texts, ax.title]}
        titles = " ".join(ax.get_title() for ax in fig.axes)
    finally:
        plt.close(fig)
    assert "params" in titles and "MACs" in titles and "relative error" in titles
    for key in ("before", "after", "deploy"):
        assert f"{r['params'][key]:,}" in texts
        assert f"{r['macs'][key] / 1e6:.2f}" in texts
    assert f"{r['torch']['error']['max_rel']:.1e}" in texts and f"{r['onnx']['error']['max_rel']:.1e}" in texts
