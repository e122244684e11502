"""Regenerate the results section of docs/benchmarks.md from benchmarks/results/*.json.

Everything between ``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced: one subsection per
benchmark with its tables (times with units, ratios) and its chart.  A benchmark without a result file gets a
"not run yet" line.  ``--check`` exits non-zero if the page is out of date instead of writing it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ("fuse_cost", "deploy_latency", "concat_vs_add", "latency_vs_macs", "fusion_accuracy", "model_sweep",
         "fuse_time")
TITLES = {
    "fuse_cost": "Fusion cost against model size",
    "deploy_latency": "Fused vs hand-written deploy form",
    "concat_vs_add": "Concatenation vs add (paper Table 1)",
    "latency_vs_macs": "Latency vs MACs (paper Figure 1, without accuracy)",
    "fusion_accuracy": "Fusion accuracy: float64 algebra vs a naive float32 fold",
    "model_sweep": "Model sweep: reparam.fuse on third-party models",
    "fuse_time": "Fuse time on third-party models, each timed alone",
}
#: How to produce a result file, where it is not the project venv running ``benchmarks/<name>.py``.
RUN = {"model_sweep": "PYTHONPATH=$PWD /tmp/reparam-thirdparty/bin/python benchmarks/model_sweep.py",
       "fuse_time": "PYTHONPATH=$PWD /tmp/reparam-thirdparty/bin/python benchmarks/fuse_time.py"}


# -- formatting ------------------------------------------------------------------------------------------------
def t(seconds: float | None) -> str:
    """A duration with a unit chosen for it."""
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def x(ratio: float | None, digits: int = 2) -> str:
    return "-" if ratio is None else f"{ratio:.{digits}f}x"


def e(value: float) -> str:
    return f"{value:.1e}"


def count(n: float, unit: str = "M") -> str:
    return f"{n / {'M': 1e6, 'G': 1e9}[unit]:.1f}{unit}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def provenance(d: dict) -> str:
    env = d.get("environment", {})
    text = (f"_Measured {env.get('date', '?')} on {env.get('processor', '?')} ({env.get('cpu_count', '?')} cores), "
            f"Python {env.get('python', '?')}, torch {env.get('torch', '?')}, onnxruntime {env.get('onnxruntime', '?')}"
            f", onnx {env.get('onnx', '?')}._")
    if d.get("quick"):
        text = ("> **Quick smoke run** (`--quick`: few repeats, few models, machine possibly busy): the numbers "
                "below only show that the script works; do not quote them.\n\n" + text)
    return text


# -- one section per benchmark ---------------------------------------------------------------------------------
def fuse_cost(d: dict) -> str:
    s = d["settings"]
    target = s.get("target_ratio", 3.0)
    cores = s.get("all_cores", "all")
    torch_rows, onnx_rows = [], []
    for r in d["models"]:
        one, many, on = r["torch"], r["torch_all_cores"], r["onnx"]
        ok = "yes" if max(one["paired_ratio_fuse_over_deepcopy"], many["paired_ratio_fuse_over_deepcopy"]) < target \
            else "**no**"
        torch_rows.append([r["label"], count(r["params"]), t(one["fuse_s"]), t(one["deepcopy_s"]),
                           x(one["paired_ratio_fuse_over_deepcopy"], 2), t(many["fuse_s"]), t(many["deepcopy_s"]),
                           x(many["paired_ratio_fuse_over_deepcopy"], 2), ok])
        onnx_rows.append([r["label"], f"{r['onnx_bytes'] / 1e6:.1f} MB", t(on["pass_s"]), t(on["pass_fuse_only_s"]),
                          t(on["roundtrip_s"]), x(on["ratio_pass_over_roundtrip"], 1)])
    return "\n\n".join([
        f"torch: medians of alternating runs (repeats per model in the JSON), the garbage collector run before "
        f"each call; each ratio is the median of the per-round ratios. Torch on 1 thread, then on {cores}.",
        table(["model", "params", "`reparam.fuse` 1 thread", "`copy.deepcopy` 1 thread", "fuse / deepcopy",
               f"`reparam.fuse` {cores} threads", f"`copy.deepcopy` {cores} threads", "fuse / deepcopy",
               f"< {target:g}x"], torch_rows),
        "ONNX: medians of alternating runs; the ratio compares two medians taken in the same run.",
        table(["model", "ONNX file", "ONNX pass + save", "of which `reparam.onnx.fuse`", "`onnx.load` + `onnx.save`",
               "pass / round trip"], onnx_rows),
    ])


def deploy_latency(d: dict) -> str:
    s = d["settings"]
    target = s.get("target_ratio", 1.02)
    torch_rows, ort_rows = [], []
    for r in d["models"]:
        tl, ol = r["torch"]["latency_s"], r["onnx"]["latency_s"]
        size = f"{r['input'][-1]}x{r['input'][-2]}"
        ok_t = "yes" if r["torch"]["ratio_fused_over_hand"] <= target else "**no**"
        ok_o = "yes" if r["onnx"]["ratio_fused_over_hand"] <= target else "**no**"
        torch_rows.append([r["label"], size, t(tl["training"]), t(tl["fused"]), t(tl["hand"]),
                           x(r["torch"]["ratio_fused_over_hand"], 3), ok_t, e(r["torch"]["max_rel_error"]["fused"])])
        nodes = r["onnx"]["nodes"]
        ort_rows.append([r["label"], size, t(ol["training"]), t(ol["fused"]), t(ol["hand"]),
                         x(r["onnx"]["ratio_fused_over_hand"], 3), ok_o, x(r["onnx"]["ratio_training_over_fused"], 3),
                         f"{nodes['training']['total']} / {nodes['fused']['total']} / {nodes['hand']['total']}"])
    return "\n\n".join([
        f"One thread, batch 1, medians of interleaved runs; fused / hand is the median over rounds of the "
        f"ratio timed in the same round. Target: fused / hand-written <= {target}. "
        f"RepVGGNet runs at {s.get('repvgg_input', 128)}x{s.get('repvgg_input', 128)}. The hand-written form is "
        "`reparam_zoo.convert` for RepGhostNet and the `deploy=True` class (same folded weights) otherwise.",
        "**PyTorch**",
        table(["model", "input", "training form", "`reparam.fuse`", "hand-written", "fused / hand",
               f"<= {target}", "fused max rel. error"], torch_rows),
        f"**ONNX Runtime** (`{s.get('ort_optimization', 'all')}` graph optimization for every graph; the training "
        "form is the plain export, whose Conv+BN pairs ORT folds itself but whose branches it keeps)",
        table(["model", "input", "training export", "`reparam.onnx.fuse`", "hand-written export", "fused / hand",
               f"<= {target}", "training / fused", "nodes (train / fused / hand)"], ort_rows),
    ])


def concat_vs_add(d: dict) -> str:
    paper = d["paper_table1"]
    pp = {b: (c, a, r) for b, c, a, r in zip(paper["batch"], paper["concat_ms"], paper["add_ms"], paper["ratio"])}
    rows = []
    for r in d["batches"]:
        b = r["batch"]
        for side, sfx, label in (("torch", "", "torch"), ("torch", "_nhwc", "torch, channels-last"),
                                 ("onnxruntime", "", "ONNX Runtime")):
            med = r[side]["total_s"]
            if f"concat{sfx}" not in med:
                continue
            ratio = med[f"concat{sfx}"] / med[f"add{sfx}"]
            corr = (med[f"concat{sfx}"] - med["overhead"]) / max(med[f"add{sfx}"] - med["overhead"], 1e-12)
            paper_cells = [f"{pp[b][0]} ms", f"{pp[b][1]} ms", x(pp[b][2])] if b in pp else ["-", "-", "-"]
            rows.append([str(b), label, t(med[f"concat{sfx}"]), t(med[f"add{sfx}"]), t(med["overhead"]), x(ratio),
                         x(corr), *paper_cells])
    s = d["settings"]
    return "\n\n".join([
        f"The {s['ops']} concatenations of GhostNet 1.0x at their real shapes ({s['output_elements_per_image']:,} "
        "output values per image), against adds with the same output shape; totals over the 32 ops, one thread, "
        "medians of interleaved runs. *overhead* is 32 ops on one-element tensors (dispatch cost alone); "
        "*minus overhead* subtracts it from both. The paper measured an ARM phone with MNN.",
        table(["batch", "runtime", "concat", "add", "overhead", "concat / add", "concat / add, minus overhead",
               "paper concat", "paper add", "paper concat / add"], rows),
    ])


def latency_vs_macs(d: dict) -> str:
    rows = []
    for r in d["models"]:
        lat = r["latency_s"]
        paper = f"{r['paper_latency_ms']} ms" if r.get("paper_latency_ms") else "-"
        rows.append([r["label"], count(r["macs"]), count(r["params"]), t(lat["torch"]["training"]),
                     t(lat["torch"]["deploy"]), t(lat["onnxruntime"]["training"]), t(lat["onnxruntime"]["deploy"]),
                     paper])
    claim = d["claim"]
    parts = [
        "One thread, batch 1, 224x224; every variant of every model in one interleaved run per runtime. Deploy: "
        "`reparam.fuse` (torch) and `reparam.onnx.fuse` (ONNX, run with ORT_ENABLE_ALL). Paper: ARM phone, MNN.",
        table(["model", "MACs", "params", "torch training", "torch deploy", "ORT training", "ORT deploy",
               "paper latency"], rows),
        f"**Claim: \"{claim['statement']}\"** ({claim['method']}). Verdict: **{claim['verdict']}**.",
    ]
    pts = []
    for side in ("torch", "onnxruntime"):
        for p in claim.get(side, {}).get("points", []):
            pts.append([side, p["ghostnet"], count(p["macs"]), f"{p['ghostnet_ms']:.2f} ms",
                        f"{p['repghostnet_ms']:.2f} ms" + (" (extrapolated)" if p["extrapolated"] else ""),
                        x(p["ratio"], 3), "yes" if p["faster"] else "**no**"])
    if pts:
        parts.append(table(["runtime", "GhostNet", "MACs", "GhostNet deploy", "RepGhostNet at same MACs",
                            "RepGhostNet / GhostNet", "RepGhostNet faster"], pts))
    return "\n\n".join(parts)


def fusion_accuracy(d: dict) -> str:
    rows = []
    for r in d["models"]:
        o, w = r["output"], r["weights"]
        rows.append([r["label"], r["setting"], e(o["unfused_float32"]["max_rel"]),
                     e(o["reparam_fuse_float32"]["max_rel"]), e(o["reparam_convert_float32"]["max_rel"]),
                     e(o["naive_fold_float32"]["max_rel"]), e(o["reparam_fuse_float64"]["max_rel"]),
                     e(w["reparam_convert_float32"]["max_rel"]), e(w["naive_fold_float32"]["max_rel"])])
    summ = d["summary"]["weight_error_naive_over_reparam"]
    return "\n\n".join([
        "Max relative error of the logits, `max|y - y_ref| / max|y_ref|`, against the unfused model run in "
        f"float64 (input {d['settings']['input']}). The last two columns compare the folded weights themselves "
        "with the exact fold, worst tensor.",
        table(["model", "BN statistics", "unfused float32", "`reparam.fuse` float32", "`convert` float32",
               "naive float32 fold", "`reparam.fuse` float64", "weights: reparam", "weights: naive float32"], rows),
        f"Weight error of the naive float32 fold over reparam's: {summ['min']:.1f}x to {summ['max']:.1f}x.",
    ])


def model_sweep(d: dict) -> str:
    import summarize_sweep

    return summarize_sweep.section(d)


def fuse_time(d: dict) -> str:
    tot, s = d["totals"], d["settings"]

    def cells(sp: dict | None) -> list[str]:
        if not sp:
            return ["-"] * 5
        return [str(sp["models"]), x(sp["median"]), f"{x(sp['p25'])} - {x(sp['p75'])}", x(sp["worst"]),
                f"{sp['above']} above {sp['bound']:g}x"]

    spread_rows = [["`reparam.fuse` / `copy.deepcopy`", "all", *cells(tot["reparam/deepcopy"])]]
    spread_rows += [["", src, *cells(sp)] for src, sp in tot["reparam/deepcopy_by_source"].items()]
    spread_rows.append(["`reparam.fuse` / library conversion", "all", *cells(tot["reparam/library"])])
    spread_rows += [["", src, *cells(sp)] for src, sp in tot["reparam/library_by_source"].items()]
    spread_rows.append(["library conversion / `copy.deepcopy`", "all", *cells(tot["library/deepcopy"])])
    libs = sorted((r for r in d["models"] if r.get("status") == "ok" and "library" in r),
                  key=lambda r: (r["source"], not r["extra"], r["paired_ratio"]["reparam/library"]))
    lib_rows = [[f"`{r['id']}`" + (" (extra)" if r["extra"] else ""), count(r["params"]),
                 t(r["median_s"]["reparam"]), t(r["median_s"]["library"]), t(r["median_s"]["deepcopy"]),
                 x(r["paired_ratio"]["reparam/library"]), x(r["paired_ratio"]["reparam/deepcopy"]),
                 x(r["paired_ratio"]["library/deepcopy"])] for r in libs]
    failed = [f"`{r['id']}` ({r['status']}: {r['error']})" for r in d["models"] if r.get("status") != "ok"]
    worst = sorted((r for r in d["models"] if r.get("status") == "ok" and not r["extra"]),
                   key=lambda r: -r["paired_ratio"]["reparam/deepcopy"])[:10]
    return "\n\n".join([
        f"The sweep's {tot['timed']} models (the BN member with the fewest parameters of every timm, torchvision "
        f"and ultralytics family) and the `--extra` ones ({s['extra'].replace(',', ', ')}), one after another "
        f"in one process on one thread, nothing else running: {s['rounds']} interleaved rounds of "
        "`reparam.fuse(model)`, the library's conversion where there is one and `copy.deepcopy(model)`, the "
        "garbage collector run before each call. Ratios are medians of per-round paired ratios; the spreads "
        "are over the sweep's models (the extra ones apart).",
        table(["ratio", "models from", "models", "median", "quartiles", "worst", "count"], spread_rows),
        "Worst `reparam.fuse` / `copy.deepcopy`: " + ", ".join(
            f"`{r['id']}` {x(r['paired_ratio']['reparam/deepcopy'])}" for r in worst) + ".",
        "**Every model with a library conversion** (timm: `reparameterize_model`; ultralytics: "
        "`copy.deepcopy(model).fuse()`)",
        table(["model", "params", "`reparam.fuse`", "library", "`copy.deepcopy`", "fuse / library",
               "fuse / deepcopy", "library / deepcopy"], lib_rows),
        *(["Not timed: " + "; ".join(failed) + "."] if failed else []),
    ])


SECTIONS = {"fuse_cost": fuse_cost, "deploy_latency": deploy_latency, "concat_vs_add": concat_vs_add,
            "latency_vs_macs": latency_vs_macs, "fusion_accuracy": fusion_accuracy, "model_sweep": model_sweep,
            "fuse_time": fuse_time}


def render(results: Path, doc: Path) -> str:
    link_base = Path(os.path.relpath(results, doc.parent))
    out = []
    for name in ORDER:
        out.append(f"### {TITLES[name]}")
        path = results / f"{name}.json"
        if not path.exists():
            out.append(f"_Not run yet: `{RUN.get(name, f'.venv/bin/python benchmarks/{name}.py')}`._")
            continue
        try:
            d = json.loads(path.read_text())
            body = SECTIONS[name](d)
        except (KeyError, TypeError, ValueError) as err:
            out.append(f"_`{path.name}` could not be summarized ({type(err).__name__}: {err}); rerun the benchmark._")
            continue
        out.append(provenance(d))
        out.append(body)
        if (results / f"{name}.png").exists():
            out.append(f"![{TITLES[name]}]({(link_base / f'{name}.png').as_posix()})")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results", help="directory of the result files")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md", help="page to update")
    p.add_argument("--check", action="store_true", help="only report whether the page is up to date")
    args = p.parse_args(argv)

    return rewrite_page(args.doc, START, END, lambda: render(args.results.resolve(), args.doc.resolve()),
                        args.check, "summarize.py", args.results)


def rewrite_page(doc: Path, start: str, end: str, body, check: bool, script: str, results: Path) -> int:
    """Replace what lies between the ``start`` and ``end`` markers of ``doc`` with ``body()``; the exit code.

    ``check``: write nothing, return 1 if the page would change (``script`` is named as the fix).
    """
    text = doc.read_text()
    if start not in text or end not in text:
        print(f"{doc}: markers {start} / {end} not found", file=sys.stderr)
        return 2
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{body()}\n{end}{tail}"
    if check:
        if new != text:
            print(f"{doc} is out of date; run benchmarks/{script}")
            return 1
        return 0
    doc.write_text(new)
    print(f"updated {doc} from {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
