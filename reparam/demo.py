"""``reparam demo``: fuse a zoo model (default RepGhostNet 1.0x) with both frontends and show what changed.

With no arguments and no network it: builds the training-form model, gives its BN layers non-trivial
statistics with a few SGD steps on random data, fuses it with ``reparam.fuse``, exports the training form
to ONNX and fuses that with the ONNX pass, verifies both against the original in torch and ONNX Runtime,
measures one-thread latency before and after, prints a table and writes ``demo.json`` and ``demo.png``.
``--onnx FILE`` runs the ONNX half on a user's own model instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .core.errors import ReparamError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fuse a zoo model with both frontends, verify, time, chart",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", default="repghostnet_1_0x", help="zoo model name (see `reparam profile --list`)")
    p.add_argument("--onnx", metavar="FILE", help="run the ONNX half on this model instead of a zoo model")
    p.add_argument("--out", default="reparam-demo", help="output directory for demo.json and demo.png")
    p.add_argument("--image-size", type=int, default=224, help="input resolution (default 224)")
    p.add_argument("--train-steps", type=int, default=3, help="SGD steps that make the BN statistics non-trivial")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per variant (medians are reported)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


class _Progress:
    """One line per step, with its duration, so a user sees where the time goes."""

    def __init__(self, total: int) -> None:
        self.total, self.k, self.t0 = total, 0, time.perf_counter()

    def step(self, text: str):
        self.k += 1
        print(f"[{self.k}/{self.total}] {text} ...", end="", flush=True)
        start = time.perf_counter()
        return _Done(start)


class _Done:
    def __init__(self, start: float) -> None:
        self.start = start

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            print(f" done ({time.perf_counter() - self.start:.1f} s)", flush=True)
        else:
            print(" failed", flush=True)
        return False


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    result = _run_onnx_file(args) if args.onnx else _run_zoo(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2))
    _chart(result, out_dir / "demo.png")
    print(_table(result))
    print(f"\nwrote {out_dir / 'demo.json'} and {out_dir / 'demo.png'}")
    return 0 if result["ok"] else 1


# -- the zoo model, both frontends -------------------------------------------------------------------------
def _run_zoo(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import onnx
    import torch

    import reparam
    import reparam.onnx as ronnx
    import reparam_zoo
    from reparam.measure import environment, interleaved_medians, ort_runner, ort_session, torch_runner
    from reparam.testing.torch_checks import count_executed_ops

    if args.model not in reparam_zoo.list_models():
        raise ReparamError(f"unknown model {args.model!r}; choose one of {', '.join(reparam_zoo.list_models())}")
    torch.manual_seed(args.seed)
    prog = _Progress(7)
    size = args.image_size
    with prog.step(f"building {args.model} (training form) and training {args.train_steps} SGD steps"):
        model = reparam_zoo.create_model(args.model)
        _train_steps(model, args.train_steps, size=min(size, 96))
        model.eval()
        x = torch.randn(1, 3, size, size)
        macs, params = reparam_zoo.profile(model, (1, 3, size, size))
    with prog.step("reparam.fuse (torch.fx)"):
        t0 = time.perf_counter()
        fused = reparam.fuse(model)
        fuse_s = time.perf_counter() - t0
        f_macs, f_params = reparam_zoo.profile(fused, (1, 3, size, size))
        torch_err = reparam.verify(model, fused, x)
        counts_before, counts_after = count_executed_ops(model, x), count_executed_ops(fused, x)
    tmp = Path(tempfile.mkdtemp(prefix="reparam-demo-"))
    train_path, fused_path = tmp / "train.onnx", tmp / "fused.onnx"
    with prog.step("exporting the training form to ONNX"):
        torch.onnx.export(model, (x,), str(train_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    with prog.step("reparam.onnx.fuse (graph pass)"):
        t0 = time.perf_counter()
        fused_onnx, onnx_report = ronnx.fuse(str(train_path), return_report=True)
        onnx_fuse_s = time.perf_counter() - t0
        onnx.save(fused_onnx, str(fused_path))
    with prog.step("verifying in ONNX Runtime"):
        feeds = {"input": x.numpy()}
        s_train, s_fused = ort_session(str(train_path)), ort_session(str(fused_path))
        ref = model(x).detach().numpy()
        o_train, o_fused = s_train.run(None, feeds)[0], s_fused.run(None, feeds)[0]
        scale = float(np.abs(ref).max())
        ort_err = {"max_abs": float(np.abs(o_fused - o_train).max()),
                   "max_rel": float(np.abs(o_fused - o_train).max() / scale),
                   "max_abs_vs_torch": float(np.abs(o_fused - ref).max())}
        onnx_counts = (_onnx_counts(onnx.load(str(train_path))), _onnx_counts(fused_onnx))
    with prog.step(f"timing torch, one thread ({args.repeats} interleaved runs each)"):
        torch_lat = interleaved_medians({"before": torch_runner(model, (x,)), "after": torch_runner(fused, (x,))},
                                        repeats=args.repeats)
    with prog.step(f"timing ONNX Runtime, one thread ({args.repeats} interleaved runs each)"):
        ort_lat = interleaved_medians({"before": ort_runner(s_train, feeds), "after": ort_runner(s_fused, feeds)},
                                      repeats=args.repeats)
    ok = torch_err["max_rel"] < 1e-4 and ort_err["max_rel"] < 1e-4
    return {
        "model": args.model, "input": [1, 3, size, size], "ok": ok,
        "environment": environment(threads=1),
        "params": {"before": params, "after": f_params},
        "macs": {"before": macs, "after": f_macs},
        "torch": {
            "executed": {"before": _pick(counts_before), "after": _pick(counts_after)},
            "latency_ms": {k: v * 1e3 for k, v in torch_lat.items()},
            "error": torch_err, "fuse_seconds": fuse_s,
            "regions": len(fused.reparam_report.regions), "refused": len(fused.reparam_report.refused),
        },
        "onnx": {
            "nodes": {"before": onnx_counts[0], "after": onnx_counts[1]},
            "latency_ms": {k: v * 1e3 for k, v in ort_lat.items()},
            "error": ort_err, "fuse_seconds": onnx_fuse_s,
            "regions": len(onnx_report.regions), "refused": len(onnx_report.refusals),
        },
    }


def _train_steps(model, steps: int, size: int) -> None:
    import torch

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(8, 3, size, size) * 2 + 0.5
        target = torch.randint(0, 1000, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _pick(c: Counter) -> dict[str, int]:
    return {k: int(c.get(k, 0)) for k in ("conv", "batch_norm", "add")}


def _onnx_counts(model) -> dict[str, int]:
    c = Counter(n.op_type for n in model.graph.node)
    return {"conv": c["Conv"], "batch_norm": c["BatchNormalization"], "add": c["Add"] + c["Sum"],
            "total": sum(c.values())}


# -- a user's ONNX file --------------------------------------------------------------------------------------
def _run_onnx_file(args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    import reparam.onnx as ronnx
    from reparam.measure import environment, interleaved_medians, ort_runner, ort_session
    from reparam.onnx.check import compare, random_inputs

    prog = _Progress(3)
    with prog.step(f"reparam.onnx.fuse {args.onnx}"):
        t0 = time.perf_counter()
        fused, report = ronnx.fuse(args.onnx, return_report=True)
        fuse_s = time.perf_counter() - t0
        src = onnx.load(args.onnx)
    tmp = Path(tempfile.mkdtemp(prefix="reparam-demo-"))
    fused_path = tmp / "fused.onnx"
    onnx.save(fused, str(fused_path))
    with prog.step("verifying in ONNX Runtime"):
        s_before, s_after = ort_session(args.onnx), ort_session(str(fused_path))
        feeds = random_inputs(s_before, seed=args.seed)
        check = compare(args.onnx, str(fused_path), feeds=feeds)
        err = {"max_abs": check.max_abs, "max_rel": check.max_rel}
    with prog.step(f"timing ONNX Runtime, one thread ({args.repeats} interleaved runs each)"):
        lat = interleaved_medians({"before": ort_runner(s_before, feeds), "after": ort_runner(s_after, feeds)},
                                  repeats=args.repeats)
    return {
        "model": str(args.onnx), "ok": check.ok, "environment": environment(threads=1),
        "onnx": {"nodes": {"before": _onnx_counts(src), "after": _onnx_counts(fused)},
                 "latency_ms": {k: v * 1e3 for k, v in lat.items()}, "error": err, "fuse_seconds": fuse_s,
                 "regions": len(report.regions), "refused": len(report.refusals)},
    }


# -- output ----------------------------------------------------------------------------------------------------
def _table(r: dict[str, Any]) -> str:
    rows = [("", "before", "after")]
    if "params" in r:
        rows += [("params", f"{r['params']['before']:,}", f"{r['params']['after']:,}"),
                 ("MACs", f"{r['macs']['before'] / 1e6:.2f}M", f"{r['macs']['after'] / 1e6:.2f}M")]
    if "torch" in r:
        t = r["torch"]
        for k in ("conv", "batch_norm", "add"):
            rows.append((f"torch executed {k}", str(t["executed"]["before"][k]), str(t["executed"]["after"][k])))
        lat = t["latency_ms"]
        rows.append(("torch latency, 1 thread", f"{lat['before']:.2f} ms", f"{lat['after']:.2f} ms"))
    o = r["onnx"]
    for k in ("conv", "batch_norm", "add", "total"):
        rows.append((f"ONNX {k} nodes", str(o["nodes"]["before"][k]), str(o["nodes"]["after"][k])))
    lat = o["latency_ms"]
    rows.append(("ORT latency, 1 thread", f"{lat['before']:.2f} ms", f"{lat['after']:.2f} ms"))
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    lines = [f"\n{r['model']}: fused {'OK' if r['ok'] else 'MISMATCH'}"]
    lines += [f"  {a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    if "torch" in r:
        lines.append(f"  torch:  max abs error {r['torch']['error']['max_abs']:.2e}, "
                     f"max rel {r['torch']['error']['max_rel']:.2e}; fuse took {r['torch']['fuse_seconds']:.2f} s, "
                     f"{r['torch']['regions']} regions, {r['torch']['refused']} refused")
    lines.append(f"  ONNX:   max abs error {o['error']['max_abs']:.2e}, max rel {o['error']['max_rel']:.2e}; "
                 f"pass took {o['fuse_seconds']:.2f} s, {o['regions']} regions, {o['refused']} refused")
    return "\n".join(lines)


def _chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("latency, 1 thread (ms)", {})]
    if "torch" in r:
        panels[0][1]["torch"] = r["torch"]["latency_ms"]
    panels[0][1]["ONNX Runtime"] = r["onnx"]["latency_ms"]
    counts = r["torch"]["executed"] if "torch" in r else r["onnx"]["nodes"]
    panels.append(("executed ops" if "torch" in r else "ONNX nodes",
                   {k: {"before": counts["before"][k], "after": counts["after"][k]}
                    for k in ("conv", "batch_norm", "add")}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, data) in zip(axes, panels):
        names = list(data)
        xs = range(len(names))
        before = [data[n]["before"] for n in names]
        after = [data[n]["after"] for n in names]
        ax.bar([i - 0.2 for i in xs], before, 0.4, label="training form", color="#b0b0b0")
        ax.bar([i + 0.2 for i in xs], after, 0.4, label="fused", color="#2a7ab9")
        ax.set_xticks(list(xs), names)
        ax.set_title(title)
        for i, (b, a) in enumerate(zip(before, after)):
            for value, dx in ((b, -0.2), (a, 0.2)):
                label = f"{value:.3g}" if isinstance(value, float) else str(value)
                ax.annotate(label, (i + dx, value), ha="center", va="bottom", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"reparam demo: {Path(str(r['model'])).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
