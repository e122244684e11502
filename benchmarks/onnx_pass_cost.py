"""The ONNX pass as the command runs it, against a plain load + save of the same file, on large models.

``reparam onnx IN OUT -q`` (read, check, fuse, write: ``reparam.cli.main``) and ``onnx.save(onnx.load(IN))``
are timed alternately (A, B, A, B, ...) with the garbage collector run (untimed) before each call; the
result is the median over rounds of the per-round ratio, so drift over the run cancels in each pair.
Target: at most 2x on RepVGGNet (123M training-form parameters), the model of issue 11.  Writes
``onnx_pass_cost.json`` and ``.png`` and, with ``--docs``, a table in docs/onnx.md.

    .venv/bin/python benchmarks/onnx_pass_cost.py            # RepVGGNet and ResNet50Like, ~5 min
    .venv/bin/python benchmarks/onnx_pass_cost.py --quick    # RepGhostNet 0.5x, seconds
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import _common as C

DOC = C.HERE.parent / "docs" / "onnx.md"
START, END = "<!-- onnx_pass_cost:start -->", "<!-- onnx_pass_cost:end -->"
TARGET = 2.0


def render(d: dict) -> str:
    from summarize import provenance, t, table, x

    rows = []
    for r in d["models"]:
        ok = "yes" if r["paired_ratio"] <= TARGET else "**no**"
        rows.append([r["label"], f"{r['params'] / 1e6:.1f}M", f"{r['onnx_bytes'] / 1e6:.0f} MB", t(r["pass_s"]),
                     t(r["roundtrip_s"]), x(r["paired_ratio"]), f"{x(min(r['ratios']))} - {x(max(r['ratios']))}",
                     ok])
    return "\n\n".join([
        provenance(d),
        f"`reparam onnx IN OUT -q` against `onnx.save(onnx.load(IN), OUT)`, alternating, {d['settings']['repeats']} "
        "rounds; medians, and the median of the per-round ratios.",
        table(["model", "params", "ONNX file", "`reparam onnx`", "load + save", "pass / load+save (paired)",
               "range over rounds", f"<= {TARGET:g}x"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated model keys (default repvggnet,resnet50like; quick: one small)")
    p.add_argument("--repeats", type=int, help="alternating rounds (default 7; quick 2)")
    p.add_argument("--docs", action="store_true", help="write the table into docs/onnx.md")
    p.add_argument("--render-only", action="store_true", help="only redraw the chart / table from the JSON")
    args = p.parse_args(argv)
    if args.render_only:
        d = json.loads((args.out / "onnx_pass_cost.json").read_text())
        _finish(d, args)
        return 0

    import onnx
    import torch

    from reparam.cli import main as cli
    from reparam.measure import environment, interleaved_times, paired_ratio

    torch.set_num_threads(1)
    models = args.models.split(",") if args.models else (["repghostnet_0_5x"] if args.quick
                                                         else ["repvggnet", "resnet50like"])
    repeats = args.repeats or (2 if args.quick else 7)
    tmp = Path(tempfile.mkdtemp(prefix="reparam-pass-cost-"))
    rows = []
    try:
        for key in models:
            model = C.trained_like(key, args.seed)
            params = sum(int(v.numel()) for v in model.parameters())
            C.log(f"{key}: exporting ({params / 1e6:.1f}M params)")
            src = C.export_onnx(model, torch.randn(1, 3, 224, 224), tmp / f"{key}.onnx")
            del model

            def run_pass(src=src):
                if cli(["onnx", str(src), str(tmp / "fused.onnx"), "-q"]) != 0:
                    raise RuntimeError("reparam onnx failed")

            def round_trip(src=src):
                onnx.save(onnx.load(str(src)), str(tmp / "roundtrip.onnx"))

            C.log(f"{key}: {repeats} alternating rounds")
            times = interleaved_times({"pass": run_pass, "roundtrip": round_trip}, repeats=repeats, warmup=1,
                                      collect=True)
            ratios = [a / b for a, b in zip(times["pass"], times["roundtrip"])]
            rows.append({"model": key, "label": C.width_label(key), "params": params,
                         "onnx_bytes": os.path.getsize(src), "pass_s": statistics.median(times["pass"]),
                         "roundtrip_s": statistics.median(times["roundtrip"]),
                         "paired_ratio": paired_ratio(times, "pass", "roundtrip"), "ratios": ratios,
                         "times": times})
            C.log(f"{key}: pass {rows[-1]['pass_s']:.2f} s, load+save {rows[-1]['roundtrip_s']:.2f} s, "
                  f"paired ratio {rows[-1]['paired_ratio']:.2f}")
            src.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = {"benchmark": "onnx_pass_cost", "quick": args.quick, "environment": environment(threads=1),
         "settings": {"models": models, "repeats": repeats, "target_ratio": TARGET, "seed": args.seed,
                      "export": "torch.onnx.export(dynamo=False, opset_version=17), 224x224",
                      "pair": "reparam.cli.main(['onnx', IN, OUT, '-q']) vs onnx.save(onnx.load(IN), OUT)"},
         "models": rows}
    C.write_json(args.out, "onnx_pass_cost", d)
    _finish(d, args)
    return 0


def _finish(d: dict, args) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for k, r in enumerate(d["models"]):
        ax.scatter(r["ratios"], [k] * len(r["ratios"]), color="#c0504d", alpha=0.6, s=20)
        ax.scatter([r["paired_ratio"]], [k], color="black", marker="|", s=300)
    ax.axvline(TARGET, color="#444", ls="--", lw=1, label=f"target {TARGET:g}x")
    ax.set_yticks(range(len(d["models"])), [r["label"] for r in d["models"]])
    ax.set_xlabel("reparam onnx / (onnx.load + onnx.save), per round (bar: median)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "onnx_pass_cost.png", dpi=110)
    plt.close(fig)
    import sys

    sys.path.insert(0, str(C.HERE))
    text = render(d)
    print(text)
    if args.docs:
        doc = DOC.read_text()
        head, rest = doc.split(START, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(f"{head}{START}\n{text}\n\n![pass cost](../benchmarks/results/onnx_pass_cost.png)\n{END}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
