"""The ``reparam`` command (also ``python -m reparam``).

Subcommands live beside the code they drive; each module exposes ``register(subparsers)`` which adds a
parser whose ``func(args) -> int`` does the work.  Only the chosen subcommand's module is imported, after
checking that the extras it needs are installed, so ``reparam --help`` is fast and a missing extra gives one
line with the ``pip install`` command, whatever the arguments.

Exit codes: 0 success, 1 an expected error (:class:`ReparamError`: bad file, unknown model, a fused model that
differs), 2 bad arguments or a missing extra, 130 interrupted.  Expected errors print one line, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ._extras import MissingExtra, extra_of, install_line, missing_extras
from .core.errors import ReparamError

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "main", "non_negative_int", "positive_int"]


class UsageError(ReparamError):
    """A bad argument value found after parsing (e.g. an unknown model name): usage line + one line, exit 2."""


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


#: argparse ``type=`` for options that must be >= 1 / >= 0 (one-line error, exit 2).
positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "a non-negative integer")


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``register(subparsers)`` defines it, a summary for ``reparam --help``,
    the extras it needs to run (named in that summary when missing), and those its module needs to be
    imported at all (checked before parsing; the demo checks the rest itself, as they depend on its
    arguments)."""

    module: str
    summary: str
    needs: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()


COMMANDS = {
    "demo": Command("reparam.demo", "fuse a zoo model with both frontends, verify, time and chart it",
                    needs=("torch", "onnx")),
    "onnx": Command("reparam.onnx.command", "fuse the re-parameterization branches of an ONNX model",
                    needs=("onnx",), imports=("onnx",)),
    "profile": Command("reparam_zoo.cli", "print parameters and MACs of zoo models",
                       needs=("torch",), imports=("torch",)),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``reparam`` parser; with ``only`` the real parser of that subcommand, the others as summaries."""
    parser = argparse.ArgumentParser(
        prog="reparam", description="Exact structural re-parameterization: fold multi-branch CNNs into plain convs.",
        epilog="Run `reparam COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        if name == only:
            importlib.import_module(cmd.module).register(sub)
            continue
        missing = missing_extras(cmd.needs)
        note = f" (needs {install_line(missing)})" if missing else ""
        sub.add_parser(name, help=cmd.summary + note)
    return parser


def _version() -> str:
    from . import __version__

    return f"reparam {__version__}"


def _unavailable(name: str) -> str | None:
    """The one-line reason subcommand ``name`` cannot even parse its arguments here, or None."""
    cmd = COMMANDS[name]
    try:
        missing = missing_extras(cmd.imports)
        if missing:
            raise MissingExtra(f"reparam {name}", missing)
        importlib.import_module(cmd.module)
    except MissingExtra as err:
        return str(err)
    except ImportError as err:  # a dependency of the extra, or a broken install
        extra = extra_of(err.name)
        hint = f"; install it with: {install_line([extra])}" if extra else ""
        return f"reparam {name} cannot start: {err}{hint}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``reparam ARGV`` (default ``sys.argv[1:]``) and return its exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    if wanted in COMMANDS:
        reason = _unavailable(wanted)
        if reason:
            print(reason, file=sys.stderr)
            return 2
    parser = build_parser(wanted if wanted in COMMANDS else None)
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    own = _subparser(parser, command) or parser
    if unknown:  # argparse would report these with the top-level usage; show the subcommand's own
        return _usage_error(own, f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        return _usage_error(own, str(err))
    except MissingExtra as err:
        print(err, file=sys.stderr)
        return 2
    except ReparamError as err:
        print(f"reparam {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("reparam: interrupted", file=sys.stderr)
        return 130


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    """What ``parser.error`` prints (usage, then ``PROG: error: MESSAGE``), as a return code instead of exit."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


if __name__ == "__main__":
    sys.exit(main())
