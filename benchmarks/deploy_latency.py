"""Is the automatically fused model as fast as a hand-written deploy model?  One thread, batch 1.

torch: the training form, ``reparam.fuse(training form)`` and the hand-written deploy form, timed interleaved
in one process.  The hand-written form is ``reparam_zoo.convert(model)`` for RepGhostNet (the reference
implementation's deploy structure) and the ``deploy=True`` class for ResNet50Like and RepVGGNet, loaded with
the same folded weights (each block folded on its own), so both run on the same numbers.  Target:
fused/hand <= 1.02.

ONNX Runtime (ORT_ENABLE_ALL for every graph, one intra-op thread): ``reparam.onnx.fuse`` of the training-form
export against the export of the hand-written deploy form (target: ratio <= 1.02), and against the unfused
training-form export, which ORT's own optimizer partly folds (Conv+BN) but whose branches it cannot collapse.

Inputs are 224x224 except RepVGGNet (123M params, 9.5 GMACs at 128x128), which runs at 128x128 to bound time.
Writes ``deploy_latency.json`` and ``deploy_latency.png``.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import _common as C

FULL_MODELS = ["repghostnet_0_5x", "repghostnet_1_0x", "repghostnet_1_5x", "resnet50like", "repvggnet"]
QUICK_MODELS = ["repghostnet_1_0x"]
TARGET = 1.02


def _repeats(key: str, quick: bool, override: int | None) -> int:
    if override:
        return override
    if quick:
        return 3
    return {"repvggnet": 20, "resnet50like": 20}.get(key, 30)


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated model keys (default: RepGhostNet 0.5x/1.0x/1.5x, "
                                    "ResNet50Like, RepVGGNet; --quick: RepGhostNet 1.0x)")
    p.add_argument("--repeats", type=int, help="interleaved timed runs per variant (default 30; ResNet50Like 20, "
                                               "RepVGGNet 20; quick 3)")
    p.add_argument("--ort-level", default="all", choices=["disable", "basic", "extended", "all"],
                   help="ONNX Runtime graph optimization level for every session (default all)")
    args = p.parse_args(argv)

    import onnx
    import torch

    import reparam
    import reparam.onnx as ronnx
    import reparam_zoo
    from reparam.measure import environment, interleaved_times, ort_runner, ort_session, paired_ratio, torch_runner

    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    tmp = Path(tempfile.mkdtemp(prefix="reparam-deploy-latency-"))
    rows = []
    try:
        for key in models:
            size = C.input_size(key)
            repeats = _repeats(key, args.quick, args.repeats)
            torch.manual_seed(args.seed)
            x = torch.randn(1, 3, size, size)
            model = C.trained_like(key, args.seed)
            C.log(f"{key}: fusing and building the hand-written deploy form")
            fused = reparam.fuse(model)
            fx_report = {"regions": len(fused.reparam_report.regions), "refused": len(fused.reparam_report.refused)}
            if key.startswith(("repghostnet_", "ghostnet_")):
                hand, how = reparam_zoo.convert(model), "reparam_zoo.convert(model)"
            else:
                hand = C.build_model(key, deploy=True).eval()
                C.load_deploy_weights(model, hand)
                how = f"{type(hand).__name__}(deploy=True), weights folded block by block"
            with torch.no_grad():
                ref = model(x)
                err = {"fused": C.max_rel(ref, fused(x)), "hand": C.max_rel(ref, hand(x))}
            if max(err.values()) > 1e-4:
                raise RuntimeError(f"{key}: a deploy form does not match the training form: max rel error {err}")
            macs, params = reparam_zoo.profile(model, (1, 3, size, size))
            d_macs, d_params = reparam_zoo.profile(hand, (1, 3, size, size))

            C.log(f"{key}: torch, {repeats} interleaved runs per variant")
            t_runs = interleaved_times({"training": torch_runner(model, (x,)), "fused": torch_runner(fused, (x,)),
                                        "hand": torch_runner(hand, (x,))}, repeats=repeats)
            t = {k: statistics.median(v) for k, v in t_runs.items()}

            C.log(f"{key}: ONNX export and reparam.onnx.fuse")
            train_p = C.export_onnx(model, x, tmp / "train.onnx")
            hand_p = C.export_onnx(hand, x, tmp / "hand.onnx")
            fused_p = tmp / "fused.onnx"
            fused_onnx, report = ronnx.fuse(str(train_p), return_report=True)
            onnx.save(fused_onnx, str(fused_p))
            nodes = {k: _node_counts(onnx.load(str(pth), load_external_data=False))
                     for k, pth in (("training", train_p), ("fused", fused_p), ("hand", hand_p))}
            del fused_onnx, model, fused, hand
            feeds = {"input": x.numpy()}
            sessions = {k: ort_session(str(pth), threads=1, optimize=args.ort_level)
                        for k, pth in (("training", train_p), ("fused", fused_p), ("hand", hand_p))}
            outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
            ort_err = {"fused": C.max_rel(ref.numpy(), outs["fused"]), "hand": C.max_rel(ref.numpy(), outs["hand"]),
                       "training": C.max_rel(ref.numpy(), outs["training"])}
            C.log(f"{key}: ONNX Runtime, {repeats} interleaved runs per variant")
            o_runs = interleaved_times({k: ort_runner(s, feeds) for k, s in sessions.items()}, repeats=repeats)
            o = {k: statistics.median(v) for k, v in o_runs.items()}
            del sessions
            for f in tmp.iterdir():
                f.unlink()
            rows.append({
                "model": key, "label": C.width_label(key), "input": [1, 3, size, size], "repeats": repeats,
                "hand_written_form": how,
                "params": {"training": params, "deploy": d_params}, "macs": {"training": macs, "deploy": d_macs},
                "torch": {"latency_s": t, "ratio_fused_over_hand": paired_ratio(t_runs, "fused", "hand"),
                          "ratio_of_medians_fused_over_hand": t["fused"] / t["hand"],
                          "ratio_training_over_fused": paired_ratio(t_runs, "training", "fused"), "max_rel_error": err,
                          **fx_report},
                "onnx": {"latency_s": o, "ratio_fused_over_hand": paired_ratio(o_runs, "fused", "hand"),
                         "ratio_of_medians_fused_over_hand": o["fused"] / o["hand"],
                         "ratio_training_over_fused": paired_ratio(o_runs, "training", "fused"),
                         "max_rel_error_vs_torch": ort_err,
                         "nodes": nodes, "regions": len(report.regions), "refused": len(report.refusals)},
            })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for r in rows:
        for side in ("torch", "onnx"):
            r[side]["meets_target"] = r[side]["ratio_fused_over_hand"] <= TARGET
    result = {
        "benchmark": "deploy_latency", "quick": args.quick, "environment": environment(threads=1),
        "settings": {"models": models, "batch": 1, "threads": 1, "target_ratio": TARGET,
                     "ort_optimization": args.ort_level, "repvgg_input": C.REPVGG_INPUT,
                     "onnx_export": "torch.onnx.export(dynamo=False, opset_version=17)",
                     "bn_statistics": "reparam.testing.torch_checks.randomize_bn_", "statistic": "median seconds",
                     "seed": args.seed},
        "models": rows,
    }
    path = C.write_json(args.out, "deploy_latency", result)
    _plot(rows, args.out / "deploy_latency.png", args.quick)
    print("\ndeploy latency, 1 thread, batch 1 (medians; ratios from one interleaved run)"
          + ("  [QUICK: noisy]" if args.quick else ""))
    C.print_table(
        ["model", "input", "torch train", "fused", "hand", "fused/hand",
         "ORT train", "fused", "hand", "fused/hand", "train/fused"],
        [[r["label"], r["input"][-1], C.ms(r["torch"]["latency_s"]["training"]), C.ms(r["torch"]["latency_s"]["fused"]),
          C.ms(r["torch"]["latency_s"]["hand"]), f"{r['torch']['ratio_fused_over_hand']:.3f}",
          C.ms(r["onnx"]["latency_s"]["training"]), C.ms(r["onnx"]["latency_s"]["fused"]),
          C.ms(r["onnx"]["latency_s"]["hand"]), f"{r['onnx']['ratio_fused_over_hand']:.3f}",
          f"{r['onnx']['ratio_training_over_fused']:.3f}"] for r in rows])
    print(f"\nwrote {path} and {args.out / 'deploy_latency.png'}")
    return 0


def _node_counts(model) -> dict[str, int]:
    c = Counter(n.op_type for n in model.graph.node)
    return {"Conv": c["Conv"], "BatchNormalization": c["BatchNormalization"], "Add": c["Add"] + c["Sum"],
            "total": sum(c.values())}


def _plot(rows: list[dict], path: Path, quick: bool) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    variants = [("training", "training form", "#b0b0b0"), ("fused", "reparam fused", "#2a7ab9"),
                ("hand", "hand-written deploy", "#f0a030")]
    for ax, side, title in ((axes[0], "torch", "PyTorch"), (axes[1], "onnx", "ONNX Runtime (ORT_ENABLE_ALL)")):
        xs = range(len(rows))
        for j, (k, label, color) in enumerate(variants):
            # normalized to the hand-written form so that models of very different cost share one axis
            vals = [r[side]["latency_s"][k] / r[side]["latency_s"]["hand"] for r in rows]
            ax.bar([i + (j - 1) * 0.27 for i in xs], vals, 0.27, label=label, color=color)
            if k == "fused":
                for i, v in enumerate(vals):
                    ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(TARGET, color="#c0504d", lw=0.8, ls="--", label=f"target {TARGET}")
        ax.set_xticks(list(xs), [f"{r['label']}\n{r['input'][-1]}px, {r[side]['latency_s']['hand'] * 1e3:.1f} ms"
                                 for r in rows], fontsize=7)
        ax.set_ylabel("latency / hand-written deploy latency")
        ax.set_title(f"{title}, 1 thread, batch 1", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("fused vs hand-written deploy form" + ("  [quick run: noisy]" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
