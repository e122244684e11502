"""Which optional extras are installed, and the one-line message that names a missing one.

Only numpy is required.  Each frontend needs an extra of ``pyproject.toml``; an entry point calls
:func:`require` before importing it, so a missing extra reads ``... pip install "reparam[onnx]"`` instead of
a ``No module named 'onnx'`` traceback from deep inside the import.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = ["EXTRAS", "MissingExtra", "extra_of", "install_line", "missing_extras", "require"]

#: extra -> (importable module, distribution name) pairs it provides, as in pyproject.toml.  onnxscript
#: belongs to the onnx extra but only ``torch.onnx.export(dynamo=True)`` imports it, so nothing requires it.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "torch": (("torch", "torch"),),
    "onnx": (("onnx", "onnx"), ("onnx_graphsurgeon", "onnx-graphsurgeon"), ("onnxruntime", "onnxruntime")),
    "bench": (("matplotlib", "matplotlib"),),
    "simplify": (("onnxslim", "onnxslim"),),
}


class MissingExtra(ModuleNotFoundError):
    """An optional extra is not installed; the message names it and the ``pip install`` line.

    A :class:`ModuleNotFoundError`, so ``except ImportError`` and ``pytest.importorskip`` treat it as the
    missing module it stands for (``name`` is the first missing module).
    """

    def __init__(self, feature: str, missing: dict[str, list[str]]) -> None:
        self.feature = feature
        self.extras = list(missing)
        packages = [p for names in missing.values() for p in names]
        what = (f"the {self.extras[0]} extra" if len(self.extras) == 1
                else f"the {_join(self.extras)} extras")
        verb = "is" if len(packages) == 1 else "are"
        pronoun = "it" if len(self.extras) == 1 else "them"
        super().__init__(f"{feature} needs {what} ({_join(packages)} {verb} not installed); "
                         f"install {pronoun} with: {install_line(self.extras)}",
                         name=_first_module(missing))


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a finder refused it, or a half-imported module without a spec
        return True


def _first_module(missing: dict[str, list[str]]) -> str | None:
    for extra, packages in missing.items():
        for module, dist in EXTRAS[extra]:
            if dist in packages:
                return module
    return None


def missing_extras(extras: Iterable[str]) -> dict[str, list[str]]:
    """``{extra: [distributions not installed]}`` for each of ``extras`` that is incomplete (no import)."""
    out: dict[str, list[str]] = {}
    for extra in extras:
        absent = [dist for module, dist in EXTRAS[extra] if _absent(module)]
        if absent:
            out[extra] = absent
    return out


def install_line(extras: Iterable[str]) -> str:
    """``pip install "reparam[torch,onnx]"``."""
    return f'pip install "reparam[{",".join(extras)}]"'


def require(*extras: str, feature: str) -> None:
    """Raise :class:`MissingExtra` naming ``feature`` if any of ``extras`` is not installed."""
    missing = missing_extras(extras)
    if missing:
        raise MissingExtra(feature, missing)


def extra_of(module: str | None) -> str | None:
    """The extra that provides the top-level package of ``module`` (e.g. from ``ImportError.name``)."""
    top = (module or "").split(".")[0]
    return next((extra for extra, pairs in EXTRAS.items() if any(m == top for m, _ in pairs)), None)
