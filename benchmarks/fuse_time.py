"""``reparam.fuse`` time on the model sweep's models, each timed alone, against ``copy.deepcopy`` and the
library's own deploy conversion.

Runs in the shared third-party venv (timm, torchvision, ultralytics), importing ``reparam`` from PYTHONPATH:

    PYTHONPATH=$PWD /tmp/reparam-thirdparty/bin/python benchmarks/fuse_time.py              # about 35 minutes
    ... benchmarks/fuse_time.py --models 'timm:fastvit*' --rounds 7 --out /tmp/fuse_time.json

``model_sweep.py`` times fusion as well, but beside all its checks, and it is usually run as two processes side
by side (an hour otherwise), which share the caches and memory bandwidth of this 2-core machine.  Here one
process, on one thread, times one model after another and nothing else: per model, after one untimed call of
each, ``--rounds`` rounds of ``reparam.fuse(model)``, the library conversion (timm's ``reparameterize_model``
where a module has ``fuse``/``reparameterize``/``switch_to_deploy``, as the sweep picks it; ultralytics'
``fuse``) and ``copy.deepcopy(model)``, interleaved, the garbage collector run before each call
(:func:`reparam.measure.interleaved_times`).  Each ratio is the median of the per-round ratios.  The models are
the sweep's list (computed from the registries, ``_sweep_models``) plus ``--extra`` ones, by default the larger
re-parameterized members the issue quotes (RepVGG-B3, MobileOne-S4, FastViT-SA12), where timm's conversion does
the most work.  The result file is rewritten after every model; ``benchmarks/summarize.py`` turns it into a
section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common as C
import _sweep_models as M
import model_sweep

DEFAULT_JSON = C.DEFAULT_OUT / "fuse_time.json"
EXTRA = ("timm:repvgg_b3", "timm:mobileone_s4", "timm:fastvit_sa12")
#: fuse / deepcopy above this counts as too slow (the issue's bound); fuse / library above 1 as well.
DEEPCOPY_BOUND = 3.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_JSON, help=f"result JSON (default {DEFAULT_JSON})")
    p.add_argument("--models", help="comma-separated glob patterns on id, name or family (as model_sweep.py)")
    p.add_argument("--extra", default=",".join(EXTRA), help="timm models timed as well (comma-separated ids)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="skip models already recorded in --out")
    args = p.parse_args(argv)
    os.environ.update({k: v for k, v in model_sweep.QUIET_ENV.items() if k not in os.environ})
    import torch

    torch.set_num_threads(1)
    specs = M.select(M.scanned_rows(model_sweep.CANDIDATES, False, log=C.log))
    specs = model_sweep.choose(specs, args.models, False)
    known = {s.id for s in specs}
    specs += [extra_spec(i) for i in args.extra.split(",") if i.strip() and i.strip() not in known]
    old = json.loads(args.out.read_text()).get("models", []) if args.resume and args.out.exists() else []
    records = {r["id"]: r for r in old}
    source = model_sweep.reparam_source()
    settings = {"rounds": args.rounds, "warmup": 1, "seed": args.seed, "threads": 1, "extra": args.extra,
                "deepcopy_bound": DEEPCOPY_BOUND}
    todo = [s for s in specs if s.id not in records]
    C.log(f"{len(specs)} models, {len(todo)} to time; reparam from {source['path']} ({source['commit']}"
          f"{', modified' if source['dirty'] else ''}); writing {args.out}")
    t0 = time.perf_counter()
    for k, spec in enumerate(todo, 1):
        rec = measure(spec, args.seed, args.rounds, extra=spec.id not in known)
        records[spec.id] = {**rec, "reparam_commit": source["commit"]}
        ratio = rec.get("paired_ratio", {})
        C.log(f"[{k}/{len(todo)}] {spec.id}: {rec['status']}" + "".join(f"  {key} {v:.2f}x" for key, v in ratio.items())
              + (f"  {rec['error']}" if rec["error"] else ""))
        write(args.out, list(records.values()), settings, source)
    data = write(args.out, list(records.values()), settings, source)
    plot(data, args.out.with_suffix(".png"))
    C.log(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.out} and {args.out.with_suffix('.png')}")
    print(json.dumps(data["totals"], indent=1))
    return 0


def extra_spec(model_id: str) -> M.ModelSpec:
    source, _, name = model_id.strip().partition(":")
    if source != "timm" or not name:
        raise SystemExit(f"--extra takes timm models as timm:<name>, not {model_id!r}")
    return M.ModelSpec(model_id.strip(), "timm", name, M.family_of(name))


def measure(spec: M.ModelSpec, seed: int, rounds: int, extra: bool = False) -> dict[str, Any]:
    """One model's record: median seconds and paired ratios; a failure is a record with its one-line error.
    ``extra``: not one of the sweep's models (kept out of the totals)."""
    import _sweep_measure as X

    import reparam

    rec: dict[str, Any] = {"id": spec.id, "source": spec.source, "name": spec.name, "family": spec.family,
                           "extra": extra, "status": "ok", "error": None}
    try:
        model, _ = X.built(spec, seed)
    except Exception as err:
        return {**rec, "status": "build failed", "error": M.one_line(err)}
    rec["params"] = sum(p.numel() for p in model.parameters())
    makers = {"reparam": lambda: reparam.fuse(model)}
    lib = X.library_deploy(spec, model)
    if lib is not None:
        rec["library"] = lib[0]
        makers["library"] = lib[1]
    try:
        return {**rec, **X.timing(makers, model, rounds, warmup=1)}
    except Exception as err:
        return {**rec, "status": "error", "error": M.one_line(err)}
    finally:
        makers.clear()  # (the model goes with this frame; its memory is back before the next one is built)
        gc.collect()


def totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Spreads of each ratio over the sweep's models (the ``--extra`` ones apart), overall and by source."""
    ok = [r for r in records if r.get("status") == "ok" and not r.get("extra")]

    def spread(key: str, rs: list[dict], bound: float) -> dict[str, Any] | None:
        vals = sorted(r["paired_ratio"][key] for r in rs if key in r["paired_ratio"])
        if not vals:
            return None
        q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else [vals[0]] * 3
        return {"models": len(vals), "median": statistics.median(vals), "p25": q[0], "p75": q[2],
                "worst": vals[-1], "above": sum(v > bound for v in vals), "bound": bound}

    sources = sorted({r["source"] for r in ok})
    return {"models": len(records), "timed": len(ok), "failed": sum(r.get("status") != "ok" for r in records),
            "reparam/deepcopy": spread("reparam/deepcopy", ok, DEEPCOPY_BOUND),
            "reparam/deepcopy_by_source": {s: spread("reparam/deepcopy", [r for r in ok if r["source"] == s],
                                                     DEEPCOPY_BOUND) for s in sources},
            "reparam/library": spread("reparam/library", ok, 1.0),
            "reparam/library_by_source": {s: spread("reparam/library", [r for r in ok if r["source"] == s], 1.0)
                                          for s in sources if any(r["source"] == s and "library" in r for r in ok)},
            "library/deepcopy": spread("library/deepcopy", ok, DEEPCOPY_BOUND)}


def write(path: Path, records: list[dict[str, Any]], settings: dict, source: dict) -> dict[str, Any]:
    from reparam.measure import environment

    records = sorted(records, key=lambda r: (r.get("extra", False), r["id"]))
    data = {"benchmark": "fuse_time", "environment": {**environment(threads=1), **M.library_versions()},
            "reparam": source, "settings": settings, "totals": totals(records), "models": records}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=C._jsonable))
    tmp.replace(path)
    return data


def plot(data: dict[str, Any], path: Path) -> None:
    """Left: the share of models at or below each fuse / deepcopy ratio, by source.  Right: fuse / timm's
    conversion per timm model that has one (ultralytics' conversion is in the docs table)."""
    plt = C.pyplot()
    ok = [r for r in data["models"] if r.get("status") == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.4]})
    colors = {"timm": "#2a7ab9", "torchvision": "#c0504d", "ultralytics": "#4f9a4f", "local": "#777777"}
    for src, color in colors.items():
        vals = sorted(r["paired_ratio"]["reparam/deepcopy"] for r in ok if r["source"] == src and not r["extra"])
        if vals:
            left.plot([vals[0], *vals], [0, *((i + 1) / len(vals) for i in range(len(vals)))],
                      drawstyle="steps-post", color=color, label=f"{src} (n={len(vals)})")
    left.axvline(DEEPCOPY_BOUND, color="#555555", lw=0.8, ls=":")
    left.set_xlabel("reparam.fuse / copy.deepcopy (median of paired rounds)")
    left.set_ylabel("fraction of models")
    left.set_title("fuse time against a deepcopy (dotted: 3x)", fontsize=10)
    left.grid(True, alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    libs = sorted((r for r in ok if r["source"] == "timm" and "reparam/library" in r["paired_ratio"]),
                  key=lambda r: r["paired_ratio"]["reparam/library"])
    if libs:
        ys = range(len(libs))
        right.barh(list(ys), [r["paired_ratio"]["reparam/library"] for r in libs],
                   color=["#e08a2c" if r["extra"] else colors["timm"] for r in libs])
        right.set_yticks(list(ys), [r["name"] for r in libs], fontsize=7)
        right.axvline(1.0, color="#555555", lw=0.8, ls=":")
        right.set_xscale("log")
        C.plain_log_ticks(right, axes="x")
        right.set_xlabel("reparam.fuse / timm.utils.model.reparameterize_model (orange: --extra models)")
        right.set_title("fuse time against timm's own conversion (dotted: 1x)", fontsize=10)
        right.grid(True, axis="x", which="both", alpha=0.3)
    fig.suptitle(f"reparam.fuse time on {len(ok)} third-party models, each timed alone (1 thread, "
                 f"{data['settings']['rounds']} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
