"""``reparam onnx IN.onnx -o OUT.onnx [--check] [--report]``: fuse an ONNX model from the command line.

Nothing is written unless every step succeeds (including ``--check``): the output is staged in a
temporary directory beside it and moved into place last.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from reparam.core.errors import ReparamError

from .check import DEFAULT_ATOL, compare
from .errors import one_line
from .io import PROTOBUF_LIMIT, commit_staged, model_size, read_model, stage_model, staged_file
from .pipeline import run as fuse_run

DESCRIPTION = """\
Collapse the linear regions of an ONNX graph (Conv/Gemm/MatMul with BatchNormalization, summed
branches, identity and BN-only branches, per-channel Mul/Add, Pad and AveragePool feeding convs) into
plain convolutions, exactly.  Graph inputs and outputs keep their names and (dynamic) shapes."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``onnx`` subcommand."""
    p = subparsers.add_parser("onnx", help="fuse re-parameterization branches of an ONNX model",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.onnx", help="the training-form (multi-branch) model")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the fused model")
    p.add_argument("--check", action="store_true",
                   help="run both models in ONNX Runtime on random inputs and compare (exit 1 if they differ)")
    p.add_argument("--report", action="store_true",
                   help="list every region fused and every candidate refused, with its reason")
    p.add_argument("--allow-costlier", action="store_true",
                   help="also take fusions that raise the MAC count (e.g. a 1x1 conv into a wide kxk conv)")
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="store weights in OUT.onnx.data next to the output; auto: when the input had "
                        "external data or the model exceeds 2 GiB (default)")
    g = p.add_argument_group("--check options")
    g.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of the dynamic dimension NAME in the random inputs (repeatable)")
    g.add_argument("--default-dim", type=int, default=1, metavar="SIZE",
                   help="size of every other dynamic dimension (default 1, e.g. the batch)")
    g.add_argument("--rtol", type=float, default=None,
                   help="tolerance on max|diff| relative to max|output| (default 1e-4 for float32)")
    g.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default {DEFAULT_ATOL})")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.set_defaults(func=run)


def _parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, sep, size = item.partition("=")
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise ReparamError(f"--dim expects NAME=SIZE with a positive size, got {item!r}")
        dims[name] = int(size)
    return dims


def run(args: argparse.Namespace) -> int:
    """Fuse ``args.input`` into ``args.output``; returns the exit code."""
    dims = _parse_dims(args.dim)
    if args.default_dim < 1:
        raise ReparamError(f"--default-dim must be positive, got {args.default_dim}")
    output = Path(args.output)
    if output.is_dir():
        raise ReparamError(f"output {str(output)!r} is a directory")
    loaded = read_model(args.input)
    try:
        model, report, loaded = fuse_run(loaded, allow_costlier=args.allow_costlier)
    except ReparamError:
        raise
    except Exception as err:  # a bug, not bad input: still one line, and nothing written
        raise ReparamError(f"internal error while fusing ({type(err).__name__}: {one_line(err, 200)}); "
                           "nothing was written; please report this with the input model") from None
    if args.report:
        print(report.format())
    external = {"always": True, "never": False}.get(
        args.external_data, loaded.external_data or model_size(model) >= PROTOBUF_LIMIT)
    tmp = stage_model(model, output, external_data=external)
    try:
        if args.check:
            reference = loaded.model if loaded.path is None else loaded.path
            if report.bn_converted:
                reference, _, _ = fuse_run(loaded, fold=False)
                print(f"check: comparing with the input after its {len(report.bn_converted)} training-mode "
                      "BatchNormalization were converted to inference form (running statistics)")
            result = compare(reference, staged_file(tmp, output), dims=dims, default_dim=args.default_dim,
                             seed=args.seed, rtol=args.rtol, atol=args.atol)
            print(result.format())
            if not result.ok:
                raise ReparamError(f"the fused model differs from the input by {result.max_abs:.3g} "
                                   f"(relative {result.max_rel:.3g}), above tolerance; nothing was written")
        written = commit_staged(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = " + ".join(str(p) for p in written)
    print(f"reparam onnx: wrote {files}: {report.summary()}")
    return 0


__all__ = ["register", "run"]
