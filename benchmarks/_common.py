"""Helpers shared by the benchmark scripts: arguments, model building, ONNX export, result files.

Timing itself is :mod:`reparam.measure` (``interleaved_medians``, ``torch_runner``, ``ort_session``,
``ort_runner``, ``environment``); nothing here re-implements it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

#: RepGhostNet widths of the paper, smallest first (zoo model names).
REPGHOST_WIDTHS = ("0_5x", "0_58x", "0_8x", "1_0x", "1_11x", "1_3x", "1_5x", "2_0x")
GHOST_WIDTHS = ("0_5x", "1_0x", "1_3x")

#: RepVGGNet's default configuration (about 123M training-form parameters) is timed at this input size,
#: which keeps one forward pass on one thread near a second; the size is written into every result.
REPVGG_INPUT = 128


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (few repeats, one or two models): checks the script, numbers are noise")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0)
    return p


def width_label(key: str) -> str:
    """``repghostnet_1_0x -> 'RepGhostNet 1.0x'``."""
    for prefix, family in (("repghostnet_", "RepGhostNet"), ("ghostnet_", "GhostNet")):
        if key.startswith(prefix):
            return f"{family} {key[len(prefix):].replace('_', '.')}"
    return {"resnet50like": "ResNet50Like", "repvggnet": "RepVGGNet"}.get(key, key)


def build_model(key: str, deploy: bool = False):
    """A zoo model by name, plus the two ``reparam_zoo.blocks`` networks ``resnet50like`` and ``repvggnet``."""
    import reparam_zoo
    from reparam_zoo.blocks import RepVGGNet, ResNet50Like

    if key == "resnet50like":
        return ResNet50Like(deploy=deploy)
    if key == "repvggnet":
        return RepVGGNet(deploy=deploy)
    return reparam_zoo.create_model(key, deploy=deploy) if deploy else reparam_zoo.create_model(key)


def input_size(key: str) -> int:
    return REPVGG_INPUT if key == "repvggnet" else 224


def trained_like(key: str, seed: int):
    """The training-form model in eval mode with non-trivial BN statistics (``randomize_bn_``)."""
    import torch

    from reparam.testing.torch_checks import randomize_bn_

    torch.manual_seed(seed)
    model = build_model(key)
    randomize_bn_(model, seed=seed)
    return model.eval()


def export_onnx(model, x, path: Path) -> Path:
    """``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``, fast), opset 17, eval mode."""
    import torch

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return path


def load_deploy_weights(train, deploy) -> int:
    """Give a ``deploy=True`` block network (ResNet50Like, RepVGGNet) the folded weights of ``train``.

    Every conv of the deploy model at path ``P`` (or ``P.reparam``) stands for the training-form submodule at
    ``P`` (a conv+BN pair, or a whole RepVGG block); that submodule alone is folded with ``reparam.fuse`` and
    its single conv copied over.  Linear layers are copied as they are.  Returns the number of layers set;
    callers should compare outputs.
    """
    import torch
    from torch import nn

    import reparam

    n = 0
    with torch.no_grad():
        for name, dst in deploy.named_modules():
            if isinstance(dst, nn.Linear):
                src = train.get_submodule(name)
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
            elif isinstance(dst, nn.Conv2d):
                src = train.get_submodule(name.removesuffix(".reparam"))
                convs = [m for m in reparam.fuse(src).modules() if isinstance(m, nn.Conv2d)]
                if len(convs) != 1 or convs[0].weight.shape != dst.weight.shape:
                    raise RuntimeError(f"{name}: folding the training-form submodule gave {convs}, not one conv "
                                       f"of shape {tuple(dst.weight.shape)}")
                dst.weight.copy_(convs[0].weight)
                dst.bias.copy_(convs[0].bias)
            else:
                continue
            n += 1
    return n


def max_rel(ref, out) -> float:
    """``max|out - ref| / max|ref|`` in float64 (arrays or tensors)."""
    import numpy as np

    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(out, dtype=np.float64)
    scale = float(np.abs(r).max())
    return float(np.abs(o - r).max()) / scale if scale else float(np.abs(o - r).max())


def write_json(out_dir: Path, name: str, data: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_jsonable))
    return path


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_ticks(ax, axes: str = "xy") -> None:
    """Tick labels like ``40`` instead of ``4 x 10^1`` on log axes (major and minor), on the ``axes`` named."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    for axis in [getattr(ax, f"{a}axis") for a in axes]:
        axis.set_major_formatter(fmt)
        axis.set_minor_formatter(fmt)
        axis.set_tick_params(which="minor", labelsize=7)


def print_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    print("  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(r, widths))))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def loglog_interp(xs: Sequence[float], ys: Sequence[float], x: float) -> tuple[float, bool]:
    """Piecewise-linear interpolation in log-log space; extrapolates from the two end points.

    Returns ``(y, extrapolated)``.  ``xs`` must be increasing and have at least two points.
    """
    if len(xs) < 2:
        raise ValueError("need at least two points to interpolate")
    lx, ly, t = [math.log(v) for v in xs], [math.log(v) for v in ys], math.log(x)
    i = next((k for k in range(1, len(lx)) if t <= lx[k]), len(lx) - 1)
    extrapolated = t < lx[0] or t > lx[-1]
    x0, x1, y0, y1 = lx[i - 1], lx[i], ly[i - 1], ly[i]
    return math.exp(y0 + (y1 - y0) * (t - x0) / (x1 - x0)), extrapolated
