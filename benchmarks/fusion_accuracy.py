"""How exact is the fusion?  reparam's float64 algebra against a naive float32 fold, over the zoo.

For every RepGhostNet width and GhostNet 0.5x/1.0x/1.3x, with non-trivial BN statistics (two settings:
``randomize_bn_``, and a few SGD steps on random data as after real training), on the same random batch:

* ground truth: the unfused training-form model run in float64;
* ``unfused_float32``: the same model in float32 (the floor any float32 deploy model sits on);
* ``reparam_fuse_float32``: ``reparam.fuse`` (weights folded in float64, cast once to float32), run in float32;
* ``reparam_convert_float32``: ``reparam_zoo.convert`` (the same core algebra, the zoo's deploy layout);
* ``naive_fold_float32``: the textbook fold done in float32 (``w * gamma / sqrt(var + eps)`` per branch, branches
  summed in float32, as reference implementations do), written out in this file, run in float32;
* ``reparam_fuse_float64``: ``reparam.fuse`` of the float64 model, run in float64 (shows the algebra is exact).

Errors are ``max|y - y_ref| / max|y_ref|`` over the logits (and an RMS version).  The folded weights are also
compared directly with the exact fold (the same naive fold done in float64), tensor by tensor.
Writes ``fusion_accuracy.json`` and ``fusion_accuracy.png``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import _common as C

FULL_MODELS = [*(f"repghostnet_{w}" for w in C.REPGHOST_WIDTHS), *(f"ghostnet_{w}" for w in C.GHOST_WIDTHS)]
QUICK_MODELS = ["repghostnet_0_5x", "ghostnet_0_5x"]
OUTPUT_VARIANTS = ("unfused_float32", "reparam_fuse_float32", "reparam_convert_float32", "naive_fold_float32",
                   "reparam_fuse_float64")


# -- the naive fold, in the model's own dtype ------------------------------------------------------------------
def _fold_bn(weight, bias, bn):
    """Fold an inference-mode BN into a conv's (weight, bias), in the tensors' dtype."""
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    w = weight * t.reshape(-1, *([1] * (weight.dim() - 1)))
    b = bn.bias - bn.running_mean * t
    if bias is not None:
        b = b + bias * t
    return w, b


def _conv_like(conv, weight, bias):
    from torch import nn

    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    out = out.to(dtype=weight.dtype)
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


def naive_fold(model):
    """A deploy copy of a zoo model folded with plain torch arithmetic in the model's dtype.

    Same structure as ``reparam_zoo.convert`` (BN slots become ``nn.Identity``, each RepGhost module's cheap
    depthwise conv absorbs its re-parameterization branches).
    """
    import torch
    from torch import nn

    import reparam_zoo
    from reparam_zoo.layers import ConvBnAct

    model = copy.deepcopy(model).eval()
    edits = []

    def pair(parent, conv_attr, bn_attr):
        conv, bn = getattr(parent, conv_attr), getattr(parent, bn_attr)
        if isinstance(bn, nn.BatchNorm2d):
            edits.append((parent, conv_attr, _conv_like(conv, *_fold_bn(conv.weight, conv.bias, bn))))
            edits.append((parent, bn_attr, nn.Identity()))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, reparam_zoo.RepGhostModule):
                pair(m.primary_conv, "0", "1")
                dw, dw_bn = m.cheap_operation[0], m.cheap_operation[1]
                w, b = _fold_bn(dw.weight, None, dw_bn)
                k = dw.kernel_size[0]
                for conv, bn in zip(m.fusion_conv, m.fusion_bn):
                    kernel = torch.zeros_like(w)
                    if isinstance(conv, nn.Conv2d):  # 1x1 depthwise conv, centred in the kxk kernel
                        kernel[:, :, k // 2, k // 2] = conv.weight[:, :, 0, 0]
                    else:  # identity
                        kernel[:, :, k // 2, k // 2] = 1
                    if isinstance(bn, nn.BatchNorm2d):
                        kernel, extra = _fold_bn(kernel, None, bn)
                    else:
                        extra = torch.zeros_like(b)
                    w, b = w + kernel, b + extra
                edits += [(m, "cheap_operation", _conv_like(dw, w, b)), (m, "fusion_conv", nn.Sequential()),
                          (m, "fusion_bn", nn.Sequential())]
            elif isinstance(m, reparam_zoo.GhostModule):
                pair(m.primary_conv, "0", "1")
                pair(m.cheap_operation, "0", "1")
            elif isinstance(m, (reparam_zoo.RepGhostBottleneck, reparam_zoo.GhostBottleneck)):
                if m.stride > 1:
                    pair(m, "conv_dw", "bn_dw")
                if len(m.shortcut):
                    pair(m.shortcut, "0", "1")
                    pair(m.shortcut, "2", "3")
            elif isinstance(m, ConvBnAct):
                pair(m, "conv", "bn1")
        pair(model, "conv_stem", "bn1")
    for parent, attr, new in edits:
        setattr(parent, attr, new)
    return model


# -- measurement -----------------------------------------------------------------------------------------------
def _errors(ref, out) -> dict[str, float]:
    import numpy as np

    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(out, dtype=np.float64)
    rms = float(np.sqrt(np.mean(r**2)))
    return {"max_rel": C.max_rel(r, o), "rms_rel": float(np.sqrt(np.mean((o - r) ** 2))) / rms if rms else 0.0}


def _weight_errors(exact: dict, approx: dict) -> dict[str, float]:
    """Per folded tensor ``max|w - w_exact| / max|w_exact|``: the worst and the median over tensors."""
    import statistics

    if set(exact) != set(approx):
        raise RuntimeError(f"state dicts differ: {sorted(set(exact) ^ set(approx))[:4]}")
    rel = []
    for k, e in exact.items():
        if not e.is_floating_point() or e.numel() == 0:
            continue
        scale = float(e.abs().max())
        rel.append(float((approx[k].double() - e).abs().max()) / scale if scale else 0.0)
    return {"max_rel": max(rel), "median_rel": statistics.median(rel), "tensors": len(rel)}


def _sgd_steps(model, steps: int, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(8, 3, 96, 96, generator=gen) * 2 + 0.5
        target = torch.randint(0, 1000, (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def measure(key: str, setting: str, x, seed: int) -> dict:
    import torch

    import reparam
    import reparam_zoo

    if setting == "randomize_bn":
        model = C.trained_like(key, seed)
    else:
        torch.manual_seed(seed)
        model = C.build_model(key)
        _sgd_steps(model, 3, seed)
    model64 = copy.deepcopy(model).double().eval()
    x64 = x.double()
    with torch.no_grad():
        ref = model64(x64)
        fused = reparam.fuse(model)
        converted = reparam_zoo.convert(model)
        naive = naive_fold(model)
        fused64 = reparam.fuse(model64)
        outs = {"unfused_float32": model(x), "reparam_fuse_float32": fused(x),
                "reparam_convert_float32": converted(x), "naive_fold_float32": naive(x),
                "reparam_fuse_float64": fused64(x64)}
        if outs["reparam_fuse_float64"].dtype != torch.float64:
            raise RuntimeError("reparam.fuse of a float64 model did not stay float64")
        exact = naive_fold(model64).state_dict()
        weights = {"reparam_convert_float32": _weight_errors(exact, converted.state_dict()),
                   "naive_fold_float32": _weight_errors(exact, naive.state_dict())}
    return {"output": {k: _errors(ref.numpy(), v.numpy()) for k, v in outs.items()}, "weights": weights,
            "output_scale": float(ref.abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated zoo names (default: all RepGhostNet widths, GhostNet "
                                    "0.5x/1.0x/1.3x; --quick: RepGhostNet 0.5x, GhostNet 0.5x)")
    p.add_argument("--batch", type=int, help="images per check (default 4; quick 2)")
    p.add_argument("--settings", default="randomize_bn,sgd_steps",
                   help="BN statistics: randomize_bn (reparam.testing.torch_checks.randomize_bn_), sgd_steps "
                        "(3 SGD steps on random data); comma-separated")
    args = p.parse_args(argv)

    import torch

    from reparam.measure import environment

    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    settings = [s for s in args.settings.split(",") if s]
    batch = args.batch or (2 if args.quick else 4)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for key in models:
        for setting in settings:
            C.log(f"{key}: {setting}")
            rows.append({"model": key, "label": C.width_label(key), "setting": setting,
                         **measure(key, setting, x, args.seed)})
    summary = {}
    for v in OUTPUT_VARIANTS:
        summary[v] = max(r["output"][v]["max_rel"] for r in rows)
    ours_vs_naive = [r["weights"]["naive_fold_float32"]["max_rel"] / max(r["weights"]["reparam_convert_float32"]
                                                                       ["max_rel"], 1e-300) for r in rows]
    result = {
        "benchmark": "fusion_accuracy", "quick": args.quick, "environment": environment(threads=1),
        "settings": {"models": models, "bn_settings": settings, "input": [batch, 3, 224, 224], "seed": args.seed,
                     "ground_truth": "unfused training-form model in float64",
                     "metric": "max|y - y_ref| / max|y_ref| over the logits (rms_rel: RMS ratio)"},
        "models": rows,
        "summary": {"worst_output_max_rel": summary,
                    "weight_error_naive_over_reparam": {"min": min(ours_vs_naive), "max": max(ours_vs_naive)}},
    }
    path = C.write_json(args.out, "fusion_accuracy", result)
    _plot(rows, args.out / "fusion_accuracy.png", args.quick)
    print("\nfusion accuracy: max relative error of the logits against the float64 unfused model"
          + ("  [QUICK]" if args.quick else ""))
    C.print_table(["model", "BN stats", "unfused f32", "reparam.fuse f32", "convert f32", "naive f32 fold",
                   "fuse f64", "weights: reparam", "weights: naive"],
                  [[r["label"], r["setting"], *(f"{r['output'][v]['max_rel']:.2e}" for v in OUTPUT_VARIANTS),
                    f"{r['weights']['reparam_convert_float32']['max_rel']:.2e}",
                    f"{r['weights']['naive_fold_float32']['max_rel']:.2e}"] for r in rows])
    print(f"\nwrote {path} and {args.out / 'fusion_accuracy.png'}")
    return 0


def _plot(rows: list[dict], path: Path, quick: bool) -> None:
    plt = C.pyplot()
    settings = sorted({r["setting"] for r in rows})
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(5.2 * (len(settings) + 1), 4.6), squeeze=False)
    colors = {"unfused_float32": "#9a9a9a", "reparam_fuse_float32": "#2a7ab9", "reparam_convert_float32": "#7fb77e",
              "naive_fold_float32": "#c0504d", "reparam_fuse_float64": "#f0a030"}

    def short(r):
        return r["label"].replace("RepGhostNet", "RG").replace("GhostNet", "G")

    for ax, setting in zip(axes[0], settings):
        sel = [r for r in rows if r["setting"] == setting]
        xs = range(len(sel))
        width = 0.8 / len(OUTPUT_VARIANTS)
        for j, v in enumerate(OUTPUT_VARIANTS):
            vals = [max(r["output"][v]["max_rel"], 1e-18) for r in sel]
            ax.bar([i + (j - (len(OUTPUT_VARIANTS) - 1) / 2) * width for i in xs], vals, width, color=colors[v],
                   label=v.replace("_", " "))
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [short(r) for r in sel], fontsize=7, rotation=30)
        ax.set_ylabel("logits: max rel. error vs float64 unfused")
        ax.set_title(f"outputs, BN statistics: {setting}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ax = axes[0][-1]
    xs = range(len(rows))
    for j, (v, label) in enumerate((("reparam_convert_float32", "reparam (float64 algebra, one rounding)"),
                                    ("naive_fold_float32", "naive float32 fold"))):
        ax.bar([i + (j - 0.5) * 0.4 for i in xs], [r["weights"][v]["max_rel"] for r in rows], 0.4,
               color=colors[v], label=label)
    ax.set_yscale("log")
    vals = [r["weights"][v]["max_rel"] for r in rows for v in ("reparam_convert_float32", "naive_fold_float32")]
    ax.set_ylim(min(vals) / 3, max(vals) * 10)
    abbrev = {"randomize_bn": "rand", "sgd_steps": "sgd"}
    ax.set_xticks(list(xs), [f"{short(r)} {abbrev.get(r['setting'], r['setting'])}" for r in rows], fontsize=6,
                  rotation=60)
    ax.set_ylabel("folded weights: max rel. error vs exact fold")
    ax.set_title("folded weights, worst tensor", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.legend(handles, labels, loc="lower center", ncol=len(OUTPUT_VARIANTS), fontsize=8)
    fig.suptitle("fusion accuracy" + ("  [quick run]" if quick else ""))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
