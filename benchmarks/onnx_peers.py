"""reparam's ONNX pass against the graph tools people use, on training-form exports of real architectures.

Every model is built in its training form (re-parameterizable branches unfused; timm and torchvision
architectures, plus one Keras RepVGG-style net exported by tf2onnx), given non-trivial BN statistics, put in
eval mode and exported with both torch exporters (TorchScript ``dynamo=False`` opset 17, and ``dynamo=True``
opset 18).  Each export then goes through: ``reparam.onnx.fuse``, the same with ``simplify="onnxslim"``
(``reparam onnx --simplify``), onnxsim, onnxslim, onnxoptimizer (its fuse-and-elimination passes) and ONNX
Runtime's offline optimizer (``ORT_ENABLE_BASIC``, the level whose output is plain ONNX).

Per result: BatchNormalization / Conv / node counts; exactness in ONNX Runtime (max |diff| / max |output| on a
random input, against the export, both run without graph optimizations); the tool's time (median of
``--tool-repeats`` runs); one-thread ORT latency (``ORT_ENABLE_ALL``) as the median over interleaved rounds of
the ratio to the export's latency measured in the same round.  Writes ``onnx_peers.json`` / ``.png`` and, with
``--docs``, the tables in docs/onnx.md.

    PYTHONPATH=$PWD /tmp/reparam-thirdparty/bin/python benchmarks/onnx_peers.py          # full run, ~40 min
    PYTHONPATH=$PWD /tmp/reparam-thirdparty/bin/python benchmarks/onnx_peers.py --quick  # smoke test
    python benchmarks/onnx_peers.py --render-only --docs                                 # tables from the JSON
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import _common as C

ROOT = C.HERE.parent
DOC = ROOT / "docs" / "onnx.md"
START, END = "<!-- onnx_peers:start -->", "<!-- onnx_peers:end -->"

#: (key, library, constructor name); all in their training form.
MODELS = [
    ("repvgg_a0", "timm", "repvgg_a0"),
    ("mobileone_s0", "timm", "mobileone_s0"),
    ("repghostnet_100", "timm", "repghostnet_100"),
    ("ghostnetv3_100", "timm", "ghostnetv3_100"),
    ("fastvit_t8", "timm", "fastvit_t8"),
    ("repvit_m0_9", "timm", "repvit_m0_9"),
    ("hgnetv2_b0", "timm", "hgnetv2_b0"),
    ("efficientvit_m0", "timm", "efficientvit_m0"),
    ("efficientnet_b0", "timm", "efficientnet_b0"),
    ("tf_efficientnet_b0", "timm", "tf_efficientnet_b0"),
    ("resnet18", "timm", "resnet18"),
    ("mobilenet_v2", "torchvision", "mobilenet_v2"),
    ("mobilenet_v3_small", "torchvision", "mobilenet_v3_small"),
    ("regnet_y_400mf", "torchvision", "regnet_y_400mf"),
    ("shufflenet_v2_x1_0", "torchvision", "shufflenet_v2_x1_0"),
    ("mnasnet0_5", "torchvision", "mnasnet0_5"),
]
QUICK_MODELS = ["repvgg_a0", "mobilenet_v3_small"]
EXPORTERS = ("torchscript", "dynamo")
TOOLS = ("reparam", "reparam+onnxslim", "onnxsim", "onnxslim", "onnxoptimizer", "ort_basic")
EXACT = 1e-4  # max |diff| / max |output| below this counts as exact in float32


# -- models and exports --------------------------------------------------------------------------------------
def build(library: str, name: str, seed: int):
    import torch

    from reparam.testing.torch_checks import randomize_bn_

    torch.manual_seed(seed)
    if library == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
    randomize_bn_(model, seed=seed)
    return model.eval()


def export_torch(model, size: int, path: Path, exporter: str) -> None:
    import contextlib
    import io

    import torch

    x = torch.randn(1, 3, size, size)
    dynamo = exporter == "dynamo"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17,
                          input_names=["x"], output_names=["y"])


KERAS_SCRIPT = r'''
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, tf2onnx, onnx
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.keras.utils.set_random_seed(int(sys.argv[3]))
L = tf.keras.layers
size = int(sys.argv[2])

def bn():
    rnd = tf.keras.initializers.RandomUniform
    return L.BatchNormalization(beta_initializer="random_normal", gamma_initializer=rnd(0.5, 1.5),
                                moving_mean_initializer="random_normal", moving_variance_initializer=rnd(0.5, 2.0))

def block(x, c, s):
    """RepVGG block: 3x3+BN, 1x1+BN and (stride 1, same width) a BN-only identity branch; "same" padding."""
    out = [bn()(L.Conv2D(c, 3, s, padding="same", use_bias=False)(x)),
           bn()(L.Conv2D(c, 1, s, padding="same", use_bias=False)(x))]
    if s == 1 and x.shape[-1] == c:
        out.append(bn()(x))
    return L.ReLU()(L.Add()(out))

inp = tf.keras.Input((size, size, 3))
x = inp
for c, n in ((48, 1), (48, 2), (96, 4), (192, 8), (1280, 1)):
    for i in range(n):
        x = block(x, c, 2 if i == 0 else 1)
x = L.Dense(1000)(L.GlobalAveragePooling2D()(x))
model = tf.keras.Model(inp, x)
spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="x"),)
proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
onnx.save(proto, sys.argv[1])
'''


def export_keras(path: Path, size: int, seed: int, python: str) -> None:
    """The Keras RepVGG-A0-like net through tf2onnx, in a subprocess (TensorFlow stays out of this process)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([python, "-c", KERAS_SCRIPT, str(path), str(size), str(seed)], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "tf2onnx failed")


# -- tools ---------------------------------------------------------------------------------------------------
def run_tool(tool: str, src: Path, dst: Path):
    """Run ``tool`` on the model file ``src``; returns the resulting ModelProto (also saved to ``dst``)."""
    import onnx

    import reparam.onnx as ronnx

    if tool == "reparam":
        out = ronnx.fuse(src)
    elif tool == "reparam+onnxslim":
        out = ronnx.fuse(src, simplify="onnxslim")
    elif tool == "onnxsim":
        import onnxsim

        out, ok = onnxsim.simplify(onnx.load(str(src)))
        if not ok:
            raise RuntimeError("onnxsim's check failed")
    elif tool == "onnxslim":
        import onnxslim

        out = onnxslim.slim(onnx.load(str(src)))
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        out = onnxoptimizer.optimize(onnx.load(str(src)), onnxoptimizer.get_fuse_and_elimination_passes())
    elif tool == "ort_basic":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(dst))
    else:
        raise ValueError(tool)
    onnx.save(out, str(dst))
    return out


def counts(model) -> dict:
    ops = Counter(n.op_type for n in model.graph.node)
    return {"bn": ops["BatchNormalization"], "conv": ops["Conv"], "nodes": sum(ops.values())}


def max_rel_error(reference: Path, candidate: Path, seed: int) -> float:
    import numpy as np

    from reparam.onnx.check import _session, random_inputs

    ref = _session(reference, "reference")
    cand = _session(candidate, "candidate")
    feeds = random_inputs(ref, {}, 1, seed)
    a = ref.run(None, feeds)
    b = cand.run([o.name for o in ref.get_outputs()], feeds)
    return max(C.max_rel(x, y) if np.asarray(x).size else 0.0 for x, y in zip(a, b))


def measure(src: Path, tmp: Path, args, label: str) -> dict:
    """All tools on one export: counts, exactness, tool time, paired latency ratios."""
    import onnx

    from reparam.measure import interleaved_times, ort_runner, ort_session, paired_ratio
    from reparam.onnx.check import _session, random_inputs

    row = {"export": counts(onnx.load(str(src))), "tools": {}}
    files = {}
    for tool in TOOLS:
        dst = tmp / f"{label}.{tool}.onnx"
        times, out, error = [], None, None
        for _ in range(args.tool_repeats):
            t0 = time.perf_counter()
            try:
                out = run_tool(tool, src, dst)
            except Exception as err:  # a peer failing is a result, not a crash
                error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
                break
            times.append(time.perf_counter() - t0)
            if times[-1] > 20:
                break  # slow tools are timed once
        entry = {"time_s": statistics.median(times) if times else None, "error": error}
        if out is not None and error is None:
            entry.update(counts(out))
            try:
                entry["max_rel"] = max_rel_error(src, dst, args.seed)
            except Exception as err:
                entry["max_rel"], entry["error"] = None, f"ORT: {' '.join(str(err).split())[:200]}"
            if entry["error"] is None:
                files[tool] = dst
        row["tools"][tool] = entry
        C.log(f"  {label} {tool}: {entry.get('bn')}/{entry.get('conv')}/{entry.get('nodes')} BN/Conv/nodes, "
              f"max rel {entry.get('max_rel')}, {entry['time_s'] and round(entry['time_s'], 2)} s"
              + (f" ERROR {error}" if error else ""))
    feeds = random_inputs(_session(src, "export"), {}, 1, args.seed)
    runners = {"export": ort_runner(ort_session(str(src), threads=1, optimize="all"), feeds)}
    for tool, path in files.items():
        runners[tool] = ort_runner(ort_session(str(path), threads=1, optimize="all"), feeds)
    lat = interleaved_times(runners, repeats=args.repeats, warmup=2)
    row["latency_s"] = {k: statistics.median(v) for k, v in lat.items()}
    for tool in files:
        row["tools"][tool]["latency_ratio"] = paired_ratio(lat, tool, "export")
    return row


# -- verdicts, tables, chart --------------------------------------------------------------------------------
def verdicts(rows: list[dict]) -> dict:
    """Targets of issue 11: exact everywhere; fewest BN and Conv on every model; with --simplify fewest nodes."""
    bad_exact, bad_bn_conv, bad_nodes = [], [], []
    for r in rows:
        t = {k: v for k, v in r["tools"].items() if v.get("error") is None}
        label = f"{r['model']} ({r['exporter']})"
        if any(v.get("max_rel") is None or v["max_rel"] > EXACT for k, v in t.items() if k.startswith("reparam")):
            bad_exact.append(label)
        peers = [v for k, v in t.items() if not k.startswith("reparam")]
        mine = t.get("reparam")
        if mine is None or any(p["bn"] < mine["bn"] or p["conv"] < mine["conv"] for p in peers):
            bad_bn_conv.append(label)
        slim = t.get("reparam+onnxslim")
        if slim is None or any(p["nodes"] < slim["nodes"] for p in peers + [mine] if p):
            bad_nodes.append(label)
    return {"exact": not bad_exact, "not_exact": bad_exact, "fewest_bn_conv": not bad_bn_conv,
            "not_fewest_bn_conv": bad_bn_conv, "fewest_nodes_with_simplify": not bad_nodes,
            "not_fewest_nodes_with_simplify": bad_nodes}


def render(d: dict) -> str:
    sys.path.insert(0, str(C.HERE))
    from summarize import provenance, t, table, x

    rows = d["rows"]
    names = {"reparam": "reparam", "reparam+onnxslim": "reparam --simplify", "onnxsim": "onnxsim",
             "onnxslim": "onnxslim", "onnxoptimizer": "onnxoptimizer", "ort_basic": "ORT basic"}

    def cell(v: dict, best: dict) -> str:
        if v.get("error"):
            return "fails"
        parts = [f"**{v[k]}**" if v[k] == best[k] else str(v[k]) for k in ("bn", "conv", "nodes")]
        return " / ".join(parts) + ("" if (v.get("max_rel") or 0) <= EXACT else " (not exact)")

    count_rows, lat_rows, time_rows, err_rows = [], [], [], []
    for r in rows:
        ok = [v for v in r["tools"].values() if not v.get("error")]
        best = {k: min(v[k] for v in ok) for k in ("bn", "conv", "nodes")} if ok else {}
        e = r["export"]
        head = [r["model"], r["exporter"]]
        count_rows.append(head + [f"{e['bn']} / {e['conv']} / {e['nodes']}"]
                          + [cell(r["tools"][k], best) for k in TOOLS])
        lat_rows.append(head + [t(r["latency_s"]["export"])]
                        + [x(r["tools"][k].get("latency_ratio"), 3) if not r["tools"][k].get("error") else "-"
                           for k in TOOLS])
        time_rows.append(head + [t(r["tools"][k].get("time_s")) for k in TOOLS])
        err_rows.append(head + [f"{r['tools'][k]['max_rel']:.1e}" if r["tools"][k].get("max_rel") is not None
                                else "-" for k in TOOLS])
    v = d["verdicts"]

    def verdict(flag: bool, misses: list[str]) -> str:
        return "**yes**" if flag else f"**no** ({', '.join(misses)})"

    s = d["settings"]
    return "\n\n".join([
        provenance(d),
        f"{len({r['model'] for r in rows})} architectures, {len(rows)} exports, input {s['size']}x{s['size']}, "
        f"batch 1. Cells: BatchNormalization / Conv / nodes after each tool (bold: the fewest of all tools on "
        "that export).",
        table(["model", "exporter", "export"] + [names[k] for k in TOOLS], count_rows),
        f"Exact (max |diff| / max |output| <= {EXACT:g} in ONNX Runtime, every reparam result): "
        f"{verdict(v['exact'], v['not_exact'])}. reparam has the fewest BN and Conv of all tools on every export: "
        f"{verdict(v['fewest_bn_conv'], v['not_fewest_bn_conv'])}. With `--simplify`, the fewest nodes too: "
        f"{verdict(v['fewest_nodes_with_simplify'], v['not_fewest_nodes_with_simplify'])}.",
        "Max relative error against the export (ONNX Runtime, no graph optimizations):",
        table(["model", "exporter"] + [names[k] for k in TOOLS], err_rows),
        f"One-thread ORT latency (`ORT_ENABLE_ALL`): the export's median, then each tool's result as the median "
        f"over {s['repeats']} interleaved rounds of its latency over the export's in the same round. The machine "
        "was shared while this ran: where a tool leaves the graph as it was (resnet18, mnasnet0_5), the ratios show "
        "the noise, up to about 0.2 either way on small models:",
        table(["model", "exporter", "export"] + [names[k] for k in TOOLS], lat_rows),
        f"Tool time (median of up to {s['tool_repeats']} runs; `reparam` includes loading and checking):",
        table(["model", "exporter"] + [names[k] for k in TOOLS], time_rows),
        "![reparam and its peers](../benchmarks/results/onnx_peers.png)",
    ])


def write_docs(d: dict, doc: Path = DOC) -> None:
    text = doc.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{render(d)}\n{END}{tail}")


def plot(d: dict, path: Path) -> None:
    plt = C.pyplot()
    rows = d["rows"]
    labels = [f"{r['model']} ({'ts' if r['exporter'] == 'torchscript' else r['exporter'][:3]})" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.32 * len(rows) + 2), sharey=True)
    colors = dict(zip(TOOLS, ("#c0504d", "#7f1d1d", "#2a7ab9", "#5fa35f", "#9a7ab9", "#9a9a9a")))
    ys = range(len(rows))
    for tool in TOOLS:
        for ax, key, den in ((axes[0], "conv", "conv"), (axes[1], "nodes", "nodes"),
                             (axes[2], "latency_ratio", None)):
            pts = [(r["tools"][tool][key] / (r["export"][den] or 1) if den else r["tools"][tool].get(key), y)
                   for r, y in zip(rows, ys) if not r["tools"][tool].get("error") and r["tools"][tool].get(key)
                   is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, color=colors[tool],
                       label=tool if ax is axes[0] else None, alpha=0.85)
    axes[0].set_xlabel("Conv after / Conv in the export")
    axes[1].set_xlabel("nodes after / nodes in the export")
    axes[2].set_xlabel("ORT latency / export (paired, 1 thread)")
    axes[0].set_yticks(list(ys), labels, fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.axvline(1.0, color="#444", lw=0.8)
    fig.suptitle(("[quick run] " if d.get("quick") else "") + "training-form exports through each tool", y=0.995)
    fig.legend(loc="upper center", ncol=len(TOOLS), fontsize=8, bbox_to_anchor=(0.5, 0.975))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated keys (default: all; --quick: two)")
    p.add_argument("--exporters", default=",".join(EXPORTERS), help="torchscript,dynamo")
    p.add_argument("--size", type=int, help="input size (default 224; --quick 96)")
    p.add_argument("--repeats", type=int, help="interleaved latency rounds (default 15; --quick 3)")
    p.add_argument("--tool-repeats", type=int, help="runs per tool for its time (default 3; --quick 1)")
    p.add_argument("--keras-python", default=sys.executable,
                   help="a Python with tensorflow and tf2onnx for the Keras net (default: this one; skipped if absent)")
    p.add_argument("--render-only", action="store_true", help="only redraw the chart / tables from the JSON")
    p.add_argument("--docs", action="store_true", help=f"write the tables into {DOC.relative_to(ROOT)}")
    args = p.parse_args(argv)
    out_json = args.out / "onnx_peers.json"
    if args.render_only:
        d = json.loads(out_json.read_text())
        plot(d, args.out / "onnx_peers.png")
        if args.docs:
            write_docs(d)
        print(render(d))
        return 0

    import torch

    from reparam.measure import environment

    torch.set_num_threads(1)
    args.size = args.size or (96 if args.quick else 224)
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.tool_repeats = args.tool_repeats or (1 if args.quick else 3)
    keys = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else [m[0] for m in MODELS])
    known = {m[0]: m for m in MODELS}
    rows = []
    with tempfile.TemporaryDirectory(prefix="reparam-peers-") as tmpdir:
        tmp = Path(tmpdir)
        for key in keys:
            if key == "keras_repvgg":
                continue
            _, library, name = known[key]
            model = build(library, name, args.seed)
            params = sum(int(v.numel()) for v in model.parameters())
            for exporter in args.exporters.split(","):
                label = f"{key}.{exporter}"
                src = tmp / f"{label}.onnx"
                C.log(f"{label}: exporting ({params / 1e6:.1f}M params)")
                try:
                    export_torch(model, args.size, src, exporter)
                except Exception as err:
                    C.log(f"{label}: export failed: {err}")
                    rows.append({"model": key, "library": library, "exporter": exporter, "params": params,
                                 "export_error": str(err)[:300]})
                    continue
                rows.append({"model": key, "library": library, "exporter": exporter, "params": params,
                             **measure(src, tmp, args, label)})
                src.unlink()
        if args.keras_python and (not args.models or "keras_repvgg" in keys):
            src = tmp / "keras_repvgg.tf2onnx.onnx"
            C.log("keras_repvgg: exporting with tf2onnx")
            try:
                export_keras(src, args.size, args.seed, args.keras_python)
                rows.append({"model": "keras_repvgg", "library": "keras", "exporter": "tf2onnx", "params": None,
                             **measure(src, tmp, args, "keras_repvgg.tf2onnx")})
            except Exception as err:
                C.log(f"keras_repvgg: skipped ({err})")
    good = [r for r in rows if "tools" in r]
    d = {"benchmark": "onnx_peers", "quick": args.quick, "environment": environment(threads=1),
         "settings": {"size": args.size, "repeats": args.repeats, "tool_repeats": args.tool_repeats,
                      "exporters": args.exporters, "exact": EXACT, "seed": args.seed,
                      "versions": _versions()},
         "rows": good, "failed_exports": [r for r in rows if "tools" not in r], "verdicts": verdicts(good)}
    path = C.write_json(args.out, "onnx_peers", d)
    plot(d, args.out / "onnx_peers.png")
    if args.docs:
        write_docs(d)
    print(render(d))
    print(f"\nwrote {path}")
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("onnxsim", "onnxslim", "onnxoptimizer", "onnxruntime", "timm", "torchvision", "tensorflow-cpu",
                 "tf2onnx"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
