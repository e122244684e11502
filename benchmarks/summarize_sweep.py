"""Totals, worst offenders, chart and the docs table of the model sweep (``results/model_sweep.json``).

``python benchmarks/summarize_sweep.py`` rewrites everything between ``<!-- sweep:start -->`` and
``<!-- sweep:end -->`` in ``docs/model_sweep.md``; ``--check`` only reports whether the page is up to date.
The functions here work on the JSON records alone (no torch), so the totals can be recomputed from any
merged result file; ``model_sweep.py`` stores them in the JSON as well.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from summarize import rewrite_page, table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- sweep:start -->", "<!-- sweep:end -->"
#: ``max|fused - unfused| / max|unfused|`` above this (or a different output structure) counts as wrong.
WRONG_ABOVE = 1e-4
FUSE_VARIANTS = {"reparam": "`reparam.fuse(model)`", "reparam_inputs": "`reparam.fuse(model, example_inputs)`",
                 "reparam_export": "`reparam.fuse(torch.export.export(model, example_inputs))`"}
CATEGORIES = {
    "raised": "fuse raised",
    "broken": "broken (fused model raises when called)",
    "wrong": f"wrong (max diff / output scale > {WRONG_ABOVE:g})",
    "costlier": "costlier (more executed convs or weight MACs)",
    "bn_without_reason": "BN executed after fusion without a listed reason",
    "bn_above_library": "more executed BN than the library's deploy form",
    "conv_above_library": "more executed convs than the library's deploy form",
    "slow_vs_library": "fuse time / library deploy",
    "slow_vs_deepcopy": "fuse time / deepcopy",
}


# -- per-model facts -------------------------------------------------------------------------------------------
def _ok(r: dict) -> bool:
    return r.get("status") == "ok"


def _variant(r: dict, key: str) -> dict | None:
    return (r.get("variants") or {}).get(key)


def _ran(v: dict | None) -> bool:
    return bool(v) and v.get("error") is None and not v.get("broken")


def facts(r: dict, key: str) -> dict[str, Any]:
    """What went wrong for one model and one fuse variant: ``category -> sortable badness`` (absent = fine)."""
    v, lib = _variant(r, key), _variant(r, "library")
    out: dict[str, Any] = {}
    if not _ok(r) or v is None:
        return out
    if v.get("error"):
        out["raised"] = v["error"]
    elif v.get("broken"):
        out["broken"] = v.get("run_error")
    else:
        if v.get("wrong"):
            out["wrong"] = v.get("rel")
        before, after = r["before"], v["counts"]
        if v.get("costlier"):
            out["costlier"] = max(after["conv"] / max(before["conv"], 1),
                                  after["weight_macs"] / max(before["weight_macs"], 1))
        missing = (v.get("report") or {}).get("bn_without_reason", after["batch_norm"] if after["batch_norm"] else 0)
        if missing:
            out["bn_without_reason"] = missing
        if _ran(lib) and not lib.get("wrong"):
            if after["batch_norm"] > lib["counts"]["batch_norm"]:
                out["bn_above_library"] = after["batch_norm"] - lib["counts"]["batch_norm"]
            if after["conv"] > lib["counts"]["conv"]:
                out["conv_above_library"] = after["conv"] - lib["counts"]["conv"]
    ratios = (r.get("time") or {}).get("paired_ratio", {})
    if f"{key}/library" in ratios:
        out["slow_vs_library"] = ratios[f"{key}/library"]
    if f"{key}/deepcopy" in ratios:
        out["slow_vs_deepcopy"] = ratios[f"{key}/deepcopy"]
    return out


def _spread(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median": statistics.median(values) if values else None,
            "worst": max(values) if values else None}


def totals(records: list[dict]) -> dict[str, Any]:
    """Counts over all records (each model once), per fuse variant, and for the library and fx deploy forms."""
    ok = [r for r in records if _ok(r)]
    out: dict[str, Any] = {
        "models": len(records), "measured": len(ok),
        "by_status": dict(Counter(r.get("status") for r in records)),
        "by_source": dict(Counter(r.get("source") for r in records)),
        "reparam_commits": sorted({str(r.get("reparam_commit")) for r in records}),
        "input_modified": sum(1 for r in ok if r.get("input_unchanged") is False),
        "bn_executed_before": sum(r["before"]["batch_norm"] for r in ok),
        "variants": {},
    }
    for key in FUSE_VARIANTS:
        per = [facts(r, key) for r in ok]
        t: dict[str, Any] = {c: sum(1 for f in per if c in f) for c in CATEGORIES if not c.startswith("slow")}
        ran = [_variant(r, key) for r in ok if _ran(_variant(r, key))]
        t["ran"] = len(ran)
        t["bn_executed_after"] = sum(v["counts"]["batch_norm"] for v in ran)
        t["models_with_bn_after"] = sum(1 for v in ran if v["counts"]["batch_norm"])
        t["bn_without_reason_total"] = sum(f.get("bn_without_reason", 0) for f in per)
        t["compared_with_library"] = sum(1 for r in ok if _ran(_variant(r, key)) and _ran(_variant(r, "library")))
        t["time_vs_library"] = _spread([f["slow_vs_library"] for f in per if "slow_vs_library" in f])
        t["time_vs_library_by_source"] = {
            src: _spread([f["slow_vs_library"] for r, f in zip(ok, per) if "slow_vs_library" in f and
                          r["source"] == src]) for src in sorted({r["source"] for r in ok if _variant(r, "library")})}
        t["time_vs_deepcopy"] = _spread([f["slow_vs_deepcopy"] for f in per if "slow_vs_deepcopy" in f])
        out["variants"][key] = t
    pairs = [(_variant(r, "reparam_export"), _variant(r, "reparam_inputs")) for r in ok]
    pairs = [(e, i) for e, i in pairs if _ran(e) and _ran(i)]
    out["export_vs_eager"] = {
        "models": len(pairs),
        "same_ops": sum(1 for e, i in pairs if all(e["counts"][k] == i["counts"][k] for k in ("conv", "batch_norm"))),
        "more_ops": sum(1 for e, i in pairs if any(e["counts"][k] > i["counts"][k] for k in ("conv", "batch_norm"))),
        "time_ratio": _spread([e["make_s"] / i["make_s"] for e, i in pairs if i.get("make_s")]),
    }
    for key in ("library", "fx"):
        vs = [(r, _variant(r, key)) for r in ok if _variant(r, key) is not None]
        out[key] = {"models": len(vs), "raised": sum(1 for _, v in vs if v.get("error")),
                    "broken": sum(1 for _, v in vs if v.get("broken")),
                    "wrong": sum(1 for _, v in vs if _ran(v) and v.get("wrong")),
                    "costlier": sum(1 for _, v in vs if _ran(v) and v.get("costlier")),
                    "bn_executed_after": sum(v["counts"]["batch_norm"] for _, v in vs if _ran(v)),
                    "time_vs_deepcopy": _spread([r["time"]["paired_ratio"]["library/deepcopy"] for r, v in vs
                                                 if key == "library" and "library/deepcopy" in
                                                 (r.get("time") or {}).get("paired_ratio", {})])}
    return out


def offenders(records: list[dict], key: str, n: int = 10) -> dict[str, list[tuple[str, Any]]]:
    """The ``n`` worst models per category for one fuse variant (largest badness first; errors by name)."""
    out: dict[str, list[tuple[str, Any]]] = {c: [] for c in CATEGORIES}
    for r in records:
        for c, bad in facts(r, key).items():
            if c in ("slow_vs_library", "slow_vs_deepcopy") and bad <= 1.0:
                continue
            out[c].append((r["id"], bad))
    for c, rows in out.items():
        rows.sort(key=lambda t: (-t[1], t[0]) if isinstance(t[1], (int, float)) else (0, t[0]))
        out[c] = rows[:n]
    return out


# -- text ----------------------------------------------------------------------------------------------------------
def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def totals_line(t: dict, key: str) -> str:
    v = t["variants"][key]
    return (f"{FUSE_VARIANTS[key]}: {v['wrong']} wrong / {v['broken']} broken / {v['raised']} raised / "
            f"{v['costlier']} costlier / {v['bn_without_reason']} with BN left without a reason "
            f"({v['bn_without_reason_total']} BN) / {v['bn_above_library']} with more executed BN than the library "
            f"deploy form / {v['conv_above_library']} with more convs than it (of {v['compared_with_library']}) / "
            "fuse time " + "; ".join(
                f"vs {src}'s deploy form median {_x(sp['median'])}, worst {_x(sp['worst'])} (n={sp['n']})"
                for src, sp in v.get("time_vs_library_by_source", {}).items())
            + f"; vs deepcopy median {_x(v['time_vs_deepcopy']['median'])}, worst "
            f"{_x(v['time_vs_deepcopy']['worst'])}")


def totals_text(t: dict) -> str:
    status = ", ".join(f"{n} {s}" for s, n in sorted(t["by_status"].items()))
    lines = [f"{t['models']} models ({status}); executed BN before fusion: {t['bn_executed_before']}"]
    for key in FUSE_VARIANTS:
        lines.append(totals_line(t, key))
        lines.append(f"{FUSE_VARIANTS[key]}: executed BN after: {t['variants'][key]['bn_executed_after']} in "
                     f"{t['variants'][key]['models_with_bn_after']} models")
    ev = t.get("export_vs_eager")
    if ev and ev["models"]:
        lines.append(f"exported program fused vs the eager `reparam.fuse(model, example_inputs)`: {ev['models']} "
                     f"models fused both ways, {ev['same_ops']} with the same executed convs and BN, "
                     f"{ev['more_ops']} with more; fuse time (checks and the re-export included) median "
                     f"{_x(ev['time_ratio']['median'])} of the eager one's, worst {_x(ev['time_ratio']['worst'])}")
    lib, fx = t["library"], t["fx"]
    lines.append(f"library deploy forms: {lib['models']} models, {lib['raised']} raised, {lib['broken']} broken, "
                 f"{lib['wrong']} wrong, executed BN after {lib['bn_executed_after']}")
    lines.append(f"torch.fx fuse: {fx['raised']} raised, {fx['broken']} broken, {fx['wrong']} wrong, "
                 f"executed BN after {fx['bn_executed_after']}")
    return "\n".join(lines)


def _fmt_bad(c: str, bad: Any) -> str:
    if isinstance(bad, str) or bad is None:
        return f" ({bad[:80]})" if bad else ""
    if c == "wrong":
        return f" ({bad:.1e})"
    if c in ("costlier", "slow_vs_library", "slow_vs_deepcopy"):
        return f" ({bad:.2f}x)"
    return f" ({bad})"


def _counts(v: dict | None, field: str) -> str:
    if v is None:
        return ""
    if v.get("error"):
        return "raised"
    if v.get("broken"):
        return "broken"
    return str(v["counts"][field])


def _e(v: dict | None) -> str:
    if not _ran(v):
        return ""
    rel = v.get("rel")
    return "**diff**" if rel is None or math.isinf(rel) else (f"**{rel:.1e}**" if v.get("wrong") else f"{rel:.0e}")


def model_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in sorted(records, key=lambda r: (r["source"], r["family"], r["id"])):
        if not _ok(r):
            rows.append([f"`{r['id']}`", r["family"], f"{r.get('params', 0) / 1e6:.1f}M",
                         f"{r['status']}: {str(r.get('error', ''))[:90].replace('|', '/')}"] + [""] * 8)
            continue
        vs = {k: _variant(r, k) for k in ("reparam", "reparam_inputs", "library", "fx")}
        ratios = (r.get("time") or {}).get("paired_ratio", {})
        bn = " / ".join(_counts(vs[k], "batch_norm") or "-" for k in ("reparam", "reparam_inputs", "library"))
        conv = " / ".join(_counts(vs[k], "conv") or "-" for k in ("reparam", "reparam_inputs", "library"))
        missing = [str((vs[k].get("report") or {}).get("bn_without_reason", "")) if _ran(vs[k]) else "-"
                   for k in ("reparam", "reparam_inputs")]
        rows.append([f"`{r['id']}`", r["family"], f"{r['params'] / 1e6:.1f}M", "ok",
                     f"{r['before']['batch_norm']} → {bn}", f"{r['before']['conv']} → {conv}", " / ".join(missing),
                     f"{_e(vs['reparam'])} / {_e(vs['reparam_inputs'])}", _counts(vs["fx"], "batch_norm") or "-",
                     _x(ratios.get("reparam_inputs/deepcopy")), _x(ratios.get("reparam_inputs/library")),
                     _x(ratios.get("library/deepcopy"))])
    return rows


def render(d: dict, doc: Path, results_png: Path) -> str:
    t = d["totals"]
    env, src = d.get("environment", {}), d.get("reparam", {})
    parts = []
    if d.get("quick") or not d.get("complete", True):
        parts.append("> **Partial or quick run**: not every selected model was measured, or only the `--quick` "
                     "subset; do not quote these numbers.")
    parts.append(f"_Measured {env.get('date', '?')} on {env.get('processor', '?')} ({env.get('cpu_count', '?')} "
                 f"cores), Python {env.get('python', '?')}, torch {env.get('torch')}, timm {env.get('timm')}, "
                 f"torchvision {env.get('torchvision')}, ultralytics {env.get('ultralytics')}; reparam "
                 f"{src.get('commit')}{' (modified)' if src.get('dirty') else ''}; "
                 f"{d['settings'].get('rounds')} timing rounds per model._")
    if len(t["reparam_commits"]) > 1:
        parts.append(f"**Records from several reparam commits are merged here: {', '.join(t['reparam_commits'])}.**")
    parts.append("**Totals**\n\n" + "\n".join(f"- {line}" for line in totals_text(t).splitlines()))
    for key, label in FUSE_VARIANTS.items():
        worst = offenders(d["models"], key)
        lines = [f"**Worst offenders, {label}** (10 per category)", ""]
        for c, rows in worst.items():
            if rows:
                lines.append(f"- {CATEGORIES[c]}: " + ", ".join(f"`{i}`{_fmt_bad(c, b)}" for i, b in rows))
        parts.append("\n".join(lines))
    parts.append("**Every model.** Executed BN and convs: before → `reparam.fuse` without / with example inputs / "
                 "the library's deploy form (`-`: none). *No reason*: executed BN after fusion minus the BN the "
                 "report lists as left (without / with inputs). *Error*: max diff / output scale. Times are the "
                 "median of per-round paired ratios.")
    parts.append(table(["model", "family", "params", "status", "BN", "conv", "no reason", "error (w/o / with)",
                         "fx.fuse BN", "fuse / deepcopy", "fuse / library", "library / deepcopy"],
                        model_rows(d["models"])))
    if results_png.exists():
        parts.append(f"![model sweep]({Path(os.path.relpath(results_png, doc.parent)).as_posix()})")
    return "\n\n".join(parts)


def section(d: dict) -> str:
    """The short block for docs/benchmarks.md: the totals and a link to the full page."""
    return ("\n".join(f"- {line}" for line in totals_text(d["totals"]).splitlines())
            + "\n\nEvery model, the worst offenders and the method: [model_sweep.md](model_sweep.md).")


# -- chart ---------------------------------------------------------------------------------------------------------
def plot(records: list[dict], path: Path, quick: bool = False) -> None:
    import _common as C

    plt = C.pyplot()
    ok = [r for r in records if _ok(r) and _ran(_variant(r, "reparam_inputs"))]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    colors = {"timm": "#2a7ab9", "torchvision": "#c0504d", "ultralytics": "#4f9a4f", "local": "#777777"}
    for ax, field, title in ((axes[0], "batch_norm", "executed BN"), (axes[1], "conv", "executed convs")):
        for src, color in colors.items():
            rs = [r for r in ok if r["source"] == src]
            if not rs:
                continue
            ax.scatter([r["before"][field] for r in rs],
                       [_variant(r, "reparam_inputs")["counts"][field] for r in rs], s=14, color=color, label=src)
        libs = [r for r in ok if _ran(_variant(r, "library"))]
        ax.scatter([r["before"][field] for r in libs], [_variant(r, "library")["counts"][field] for r in libs],
                   s=30, facecolors="none", edgecolors="black", label="library deploy form")
        top = max([1] + [r["before"][field] for r in ok])
        ax.plot([0, top], [0, top], color="#999999", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("before fusion")
        ax.set_ylabel("after reparam.fuse(model, example_inputs)")
        ax.set_title(f"{title} per model (dashed: unchanged)", fontsize=10)
        _legend(ax)
        ax.grid(True, alpha=0.3)
    ax = axes[2]
    for key, color, label in (("reparam_inputs/deepcopy", "#2a7ab9", "fuse / deepcopy"),
                              ("reparam_inputs/library", "#c0504d", "fuse / library deploy"),
                              ("library/deepcopy", "#999999", "library / deepcopy")):
        vals = sorted(r["time"]["paired_ratio"][key] for r in ok if key in (r.get("time") or {}).get("paired_ratio",
                                                                                                        {}))
        if vals:
            ax.plot([vals[0], *vals], [0, *((i + 1) / len(vals) for i in range(len(vals)))], drawstyle="steps-post",
                    color=color, label=f"{label} (n={len(vals)})")
    for xv in (1, 3):
        ax.axvline(xv, color="#555555", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("paired time ratio (median of rounds)")
    ax.set_ylabel("fraction of models")
    ax.set_title("fuse time (with example inputs)", fontsize=10)
    _legend(ax)
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"reparam.fuse on third-party models: the {len(ok)} of {len(records)} where the fused model runs"
                 + ("  [quick run]" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results" / "model_sweep.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "model_sweep.md")
    p.add_argument("--check", action="store_true", help="only report whether the page is up to date")
    args = p.parse_args(argv)
    d = json.loads(args.results.read_text())
    d["totals"] = totals(d["models"])
    return rewrite_page(args.doc, START, END,
                        lambda: render(d, args.doc.resolve(), args.results.resolve().with_suffix(".png")),
                        args.check, "summarize_sweep.py", args.results)


if __name__ == "__main__":
    raise SystemExit(main())
