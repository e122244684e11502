"""What fusing costs, against model size.

torch: ``reparam.fuse(model)`` side by side with ``copy.deepcopy(model)`` of the same model (``fuse`` returns a
new model, so a deep copy is the floor of what it has to do), with torch on one thread and on every core
(``fuse`` splits kernels of 4M+ elements among torch's threads; ``deepcopy``'s tensor copies use them too).  The garbage
collector runs, untimed, before every call so both start from the same heap.  ONNX: the graph pass as the CLI
runs it (``reparam.onnx.fuse(path)``, which loads the file, then ``onnx.save`` of the result) side by side with
a plain ``onnx.load`` + ``onnx.save`` round trip of the same file.  Each pair is timed alternately
(A, B, A, B, ...); medians are reported, and for torch the median of the per-round ratios.

Models: RepGhostNet at all eight widths, ResNet50Like (25.6M params) and RepVGGNet (123M params); one
untimed warm-up call per candidate.  Writes ``fuse_cost.json`` and ``fuse_cost.png`` (time against
parameters, log-log).
"""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common as C

FULL_MODELS = [*(f"repghostnet_{w}" for w in C.REPGHOST_WIDTHS), "resnet50like", "repvggnet"]
QUICK_MODELS = ["repghostnet_0_5x", "repghostnet_1_0x"]


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated model keys (default: all; --quick: two small ones)")
    p.add_argument("--repeats", type=int, help="alternating timed runs per pair (default 7, RepVGGNet 5; quick 2)")
    args = p.parse_args(argv)

    import onnx
    import torch

    import reparam
    import reparam.onnx as ronnx
    import reparam_zoo
    from reparam.measure import environment, interleaved_medians, interleaved_times, paired_ratio, torch_threads

    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    cores = torch.get_num_threads()
    torch.set_num_threads(1)  # the ONNX pass and everything untimed; the torch pair also runs on all cores
    tmp = Path(tempfile.mkdtemp(prefix="reparam-fuse-cost-"))
    rows = []
    try:
        for key in models:
            repeats = args.repeats or (2 if args.quick else (5 if key == "repvggnet" else 7))
            model = C.trained_like(key, args.seed)
            params = reparam_zoo.count_params(model)
            warmup = 1
            reports: dict = {}

            def torch_fuse(m=model, reports=reports):
                reports["torch"] = reparam.fuse(m).reparam_report

            torch_rows = {}
            for threads in dict.fromkeys((1, cores)):
                C.log(f"{key}: {params:,} params, torch on {threads} thread(s) ({repeats} alternating runs, "
                      f"{warmup} warm-up)")
                with torch_threads(threads):
                    times = interleaved_times({"fuse": torch_fuse, "deepcopy": lambda m=model: copy.deepcopy(m)},
                                              repeats=repeats, warmup=warmup, collect=True)
                med = {k: statistics.median(v) for k, v in times.items()}
                torch_rows[threads] = {"threads": threads, "fuse_s": med["fuse"], "deepcopy_s": med["deepcopy"],
                                       "ratio_fuse_over_deepcopy": med["fuse"] / med["deepcopy"],
                                       "paired_ratio_fuse_over_deepcopy": paired_ratio(times, "fuse", "deepcopy")}

            C.log(f"{key}: exporting to ONNX")
            src = C.export_onnx(model, torch.randn(1, 3, 224, 224), tmp / f"{key}.onnx")
            size = os.path.getsize(src)
            split: dict[str, list[float]] = {"fuse": [], "save": []}

            def onnx_pass(src=src, split=split, reports=reports):
                t0 = time.perf_counter()
                out, reports["onnx"] = ronnx.fuse(str(src), return_report=True)
                t1 = time.perf_counter()
                onnx.save(out, str(tmp / "pass.onnx"))
                split["fuse"].append(t1 - t0)
                split["save"].append(time.perf_counter() - t1)

            def round_trip(src=src):
                onnx.save(onnx.load(str(src)), str(tmp / "roundtrip.onnx"))

            C.log(f"{key}: ONNX pass vs load+save ({repeats} alternating runs, {warmup} warm-up)")
            onnx_med = interleaved_medians({"pass": onnx_pass, "roundtrip": round_trip}, repeats=repeats,
                                           warmup=warmup)
            split = {k: v[warmup:] for k, v in split.items()}
            del model
            src.unlink()
            rows.append({
                "model": key, "label": C.width_label(key), "params": params, "onnx_bytes": size,
                "repeats": repeats, "warmup": warmup,
                "torch": {**torch_rows[1], "regions": len(reports["torch"].regions),
                          "refused": len(reports["torch"].refused)},
                "torch_all_cores": torch_rows[cores],
                "onnx": {"pass_s": onnx_med["pass"], "roundtrip_s": onnx_med["roundtrip"],
                         "pass_fuse_only_s": statistics.median(split["fuse"]),
                         "pass_save_only_s": statistics.median(split["save"]),
                         "ratio_pass_over_roundtrip": onnx_med["pass"] / onnx_med["roundtrip"],
                         "regions": len(reports["onnx"].regions), "refused": len(reports["onnx"].refusals)},
            })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "benchmark": "fuse_cost", "quick": args.quick, "environment": environment(threads=1),
        "settings": {"models": models, "onnx_export": "torch.onnx.export(dynamo=False, opset_version=17), 224x224",
                     "torch_pair": "reparam.fuse(model) vs copy.deepcopy(model), alternating, gc.collect() "
                                   "(untimed) before each call; torch on 1 thread, then on all cores",
                     "all_cores": cores, "target_ratio": 3.0,
                     "onnx_pair": "reparam.onnx.fuse(path) + onnx.save vs onnx.load(path) + onnx.save, alternating",
                     "statistic": "median seconds", "seed": args.seed},
        "models": rows,
    }
    path = C.write_json(args.out, "fuse_cost", result)
    _plot(rows, args.out / "fuse_cost.png", args.quick)
    print("\nfuse cost (median seconds; ratio measured side by side)" + ("  [QUICK: noisy]" if args.quick else ""))
    C.print_table(
        ["model", "params", "fuse", "deepcopy", "ratio", f"ratio {cores} thr", "ONNX MB", "ONNX pass", "load+save",
         "ratio"],
        [[r["label"], f"{r['params'] / 1e6:.1f}M", f"{r['torch']['fuse_s']:.3f} s", f"{r['torch']['deepcopy_s']:.3f} s",
          f"{r['torch']['paired_ratio_fuse_over_deepcopy']:.2f}x",
          f"{r['torch_all_cores']['paired_ratio_fuse_over_deepcopy']:.2f}x", f"{r['onnx_bytes'] / 1e6:.1f}",
          f"{r['onnx']['pass_s']:.3f} s", f"{r['onnx']['roundtrip_s']:.3f} s",
          f"{r['onnx']['ratio_pass_over_roundtrip']:.1f}x"] for r in rows])
    print(f"\nwrote {path} and {args.out / 'fuse_cost.png'}")
    return 0


def _plot(rows: list[dict], path: Path, quick: bool) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    params = [r["params"] for r in rows]
    panels = [
        (axes[0], "torch: reparam.fuse vs copy.deepcopy", "torch",
         [("fuse_s", "reparam.fuse", "#2a7ab9"), ("deepcopy_s", "copy.deepcopy", "#9a9a9a")],
         "paired_ratio_fuse_over_deepcopy"),
        (axes[1], "ONNX: reparam.onnx.fuse + save vs load + save", "onnx",
         [("pass_s", "ONNX pass (+ save)", "#c0504d"), ("roundtrip_s", "onnx.load + onnx.save", "#9a9a9a")],
         "ratio_pass_over_roundtrip"),
    ]
    for ax, title, side, series, ratio in panels:
        for field, label, color in series:
            ax.plot(params, [r[side][field] for r in rows], "o-", color=color, label=label)
        for r in rows:
            ax.annotate(f"{r[side][ratio]:.1f}x", (r["params"], r[side][series[0][0]]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training-form parameters")
        ax.set_ylabel("median seconds")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("fusion cost vs model size" + ("  [quick run: noisy]" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
