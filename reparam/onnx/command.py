"""``reparam onnx IN.onnx OUT.onnx [--check] [--report] [--json] [--simplify]``: fuse an ONNX model.

Nothing is written unless every step succeeds (including ``--check``): the output is staged in a
temporary directory beside it and moved into place last.  Progress goes to stderr once a run has taken
more than a few seconds; a closed stdout (``--report | head``) is not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from reparam.core.errors import ReparamError

from .check import DEFAULT_ATOL, compare
from .errors import one_line
from .io import PROTOBUF_LIMIT, commit_staged, model_size, read_model, stage_model, staged_file
from .pipeline import run as fuse_run
from .simplify import SIMPLIFIERS

DESCRIPTION = """\
Collapse the linear regions of an ONNX graph (Conv/Gemm/MatMul with BatchNormalization, summed
branches, identity and BN-only branches, per-channel Mul/Add, Pad and AveragePool feeding convs) into
plain convolutions, exactly.  Graph inputs and outputs keep their names and (dynamic) shapes."""

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``onnx`` subcommand."""
    p = subparsers.add_parser("onnx", help="fuse re-parameterization branches of an ONNX model",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.onnx", help="the training-form (multi-branch) model")
    p.add_argument("output", metavar="OUT.onnx", nargs="?", help="where to write the fused model")
    p.add_argument("-o", "--output", dest="output_option", metavar="OUT.onnx", help="the same as OUT.onnx")
    p.add_argument("--check", action="store_true",
                   help="run both models in ONNX Runtime on random inputs and compare (exit 1 if they differ)")
    p.add_argument("--report", action="store_true",
                   help="list every region fused and every candidate refused, with its reason")
    p.add_argument("--json", action="store_true",
                   help="print the report (and the --check result) as one JSON document on stdout; the summary "
                        "line goes to stderr")
    p.add_argument("--simplify", action="store_true",
                   help="then run a simplifier (onnxslim, else onnxsim: the `simplify` extra) on the result, so "
                        "one command gives the cleanest graph")
    p.add_argument("--simplifier", choices=("auto", *SIMPLIFIERS), default="auto",
                   help="which simplifier --simplify runs (default: onnxslim if installed, else onnxsim)")
    p.add_argument("--input-shape", "--overwrite-input-shape", dest="input_shape", action="append", default=[],
                   metavar="NAME:D0,D1,...",
                   help="fix the dynamic dims of graph input NAME (repeatable; NAME may be left out when there is "
                        "one input); the output keeps that shape, and branch sums exact at the fixed spatial "
                        "sizes are fused")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.add_argument("--allow-costlier", action="store_true",
                   help="also take fusions that raise the MAC count (e.g. a 1x1 conv into a wide kxk conv)")
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="store weights in OUT.onnx.data next to the output; auto: when the input had "
                        "external data or the model exceeds 2 GiB (default)")
    g = p.add_argument_group("--check options")
    g.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of the dynamic dimension NAME in the random inputs (repeatable; NAME must be a "
                        "dynamic dim of a graph input)")
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


def _parse_shapes(items: list[str]) -> dict[str, list[int | str]]:
    shapes: dict[str, list[int | str]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        parts = [d.strip() for d in dims.split(",")]
        if (sep and not name) or not dims or any(not d or not (d.isdigit() or d.isidentifier()) for d in parts):
            raise ReparamError(f"--input-shape expects NAME:D0,D1,... (sizes or dim names), got {item!r}")
        if name in shapes:
            raise ReparamError(f"--input-shape gives input {name or '(the only one)'!r} twice")
        shapes[name] = [int(d) if d.isdigit() else d for d in parts]
    return shapes


def _check_dim_names(model, dims: dict[str, int], shapes: dict) -> None:
    """Every --dim NAME must be a dynamic dim of a graph input (a misspelt name is an error, not ignored)."""
    known = set()
    for vi in model.graph.input:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            given = shapes.get(vi.name) or (shapes.get("") if len(model.graph.input) == 1 else None)
            if given is not None and k < len(given):
                if isinstance(given[k], str):
                    known.add(given[k])
            elif d.HasField("dim_param") and d.dim_param:
                known.add(d.dim_param)
    for name in dims:
        if name not in known:
            raise ReparamError(f"--dim {name}: no graph input has a dynamic dimension named {name!r} "
                               f"(dynamic dims: {', '.join(sorted(known)) or 'none'})")


class _Stdout:
    """stdout that tolerates its reader going away (``--report | head``): the rest is discarded and the command
    carries on, so the output file is still written and the exit code is that of the work."""

    def __init__(self) -> None:
        self.gone = False

    def __call__(self, text: str) -> None:
        if self.gone:
            return
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.gone = True
            try:  # later writes (and the interpreter's final flush) go nowhere instead of raising again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass


class Progress:
    """Stage messages on stderr, once a run has taken ``after`` seconds, at most one per ``every`` seconds."""

    def __init__(self, enabled: bool = True, after: float = 2.0, every: float = 1.0) -> None:
        self.enabled, self.after, self.every = enabled, after, every
        self.start = time.monotonic()
        self.last = -every

    def __call__(self, message: str) -> None:
        now = time.monotonic() - self.start
        if not self.enabled or now < self.after or now - self.last < self.every:
            return
        self.last = now
        try:
            print(f"reparam onnx: [{now:.1f} s] {message}", file=sys.stderr, flush=True)
        except (BrokenPipeError, ValueError):
            self.enabled = False


def run(args: argparse.Namespace) -> int:
    """Fuse ``args.input`` into the output; returns the exit code."""
    say = _Stdout()
    progress = Progress(enabled=not args.quiet)
    if args.output and args.output_option and args.output != args.output_option:
        raise ReparamError(f"two outputs given ({args.output!r} and -o {args.output_option!r}); give one")
    if not (args.output or args.output_option):
        raise ReparamError("no output given: reparam onnx IN.onnx OUT.onnx (or -o OUT.onnx)")
    output = Path(args.output or args.output_option)
    dims = _parse_dims(args.dim)
    shapes = _parse_shapes(args.input_shape)
    if args.default_dim < 1:
        raise ReparamError(f"--default-dim must be positive, got {args.default_dim}")
    if output.is_dir():
        raise ReparamError(f"output {str(output)!r} is a directory")
    progress(f"reading {args.input}")
    loaded = read_model(args.input)
    _check_dim_names(loaded.model, dims, shapes)
    try:
        model, report, loaded = fuse_run(loaded, allow_costlier=args.allow_costlier, input_shapes=shapes,
                                         simplify=args.simplifier if args.simplify else False, progress=progress)
    except ReparamError:
        raise
    except Exception as err:  # a bug, not bad input: still one line, and nothing written
        raise ReparamError(f"internal error while fusing ({type(err).__name__}: {one_line(err, 200)}); "
                           "nothing was written; please report this with the input model") from None
    if args.report and not args.json:
        say(report.format())
    external = {"always": True, "never": False}.get(
        args.external_data, loaded.external_data or model_size(model) >= PROTOBUF_LIMIT)
    progress(f"writing {output}")
    tmp = stage_model(model, output, external_data=external)
    result = None
    try:
        if args.check:
            progress("comparing input and output in ONNX Runtime")
            reference = loaded.model if loaded.path is None else loaded.path
            if report.bn_converted:
                reference, _, _ = fuse_run(loaded, fold=False)
                (_stderr if args.json else say)(
                    f"check: comparing with the input after its {len(report.bn_converted)} training-mode "
                    "BatchNormalization were converted to inference form (running statistics)")
            result = compare(reference, staged_file(tmp, output), dims=dims, default_dim=args.default_dim,
                             seed=args.seed, rtol=args.rtol, atol=args.atol)
            if not args.json:
                say(result.format())
            if not result.ok:
                raise ReparamError(f"the fused model differs from the input by {result.max_abs:.3g} "
                                   f"(relative {result.max_rel:.3g}), above tolerance; nothing was written")
        written = commit_staged(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = " + ".join(str(p) for p in written)
    line = f"reparam onnx: wrote {files}: {report.summary()}"
    if args.json:
        say(json.dumps({"input": str(args.input), "written": [str(p) for p in written], "report": report.to_dict(),
                        "check": None if result is None else result.to_dict()}, indent=2))
        _stderr(line)
    else:
        say(line)
    return 0


def _stderr(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):
        pass


__all__ = ["register", "run"]
