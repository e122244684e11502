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
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from ._extras import install_line, missing_extras, require
from .cli import UsageError, non_negative_int, positive_int

#: relative error above which a fused model counts as different (the exit status is then 1)
TOLERANCE = 1e-4
REPORT_HINT = "(--report lists every region collapsed and every refusal with its reason)"

DESCRIPTION = """\
Fuse a zoo model (default: RepGhostNet 1.0x, training form) with both frontends and show what changed.
It trains a few SGD steps so the BatchNorm statistics are non-trivial, fuses the model with reparam.fuse,
exports it to ONNX and fuses that with reparam.onnx, checks both against the original (torch and ONNX
Runtime), times them (torch runs on one thread throughout), prints a table and writes demo.json and
demo.png.  Needs the torch and onnx extras; the chart also needs matplotlib (the bench extra) and is
skipped without it."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``reparam demo`` to the ``reparam`` command."""
    p = sub.add_parser("demo", help="fuse a zoo model with both frontends, verify, time and chart it",
                       description=DESCRIPTION)
    p.add_argument("--model", default="repghostnet_1_0x", metavar="NAME",
                   help="zoo model to fuse (default repghostnet_1_0x; `reparam profile --list` lists them)")
    p.add_argument("--onnx", metavar="FILE",
                   help="run the ONNX half (fuse, check in ONNX Runtime, time) on this model instead")
    p.add_argument("--out", default="reparam-demo", metavar="DIR",
                   help="output directory for demo.json and demo.png (default reparam-demo)")
    p.add_argument("--image-size", type=positive_int, default=224, metavar="N",
                   help="input resolution (default 224)")
    p.add_argument("--train-steps", type=non_negative_int, default=3, metavar="N",
                   help="SGD steps on random data that make the BN statistics non-trivial (default 3)")
    p.add_argument("--repeats", type=positive_int, default=15, metavar="N",
                   help="timed runs per model; medians are reported (default 15)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the weights, the training data and the inputs (default 0)")
    p.add_argument("--report", action="store_true",
                   help="also print both fuse reports: every region collapsed and every refusal with its reason")
    p.set_defaults(func=run)


class _Progress:
    """One line per step with its duration; ``step.seconds`` is the figure the summary quotes."""

    def __init__(self, total: int) -> None:
        self.total, self.k = total, 0
        self.steps: list[dict[str, Any]] = []

    def step(self, text: str) -> _Step:
        self.k += 1
        print(f"[{self.k}/{self.total}] {text} ...", end="", flush=True)
        step = _Step(text)
        self.steps.append(step.record)
        return step


class _Step:
    def __init__(self, text: str) -> None:
        self.record: dict[str, Any] = {"step": text, "seconds": None}
        self.seconds = 0.0

    def __enter__(self) -> _Step:
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_) -> bool:
        self.seconds = time.perf_counter() - self.start
        self.record["seconds"] = self.seconds
        print(f" done ({self.seconds:.2f} s)" if exc_type is None else " failed", flush=True)
        return False


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit status 0 if both fused models match the original within :data:`TOLERANCE`."""
    if args.onnx:
        require("onnx", feature="reparam demo --onnx")
    else:
        require("torch", "onnx", feature="reparam demo")
        import reparam_zoo

        if args.model not in reparam_zoo.list_models():
            raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(reparam_zoo.list_models())}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {str(out_dir)!r} exists and is not a directory")
    if args.onnx:
        result, reports = _run_onnx_file(args)
    else:
        from .measure import torch_threads

        with torch_threads(1):  # small convs on a busy machine: extra threads only wait for each other
            result, reports = _run_zoo(args)
    print(_table(result))
    if "mac_split" in result:
        print("\n".join(_mac_explanation(result)))
    if not args.report:
        print(f"\n{REPORT_HINT}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2))
    written = [out_dir / "demo.json"]
    if missing_extras(["bench"]):
        print(f"\nchart skipped: matplotlib is not installed ({install_line(['bench'])} adds it)")
    else:
        _chart(result, out_dir / "demo.png")
        written.append(out_dir / "demo.png")
    print(f"\nwrote {' and '.join(map(str, written))}")
    if args.report:  # last, so the long listing does not split the table from its explanation
        for title, text in reports:
            print(f"\n{title}\n{text}")
    return 0 if result["ok"] else 1


# -- the zoo model, both frontends -------------------------------------------------------------------------
def _run_zoo(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    import numpy as np
    import onnx
    import torch

    import reparam
    import reparam.onnx as ronnx
    import reparam_zoo
    from reparam.measure import environment, interleaved_medians, ort_runner, ort_session, torch_runner
    from reparam.testing.torch_checks import count_executed_ops

    torch.manual_seed(args.seed)
    prog = _Progress(8)
    size = args.image_size
    shape = (1, 3, size, size)
    with prog.step(f"building {args.model} (training form) and training {args.train_steps} SGD steps"):
        model = reparam_zoo.create_model(args.model)
        _train_steps(model, args.train_steps, size=min(size, 96))
        model.eval()
        x = torch.randn(*shape)
    with prog.step("reparam.fuse (torch.fx)") as fuse_step:
        fused = reparam.fuse(model)
    with prog.step("checking the fused model in torch: outputs, executed ops, MACs"):
        torch_err = reparam.verify(model, fused, x)
        counts_before, counts_after = count_executed_ops(model, x), count_executed_ops(fused, x)
        deploy = _deploy_form(reparam_zoo, args.model)
        sizes = {"before": model, "after": fused, **({"deploy": deploy} if deploy is not None else {})}
        split = {k: reparam_zoo.count_macs(m, shape)._asdict() for k, m in sizes.items()}
        params = {k: reparam_zoo.count_params(m) for k, m in sizes.items()}
        biases = {k: _bias_values(m) for k, m in sizes.items()}
    tmp = Path(tempfile.mkdtemp(prefix="reparam-demo-"))
    train_path, fused_path = tmp / "train.onnx", tmp / "fused.onnx"
    with prog.step("exporting the training form to ONNX"):
        with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (x,), str(train_path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    with prog.step("reparam.onnx.fuse (graph pass)") as onnx_step:
        fused_onnx, onnx_report = ronnx.fuse(str(train_path), report=True)
    with prog.step("verifying in ONNX Runtime"):
        onnx.save(fused_onnx, str(fused_path))
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
    ok = torch_err["max_rel"] < TOLERANCE and ort_err["max_rel"] < TOLERANCE
    result = {
        "model": args.model, "input": list(shape), "ok": ok,
        "environment": environment(threads=1), "steps": prog.steps,
        "params": params,
        "macs": {k: v["weights"] + v["biases"] for k, v in split.items()},
        "mac_split": split, "bias_values": biases,
        "torch": {
            "executed": {"before": _pick(counts_before), "after": _pick(counts_after)},
            "latency_ms": {k: v * 1e3 for k, v in torch_lat.items()},
            "error": torch_err, "fuse_seconds": fuse_step.seconds,
            "regions": len(fused.reparam_report.regions), "refused": len(fused.reparam_report.leftovers),
        },
        "onnx": {
            "nodes": {"before": onnx_counts[0], "after": onnx_counts[1]},
            "latency_ms": {k: v * 1e3 for k, v in ort_lat.items()},
            "error": ort_err, "fuse_seconds": onnx_step.seconds,
            "regions": len(onnx_report.regions), "refused": len(onnx_report.refusals),
        },
    }
    reports = [("reparam.fuse report (torch.fx):", fused.reparam_report.describe(examples=0, regions=True)),
               ("reparam.onnx.fuse report (ONNX graph):", onnx_report.format())]
    return result, reports


def _deploy_form(zoo, name: str):
    """The zoo's hand-written deploy form of ``name`` (``deploy=True``), or None if it has none."""
    try:
        return zoo.create_model(name, deploy=True).eval()
    except TypeError:
        return None


def _bias_values(model) -> int:
    import torch

    return sum(m.bias.numel() for m in model.modules()
               if isinstance(m, torch.nn.modules.conv._ConvNd) and m.bias is not None)


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
def _run_onnx_file(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    import onnx

    import reparam.onnx as ronnx
    from reparam.measure import environment, interleaved_medians, ort_runner, ort_session
    from reparam.onnx.check import compare, random_inputs

    prog = _Progress(3)
    with prog.step(f"reparam.onnx.fuse {args.onnx}") as fuse_step:
        fused, report = ronnx.fuse(args.onnx, report=True)
    src = onnx.load(args.onnx)
    tmp = Path(tempfile.mkdtemp(prefix="reparam-demo-"))
    fused_path = tmp / "fused.onnx"
    with prog.step("verifying in ONNX Runtime"):
        onnx.save(fused, str(fused_path))
        s_before, s_after = ort_session(args.onnx), ort_session(str(fused_path))
        feeds = random_inputs(s_before, seed=args.seed)
        check = compare(args.onnx, str(fused_path), feeds=feeds)
        err = {"max_abs": check.max_abs, "max_rel": check.max_rel}
    with prog.step(f"timing ONNX Runtime, one thread ({args.repeats} interleaved runs each)"):
        lat = interleaved_medians({"before": ort_runner(s_before, feeds), "after": ort_runner(s_after, feeds)},
                                  repeats=args.repeats)
    result = {
        "model": str(args.onnx), "ok": check.ok, "environment": environment(threads=1), "steps": prog.steps,
        "onnx": {"nodes": {"before": _onnx_counts(src), "after": _onnx_counts(fused)},
                 "latency_ms": {k: v * 1e3 for k, v in lat.items()}, "error": err,
                 "fuse_seconds": fuse_step.seconds, "regions": len(report.regions), "refused": len(report.refusals)},
    }
    return result, [("reparam.onnx.fuse report:", report.format())]


# -- output ----------------------------------------------------------------------------------------------------
def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _table(r: dict[str, Any]) -> str:
    rows = [("", "before", "after")]
    if "params" in r:
        rows += [("params", f"{r['params']['before']:,}", f"{r['params']['after']:,}"),
                 ("MACs", _millions(r["macs"]["before"]), _millions(r["macs"]["after"]))]
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
                     f"max rel {r['torch']['error']['max_rel']:.2e}; reparam.fuse took "
                     f"{r['torch']['fuse_seconds']:.2f} s, {r['torch']['regions']} regions, "
                     f"{r['torch']['refused']} refused")
    lines.append(f"  ONNX:   max abs error {o['error']['max_abs']:.2e}, max rel {o['error']['max_rel']:.2e}; "
                 f"reparam.onnx.fuse took {o['fuse_seconds']:.2f} s, {o['regions']} regions, "
                 f"{o['refused']} refused")
    return "\n".join(lines)


def _mac_explanation(r: dict[str, Any]) -> list[str]:
    """Why the MAC count moves, from the measured split into weights and conv biases."""
    s, bias, params = r["mac_split"], r["bias_values"], r["params"]
    names = {"before": "training form", "after": "reparam.fuse", "deploy": "deploy=True"}
    lines = ["\nWhy the MACs change: the counting rule charges conv and Linear weights, plus one MAC per output",
             "element of every conv bias, and nothing for a BatchNorm. Folding a BatchNorm gives its conv a bias:"]
    for key, label in names.items():
        if key in s:
            lines.append(f"  {label:<14} {_millions(r['macs'][key]):>8} = weights {_millions(s[key]['weights'])}"
                         f" + biases {_millions(s[key]['biases'])}  ({params[key]:,} params)")
    before, after = s["before"]["weights"], s["after"]["weights"]
    if after == before:
        lines.append("The fused kernels cost the same as the training form's; the whole difference is biases.")
    else:
        lines.append(f"Composing kernels changed the weight MACs by {_millions(after - before)}.")
    if "deploy" in s:
        extra = bias["deploy"] - bias["after"]
        if extra > 0:
            lines.append(f"The hand-written deploy form ({r['model']}(deploy=True)) keeps {extra:,} more bias values: "
                         "where it is exact,")
            lines.append("reparam.fuse moves a bias across an add (two summed branches need one bias) or into the "
                         "next unpadded conv.")
        elif extra < 0:
            lines.append(f"reparam.fuse keeps {-extra:,} more bias values than the hand-written deploy form.")
    return lines


def _panels(r: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, float]], str]]:
    """Chart panels: (title, {group: {series: value}}, value format).  Series: before / after / deploy."""
    panels = []
    lat = {"torch": r["torch"]["latency_ms"]} if "torch" in r else {}
    lat["ONNX Runtime"] = r["onnx"]["latency_ms"]
    panels.append(("latency, 1 thread (ms)", lat, ".3g"))
    counts = r["torch"]["executed"] if "torch" in r else r["onnx"]["nodes"]
    panels.append(("executed ops (torch)" if "torch" in r else "ONNX nodes",
                   {k: {"before": counts["before"][k], "after": counts["after"][k]}
                    for k in ("conv", "batch_norm", "add")}, "d"))
    if "params" in r:
        panels.append(("params", {"params": dict(r["params"])}, ","))
        panels.append(("MACs (weights + one per conv bias output)",
                       {"MACs": {k: v / 1e6 for k, v in r["macs"].items()}}, ".2f"))
    errors = {"torch": r["torch"]["error"]["max_rel"]} if "torch" in r else {}
    errors["ONNX Runtime"] = r["onnx"]["error"]["max_rel"]
    panels.append((f"max relative error vs the training form (tolerance {TOLERANCE:g})",
                   {k: {"after": v} for k, v in errors.items()}, ".1e"))
    return panels


def _facts(r: dict[str, Any]) -> list[str]:
    """The text panel of the chart: what each frontend collapsed and refused, and the MAC split."""
    lines = [f"{r['model']}" + (f", input {'x'.join(map(str, r['input'][1:]))}" if "input" in r else "")]
    if "torch" in r:
        t = r["torch"]
        lines.append(f"reparam.fuse: {t['regions']} regions, {t['refused']} refused, {t['fuse_seconds']:.2f} s")
    o = r["onnx"]
    lines.append(f"reparam.onnx.fuse: {o['regions']} regions, {o['refused']} refused, {o['fuse_seconds']:.2f} s")
    for key, label in (("before", "training form"), ("after", "fused"), ("deploy", "deploy=True")):
        if key in r.get("mac_split", {}):
            m = r["mac_split"][key]
            lines.append(f"MACs {label}: {_millions(m['weights'])} weights + {_millions(m['biases'])} biases")
    return lines


_SERIES = {"before": ("training form", "#b0b0b0"), "after": ("fused", "#2a7ab9"),
           "deploy": ("hand-written deploy form", "#e08a2c")}
_LOG_FLOOR = 1e-12  # an exact zero error still gets a visible bar on the log axis


def _figure(r: dict[str, Any]):
    """The demo chart as a matplotlib Figure (Agg): latency, executed ops, params, MACs, error and a summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(r)
    cols = 3
    rows = -(-(len(panels) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    handles = {}
    for ax, (title, data, fmt) in zip(flat, panels):
        groups = list(data)
        series = [s for s in _SERIES if any(s in data[g] for g in groups)]
        width = 0.8 / len(series)
        log = title.startswith("max relative error")
        for j, name in enumerate(series):
            label, color = _SERIES[name]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
            values = [data[g].get(name, 0) for g in groups]
            shown = [max(v, _LOG_FLOOR) for v in values] if log else values
            handles[label] = ax.bar(xs, shown, width, label=label, color=color)
            for xv, v, h in zip(xs, values, shown):
                ax.annotate(format(v, fmt), (xv, h), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
            ax.axhline(TOLERANCE, color="#c03030", linestyle="--", linewidth=1)
        else:
            ax.margins(y=0.15)
    text_ax = flat[len(panels)]
    text_ax.axis("off")
    text_ax.legend(list(handles.values()), list(handles), loc="upper left", fontsize=8, frameon=False)
    text_ax.text(0.0, 0.55, "\n".join(_facts(r)), va="top", fontsize=8, family="monospace",
                 transform=text_ax.transAxes)
    for ax in flat[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle(f"reparam demo: {Path(str(r['model'])).name}, fused {'OK' if r['ok'] else 'MISMATCH'}")
    fig.tight_layout()
    return fig


def _chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = _figure(r)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
