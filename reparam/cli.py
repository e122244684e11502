"""The ``reparam`` command (also ``python -m reparam``).

Subcommands live beside the code they drive; each module exposes ``register(subparsers)`` which adds a
parser whose ``func(args) -> int`` does the work.  Expected errors (:class:`ReparamError` and bad files)
print one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .core.errors import ReparamError

# subcommand -> module providing register(subparsers); imported lazily so `reparam --help` stays fast
SUBCOMMANDS = {
    "demo": "reparam.demo",
    "onnx": "reparam.onnx.command",
    "profile": "reparam_zoo.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reparam", description="Exact structural re-parameterization: fold multi-branch CNNs into plain convs.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(run `reparam {name} --help`)")
            continue
        try:
            importlib.import_module(module).register(sub)
        except ImportError as err:  # an optional extra is missing
            p = sub.add_parser(name, help=f"unavailable: {err}")
            p.set_defaults(func=lambda _a, e=err: _missing(e))
    return parser


def _version() -> str:
    from . import __version__

    return f"reparam {__version__}"


def _missing(err: ImportError) -> int:
    print(f"reparam: this command needs an optional dependency that is not installed ({err}); "
          "install the extras with `pip install -c constraints.txt -e '.[all]'`", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(wanted if wanted in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except ReparamError as err:
        print(f"reparam {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("reparam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
