"""Run every entry point of ``extras_matrix`` in this one process and print the outcomes as JSON.

Used by ``test_extras.py`` in a subprocess whose packages are hidden by ``blocker/sitecustomize.py``: one
interpreter (and at most one torch import) per extras combination instead of one per entry point.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from extras_matrix import ENTRY_POINTS

from reparam.cli import main


def _run(ep, tmp: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    rc, exception = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if ep.argv:
                rc = main([a.replace("{tmp}", tmp) for a in ep.argv])
            else:
                exec(compile(ep.code, ep.name, "exec"), {"__name__": "__main__"})
                rc = 0
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException as exc:  # what the interpreter would print as the traceback's last line
            exception = traceback.format_exception_only(type(exc), exc)[-1].strip()
            if ep.argv:  # a CLI entry point must never let an exception escape
                err.write("Traceback (most recent call last):\n" + traceback.format_exc())
            rc = 1
    return {"name": ep.name, "rc": rc, "out": out.getvalue(), "err": err.getvalue(), "exception": exception}


if __name__ == "__main__":
    print(json.dumps([_run(ep, sys.argv[1]) for ep in ENTRY_POINTS]))
