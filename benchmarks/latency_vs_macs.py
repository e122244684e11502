"""The paper's Figure 1 without the accuracy axis: one-thread latency against MACs, RepGhostNet vs GhostNet.

RepGhostNet at all eight widths and GhostNet 0.5x/1.0x/1.3x, batch 1, 224x224, in PyTorch and ONNX Runtime
(ORT_ENABLE_ALL, one intra-op thread), each in training form and deploy form.  Deploy forms: ``reparam.fuse``
of the training form in torch, ``reparam.onnx.fuse`` of its export in ONNX (GhostNet has no
re-parameterization branches, but its BatchNorms fold the same way).  MACs are ``reparam_zoo.profile`` of the
training form (the paper's convention).  Every variant of every model is timed in one interleaved run per
runtime, so the two families are measured side by side.

The paper's claim "RepGhostNet is faster than GhostNet at similar MACs" is tested per runtime on the deploy
forms: RepGhostNet's latency is interpolated (piecewise linear in log-log) at each GhostNet's MAC count and
compared with that GhostNet's latency.  Writes ``latency_vs_macs.json`` and ``latency_vs_macs.png``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import _common as C

FULL_MODELS = [*(f"repghostnet_{w}" for w in C.REPGHOST_WIDTHS), *(f"ghostnet_{w}" for w in C.GHOST_WIDTHS)]
QUICK_MODELS = ["repghostnet_0_5x", "repghostnet_1_0x", "ghostnet_1_0x"]
# Table 3 of the paper: latency (ms) on an ARM-based phone with MNN, one thread, for reference.
PAPER_MS = {"ghostnet_0_5x": 31.7, "repghostnet_0_5x": 25.1, "repghostnet_0_58x": 31.9, "ghostnet_1_0x": 74.5,
            "repghostnet_1_0x": 62.2, "repghostnet_1_11x": 71.5, "ghostnet_1_3x": 117.6, "repghostnet_1_3x": 92.9,
            "repghostnet_1_5x": 116.9}
SIDES = ("torch", "onnxruntime")


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated zoo names (default: all RepGhostNet widths and GhostNet "
                                    "0.5x/1.0x/1.3x; --quick: RepGhostNet 0.5x/1.0x, GhostNet 1.0x)")
    p.add_argument("--repeats", type=int, help="interleaved runs per variant (default 20; quick 3)")
    args = p.parse_args(argv)

    import onnx
    import torch

    import reparam
    import reparam.onnx as ronnx
    import reparam_zoo
    from reparam.measure import environment, interleaved_medians, ort_runner, ort_session, torch_runner

    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    repeats = args.repeats or (3 if args.quick else 20)
    torch.manual_seed(args.seed)
    x = torch.randn(1, 3, 224, 224)
    feeds = {"input": x.numpy()}
    tmp = Path(tempfile.mkdtemp(prefix="reparam-latency-macs-"))
    info: dict[str, dict] = {}
    torch_fns, ort_fns = {}, {}
    try:
        for key in models:
            C.log(f"{key}: building, fusing, exporting")
            train = C.trained_like(key, args.seed)
            deploy = reparam.fuse(train)
            macs, params = reparam_zoo.profile(train)
            d_macs, d_params = reparam_zoo.profile(deploy)
            train_p = C.export_onnx(train, x, tmp / f"{key}.train.onnx")
            deploy_p = tmp / f"{key}.deploy.onnx"
            onnx.save(ronnx.fuse(str(train_p)), str(deploy_p))
            sessions = {f: ort_session(str(pth), threads=1, optimize="all")
                        for f, pth in (("training", train_p), ("deploy", deploy_p))}
            with torch.no_grad():
                ref = train(x).numpy()
                err = {"torch": C.max_rel(ref, deploy(x).numpy()),
                       "onnxruntime": C.max_rel(ref, sessions["deploy"].run(None, feeds)[0])}
            if max(err.values()) > 1e-4:
                raise RuntimeError(f"{key}: the deploy form does not match the training form: {err}")
            for form, model in (("training", train), ("deploy", deploy)):
                torch_fns[f"{key}/{form}"] = torch_runner(model, (x,))
                ort_fns[f"{key}/{form}"] = ort_runner(sessions[form], feeds)
            info[key] = {"label": C.width_label(key), "family": "RepGhostNet" if key.startswith("rep") else "GhostNet",
                         "macs": macs, "params": params, "deploy_macs": d_macs, "deploy_params": d_params,
                         "deploy_max_rel_error": err, "paper_latency_ms": PAPER_MS.get(key)}
        n = len(torch_fns)
        C.log(f"torch: {n} variants, {repeats} interleaved runs each")
        t_med = interleaved_medians(torch_fns, repeats=repeats)
        C.log(f"ONNX Runtime: {n} variants, {repeats} interleaved runs each")
        o_med = interleaved_medians(ort_fns, repeats=repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for key, d in info.items():
        lat = {side: {form: med[f"{key}/{form}"] for form in ("training", "deploy")}
               for side, med in (("torch", t_med), ("onnxruntime", o_med))}
        rows.append({"model": key, **d, "latency_s": lat,
                     "speedup_training_over_deploy": {s: lat[s]["training"] / lat[s]["deploy"] for s in SIDES}})
    claim = _test_claim(rows)
    result = {
        "benchmark": "latency_vs_macs", "quick": args.quick, "environment": environment(threads=1),
        "settings": {"models": models, "input": [1, 3, 224, 224], "threads": 1, "repeats": repeats,
                     "ort_optimization": "all", "onnx_export": "torch.onnx.export(dynamo=False, opset_version=17)",
                     "deploy_torch": "reparam.fuse(training form)",
                     "deploy_onnx": "reparam.onnx.fuse(training-form export)",
                     "macs": "reparam_zoo.profile(training form), 224x224",
                     "bn_statistics": "reparam.testing.torch_checks.randomize_bn_", "statistic": "median seconds",
                     "seed": args.seed},
        "models": rows,
        "claim": claim,
    }
    path = C.write_json(args.out, "latency_vs_macs", result)
    _plot(rows, claim, args.out / "latency_vs_macs.png", args.quick)
    print("\nlatency vs MACs, 1 thread, batch 1, 224x224 (medians)" + ("  [QUICK: noisy]" if args.quick else ""))
    C.print_table(["model", "MACs", "params", "torch train", "torch deploy", "ORT train", "ORT deploy", "paper"],
                  [[r["label"], f"{r['macs'] / 1e6:.1f}M", f"{r['params'] / 1e6:.2f}M",
                    C.ms(r["latency_s"]["torch"]["training"]), C.ms(r["latency_s"]["torch"]["deploy"]),
                    C.ms(r["latency_s"]["onnxruntime"]["training"]), C.ms(r["latency_s"]["onnxruntime"]["deploy"]),
                    f"{r['paper_latency_ms']} ms" if r["paper_latency_ms"] else "-"] for r in rows])
    print(f"\nclaim '{claim['statement']}': {claim['verdict']}")
    for side in SIDES:
        for pt in claim[side]["points"]:
            print(f"  {side:>11} at {pt['macs'] / 1e6:6.1f}M MACs: GhostNet {pt['ghostnet_ms']:.2f} ms, "
                  f"RepGhostNet (interpolated) {pt['repghostnet_ms']:.2f} ms, ratio {pt['ratio']:.3f}"
                  + ("  (extrapolated)" if pt["extrapolated"] else ""))
    print(f"\nwrote {path} and {args.out / 'latency_vs_macs.png'}")
    return 0


def _test_claim(rows: list[dict]) -> dict:
    """RepGhostNet deploy latency interpolated at each GhostNet's MACs, per runtime."""
    rep = sorted((r for r in rows if r["family"] == "RepGhostNet"), key=lambda r: r["macs"])
    ghost = [r for r in rows if r["family"] == "GhostNet"]
    claim: dict = {"statement": "RepGhostNet is faster than GhostNet at similar MACs",
                   "method": "deploy forms; RepGhostNet latency interpolated piecewise-linearly in log-log space "
                             "at each GhostNet's training-form MACs (extrapolated from the end points outside "
                             "RepGhostNet's MAC range); ratio = RepGhostNet / GhostNet latency",
                   "testable": len(rep) >= 2 and bool(ghost)}
    for side in SIDES:
        points = []
        if claim["testable"]:
            xs = [r["macs"] for r in rep]
            ys = [r["latency_s"][side]["deploy"] for r in rep]
            for g in ghost:
                y, extrapolated = C.loglog_interp(xs, ys, g["macs"])
                g_s = g["latency_s"][side]["deploy"]
                points.append({"ghostnet": g["model"], "macs": g["macs"], "ghostnet_ms": g_s * 1e3,
                               "repghostnet_ms": y * 1e3, "ratio": y / g_s, "faster": y < g_s,
                               "extrapolated": extrapolated})
        claim[side] = {"points": points, "holds": bool(points) and all(pt["faster"] for pt in points),
                       "mean_ratio": sum(pt["ratio"] for pt in points) / len(points) if points else None}
    if not claim["testable"]:
        claim["holds_in_both"] = None
        claim["verdict"] = "not testable (needs at least two RepGhostNet widths and one GhostNet)"
    else:
        claim["holds_in_both"] = all(claim[s]["holds"] for s in SIDES)
        parts = [f"{s}: {'holds' if claim[s]['holds'] else 'does not hold'} (mean ratio {claim[s]['mean_ratio']:.3f})"
                 for s in SIDES]
        claim["verdict"] = "; ".join(parts)
    return claim


def _plot(rows: list[dict], claim: dict, path: Path, quick: bool) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"RepGhostNet": ("#2a7ab9", "o"), "GhostNet": ("#c0504d", "s")}
    for ax, side, title in ((axes[0], "torch", "PyTorch"), (axes[1], "onnxruntime", "ONNX Runtime (ORT_ENABLE_ALL)")):
        for family, (color, marker) in styles.items():
            fam = sorted((r for r in rows if r["family"] == family), key=lambda r: r["macs"])
            if not fam:
                continue
            macs = [r["macs"] / 1e6 for r in fam]
            ax.plot(macs, [r["latency_s"][side]["deploy"] * 1e3 for r in fam], marker + "-", color=color,
                    label=f"{family} deploy")
            ax.plot(macs, [r["latency_s"][side]["training"] * 1e3 for r in fam], marker + ":", color=color,
                    alpha=0.45, mfc="none", label=f"{family} training form")
            for r in fam:
                ax.annotate(r["label"].split()[-1], (r["macs"] / 1e6, r["latency_s"][side]["deploy"] * 1e3),
                            textcoords="offset points", xytext=(-6, 6), fontsize=7, color=color, ha="right")
        ax.margins(x=0.08, y=0.08)
        if claim.get(side) and claim[side]["points"]:
            ax.set_title(f"{title}\nRepGhostNet / GhostNet latency at equal MACs: "
                         f"{claim[side]['mean_ratio']:.2f} (mean)", fontsize=9)
        else:
            ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        C.plain_log_ticks(ax)
        ax.set_xlabel("MACs (M), 224x224")
        ax.set_ylabel("latency, 1 thread, batch 1 (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("latency vs MACs" + ("  [quick run: noisy]" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
