"""The model sweep's machinery (benchmarks/model_sweep.py) on tiny models, in-process.

The torch-only part runs everywhere: hand-written models through the measurement, the worker pool and the
result file.  The timm/torchvision part skips where those are not installed (the project's own venv).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _sweep_measure as X  # noqa: E402
import _sweep_models as M  # noqa: E402
import model_sweep  # noqa: E402
import summarize_sweep as S  # noqa: E402

HERE = Path(__file__).resolve()


class ConvBNNet(nn.Module):
    """conv+BN, a RepVGG-style sum and a classifier: reparam folds every BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.a(x) + self.b(x))
        return {"logits": self.head(y.mean((2, 3))), "features": [y]}


class PreActNet(nn.Module):
    """BN -> ReLU -> conv on the input: no exact fold exists, so the BN must stay (with or without a reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


class Hangs(nn.Module):
    """A model whose forward never returns: the worker pool must give up on it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        import time

        time.sleep(3600)
        return x


def local(cls: type) -> M.ModelSpec:
    return M.ModelSpec(f"local:{cls.__name__}", "local", cls.__name__, f"local/{cls.__name__}",
                       input_size=(3, 16, 16), kwargs={"factory": f"{HERE.stem}:{cls.__name__}"})


def test_local_model_record_fields() -> None:
    rec = X.measure(local(ConvBNNet), rounds=1)
    assert rec["status"] == "ok", rec.get("error")
    assert rec["params"] == sum(p.numel() for p in ConvBNNet().parameters())
    assert rec["before"]["batch_norm"] == 3 and rec["before"]["conv"] == 3
    # MACs: independent count of the three convs (no bias) and the Linear at 16x16
    assert rec["before"]["weight_macs"] == 16 * 16 * 8 * (3 * 9 + 8 * 9 + 8) + 8 * 5
    assert rec["before"]["macs"] == rec["before"]["weight_macs"]
    assert set(rec["variants"]) == {"reparam", "reparam_inputs", "reparam_export", "fx"}
    for key in ("reparam", "reparam_inputs"):
        v = rec["variants"][key]
        assert v["error"] is None and not v["broken"] and not v["wrong"]
        assert v["rel"] < 1e-5
        assert v["counts"]["batch_norm"] == 0
        assert v["counts"]["conv"] <= rec["before"]["conv"]
        assert v["report"]["bn_without_reason"] == 0
    assert rec["input_unchanged"] is True
    assert set(rec["time"]["paired_ratio"]) == {"reparam/deepcopy", "reparam_inputs/deepcopy"}
    assert all(r > 0 for r in rec["time"]["paired_ratio"].values())


def test_compare_flags_structure_shape_and_scale() -> None:
    a = {"x": torch.ones(2, 3), "y": [torch.zeros(1)]}
    assert X.compare(a, a)["rel"] == 0.0
    b = {"x": torch.ones(2, 3) * 1.5, "y": [torch.zeros(1)]}
    assert X.compare(a, b)["rel"] == pytest.approx(0.5)
    assert X.compare(a, {"x": torch.ones(2, 3)})["rel"] == float("inf")
    assert X.compare(a, {"x": torch.ones(3, 2), "y": [torch.zeros(1)]})["note"].startswith("out['x']")
    nan = {"x": torch.tensor([1.0, float("nan")]), "y": []}
    assert X.compare(nan, {"x": torch.tensor([1.0, 2.0]), "y": []})["rel"] == float("inf")


def test_wrong_is_judged_against_the_float64_floor() -> None:
    class Reference:  # the "float64" output: the truth both float32 outputs are measured against
        def output(self):
            return torch.tensor([1.0, 0.0])

    ref32 = torch.tensor([1.0, 2e-3])  # an ill-conditioned unfused float32 model: 2e-3 off
    close, far = torch.tensor([1.0, 5e-3]), torch.tensor([1.0, 1e-2])
    assert not X.judge(X.compare(ref32, close), ref32, close, Reference())["wrong"]  # 5e-3 <= 4 * 2e-3
    assert X.judge(X.compare(ref32, far), ref32, far, Reference())["wrong"]
    assert X.judge(X.compare(ref32, close), ref32, close, None)["wrong"]  # no float64 run: the threshold decides
    assert not X.judge(X.compare(ref32, ref32), ref32, ref32, None)["wrong"]
    # far from the truth in float32, but exact when made from the model in float64: the model amplifies rounding
    judged = X.judge(X.compare(ref32, far), ref32, far, Reference(), lambda: 1e-13)
    assert not judged["wrong"] and judged["float64"]["deploy_float64"] == 1e-13
    assert X.judge(X.compare(ref32, far), ref32, far, Reference(), lambda: 1e-3)["wrong"]
    assert X.judge(X.compare(ref32, far), ref32, far, Reference(), lambda: None)["wrong"]


def test_costlier_and_mac_counter_on_a_transposed_conv() -> None:
    deconv = nn.ConvTranspose2d(4, 6, 3, stride=2, bias=True).eval()
    counts = X.executed(deconv, (torch.randn(1, 4, 5, 5),))
    out_elems = 6 * 11 * 11
    assert counts["conv"] == 1
    assert counts["weight_macs"] == out_elems * 4 * 9 and counts["macs"] == out_elems * (4 * 9 + 1)
    before = {"conv": 2, "weight_macs": 100}
    assert X.costlier(before, {"conv": 3, "weight_macs": 50})
    assert X.costlier(before, {"conv": 2, "weight_macs": 101})
    assert not X.costlier(before, {"conv": 2, "weight_macs": 100})


def test_bn_leftover_adapter_reads_both_report_shapes() -> None:
    from reparam.core.report import Leftover

    new = SimpleNamespace(bn_left=[Leftover("layer.bn", "BatchNorm2d", "pre-activation", "no-neighbour")])
    assert X.bn_leftovers(new, ["layer.bn"]) == [("layer.bn", "pre-activation")]
    old = SimpleNamespace(refused=[("layer_bn", "feeds a padded conv"), ("add_1", "windows do not align"),
                                   ("relu", "a BN in training mode")], skipped=[("blocks", "not traceable")])
    assert X.bn_leftovers(old, ["layer.bn"]) == [("layer.bn", "feeds a padded conv"),
                                                ("relu", "a BN in training mode")]
    assert X.bn_leftovers(None, []) == []


def test_preactivation_bn_is_counted_against_the_report() -> None:
    rec = X.measure(local(PreActNet), rounds=0)
    v = rec["variants"]["reparam_inputs"]
    assert rec["status"] == "ok" and not v["wrong"]
    left, listed = v["counts"]["batch_norm"], v["report"]["bn_listed"]
    assert left == 1  # no exact fold of BN -> ReLU -> padded conv
    assert v["report"]["bn_without_reason"] == max(0, left - listed)
    assert "time" not in rec


def test_failures_are_records_not_crashes() -> None:
    bad = M.ModelSpec("local:nope", "local", "nope", "local/nope", kwargs={"factory": f"{HERE.stem}:Missing"})
    rec = X.measure(bad)
    assert rec["status"] == "build failed" and rec["error"].startswith("AttributeError")


def test_sweep_cli_runs_workers_times_out_and_merges(tmp_path, monkeypatch) -> None:
    specs = [local(ConvBNNet), local(Hangs)]
    monkeypatch.setattr(model_sweep.M, "select", lambda rows: specs)
    monkeypatch.setattr(model_sweep.M, "scanned_rows", lambda *a, **k: [])
    out = tmp_path / "sweep.json"
    assert model_sweep.main(["--out", str(out), "--rounds", "1", "--timeout", "10"]) == 0
    data = json.loads(out.read_text())
    recs = {r["id"]: r for r in data["models"]}
    assert recs["local:ConvBNNet"]["status"] == "ok"
    assert recs["local:Hangs"]["status"] == "timeout"
    assert data["complete"] and data["reparam"]["path"]
    assert data["totals"]["by_status"] == {"ok": 1, "timeout": 1}
    assert out.with_suffix(".png").exists()
    # --resume skips both; a filtered run re-measures one and keeps the other's record
    first = recs["local:ConvBNNet"]["seconds"]
    model_sweep.main(["--out", str(out), "--resume", "--in-process"])
    assert json.loads(out.read_text())["models"][0]["seconds"] == first
    model_sweep.main(["--out", str(out), "--models", "local:Conv*", "--in-process", "--rounds", "0"])
    data = json.loads(out.read_text())
    assert {r["id"] for r in data["models"]} == {"local:ConvBNNet", "local:Hangs"}
    assert "time" not in {r["id"]: r for r in data["models"]}["local:ConvBNNet"]


def test_summary_renders_totals_offenders_and_table(tmp_path) -> None:
    rec = X.measure(local(ConvBNNet), rounds=1)
    broken = {**rec, "id": "local:Broken", "variants": {**rec["variants"], "reparam": {
        "error": None, "broken": True, "run_error": "AttributeError: no attribute 'f'"}}}
    d = {"settings": {"rounds": 1}, "models": [rec, broken], "environment": {}, "reparam": {"commit": "abc"}}
    d["totals"] = S.totals(d["models"])
    assert d["totals"]["variants"]["reparam"]["broken"] == 1
    assert d["totals"]["variants"]["reparam_inputs"]["broken"] == 0
    worst = S.offenders(d["models"], "reparam")
    assert worst["broken"] == [("local:Broken", "AttributeError: no attribute 'f'")]
    doc = tmp_path / "model_sweep.md"
    doc.write_text(f"# x\n{S.START}\nold\n{S.END}\n")
    results = tmp_path / "model_sweep.json"
    results.write_text(json.dumps(d))
    assert S.main(["--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "1 broken" in text and "`local:Broken`" in text and "old" not in text
    assert S.main(["--results", str(results), "--doc", str(doc), "--check"]) == 0


def test_family_rule() -> None:
    cases = {"resnet18d": "resnet", "tf_efficientnet_b0": "tf_efficientnet", "mobileone_s0": "mobileone",
             "ghostnetv2_100": "ghostnetv2", "mixnet_s": "mixnet", "cs3darknet_focus_s": "cs3darknet_focus",
             "densenet121": "densenet", "levit_conv_128s": "levit_conv", "hrnet_w18_small": "hrnet",
             "lambda_resnet26rpt_256": "lambda_resnet"}
    assert {n: M.family_of(n) for n in cases} == cases
    assert [M.yolo_family_of(s) for s in ("yolov10n", "yolov9c-seg", "yolov3-tiny", "rtdetr-l", "yolo11-cls")] \
        == ["yolov10", "yolov9-seg", "yolov3", "rtdetr", "yolo11-cls"]


def test_timm_and_torchvision_models_in_process() -> None:
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    specs = [M.ModelSpec("timm:resnet10t", "timm", "resnet10t", "resnet/resnet", input_size=(3, 64, 64)),
             M.ModelSpec("timm:repvgg_a0", "timm", "repvgg_a0", "byobnet/repvgg", input_size=(3, 64, 64)),
             M.ModelSpec("tv:mobilenet_v3_small", "torchvision", "mobilenet_v3_small",
                         "mobilenetv3/mobilenet", input_size=(3, 64, 64))]
    recs = {s.id: X.measure(s, rounds=1) for s in specs}
    for r in recs.values():
        assert r["status"] == "ok", r["error"]
        assert r["before"]["batch_norm"] > 0
        for key in ("reparam", "reparam_inputs", "fx"):
            assert {"error", "broken"} <= set(r["variants"][key])
    lib = recs["timm:repvgg_a0"]["variants"]["library"]
    assert recs["timm:repvgg_a0"]["makers"]["library"].startswith("timm.utils.model.reparameterize_model")
    assert lib["counts"]["batch_norm"] == 0 and not lib["wrong"]  # timm's own deploy form folds every BN
    assert "library" not in recs["timm:resnet10t"]["variants"]
    assert "reparam/library" in recs["timm:repvgg_a0"]["time"]["paired_ratio"]
    t = S.totals(list(recs.values()))
    assert t["measured"] == 3 and t["variants"]["reparam"]["compared_with_library"] == 1
