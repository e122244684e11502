"""Command-line entry for ``reparam profile MODEL_NAME [MODEL_NAME ...] [--input-size ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["build_profile_parser", "profile_main", "register"]


def build_profile_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the ``profile`` arguments to ``parser`` (a new one if None), e.g. a sub-command parser."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="reparam profile", description="Print parameters and MACs of reparam_zoo models.")
    parser.add_argument("models", nargs="+", metavar="MODEL_NAME",
                        help="registered model name(s), e.g. repghostnet_1_0x, or 'all'")
    parser.add_argument("--input-size", nargs="+", type=int, default=[1, 3, 224, 224], metavar="N",
                        help="input shape: N C H W, C H W, or H W (default 1 3 224 224)")
    parser.add_argument("--deploy", action="store_true", help="profile the deploy (fused) form")
    parser.add_argument("--num-classes", type=int, default=1000)
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``reparam profile`` to the ``reparam`` command."""
    parser = sub.add_parser("profile", help="parameters and MACs of zoo models",
                            description="Print parameters and MACs of reparam_zoo models (paper's counting rule).")
    build_profile_parser(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from reparam.core.errors import ReparamError

    from .profiling import profile_table
    from .registry import list_models

    try:
        size = _input_size(args.input_size)
    except ValueError as exc:
        raise ReparamError(str(exc)) from None
    names = list_models() if args.models == ["all"] else args.models
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise ReparamError(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(list_models())}")
    print(f"input size {tuple(size)}" + (", deploy form" if args.deploy else ""))
    print(profile_table(names, size, deploy=args.deploy, num_classes=args.num_classes))
    return 0


def _input_size(values: Sequence[int]) -> tuple[int, ...]:
    if len(values) == 2:
        return (1, 3, *values)
    if len(values) == 3:
        return (1, *values)
    if len(values) == 4:
        return tuple(values)
    raise ValueError(f"--input-size takes 2, 3 or 4 integers, got {list(values)}")


def profile_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (without the sub-command name), print a params/MACs table, return the exit code."""
    from reparam.cli import main

    return main(["profile", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(profile_main())
