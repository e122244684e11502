"""Test helper: make the top-level packages named in ``REPARAM_TEST_HIDE`` (comma-separated) look not installed.

Put this directory first on ``PYTHONPATH`` of a subprocess.  Every import finder is wrapped so that it finds
nothing for a hidden name: ``import torch`` raises ``ModuleNotFoundError: No module named 'torch'`` and
``importlib.util.find_spec("torch")`` returns None, exactly as in an environment without the package.
"""

import os
import sys

HIDDEN = frozenset(filter(None, os.environ.get("REPARAM_TEST_HIDE", "").split(",")))


class _Hiding:
    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self._inner, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
        return getattr(self._inner, attr)


if HIDDEN:
    sys.meta_path[:] = [_Hiding(finder) for finder in sys.meta_path]
