"""Command-line entry for ``reparam profile MODEL_NAME [MODEL_NAME ...] [--input-size ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reparam.cli import UsageError, positive_int
from reparam.core.errors import ReparamError

__all__ = ["build_profile_parser", "profile_main", "register"]


def build_profile_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the ``profile`` arguments to ``parser`` (a new one if None), e.g. a sub-command parser."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="reparam profile", description="Print parameters and MACs of reparam_zoo models.")
    parser.add_argument("models", nargs="*", metavar="MODEL_NAME",
                        help="registered model name(s), e.g. repghostnet_1_0x, or 'all'")
    parser.add_argument("--list", action="store_true", help="print the registered model names and exit")
    parser.add_argument("--input-size", nargs="+", type=positive_int, default=[1, 3, 224, 224], metavar="N",
                        help="input shape: N C H W, C H W, or H W (default 1 3 224 224)")
    parser.add_argument("--deploy", action="store_true",
                        help="profile the hand-written deploy form (deploy=True: BN and branches folded)")
    parser.add_argument("--num-classes", type=positive_int, default=1000,
                        help="classifier outputs of the models built (default 1000)")
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``reparam profile`` to the ``reparam`` command."""
    parser = sub.add_parser("profile", help="print parameters and MACs of zoo models",
                            description="Print parameters and MACs of reparam_zoo models (the paper's counting "
                                        "rule: conv and Linear multiply-accumulates, one per conv bias output).")
    build_profile_parser(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .profiling import profile_table
    from .registry import list_models

    if args.list:
        print("\n".join(list_models()))
        return 0
    if not args.models:
        raise UsageError("give model name(s), 'all', or --list")
    size = _input_size(args.input_size)
    names = list_models() if args.models == ["all"] else args.models
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; `reparam profile --list` lists them")
    try:
        table = profile_table(names, size, deploy=args.deploy, num_classes=args.num_classes)
    except RuntimeError as err:  # e.g. an input too small or with the wrong number of channels
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReparamError(f"the forward pass at input size {size} failed: {first}") from None
    print(f"input size {tuple(size)}" + (", deploy form" if args.deploy else ""))
    print(table)
    return 0


def _input_size(values: Sequence[int]) -> tuple[int, ...]:
    if len(values) == 2:
        return (1, 3, *values)
    if len(values) == 3:
        return (1, *values)
    if len(values) == 4:
        return tuple(values)
    raise UsageError(f"--input-size takes 2, 3 or 4 integers, got {len(values)}")


def profile_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (without the sub-command name), print a params/MACs table, return the exit code."""
    from reparam.cli import main

    return main(["profile", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(profile_main())
