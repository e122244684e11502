"""One set of fx's tracing patches for all the traces of a fusion.

``fx.Tracer.trace`` patches ``nn.Module.__getattr__`` and ``__call__`` on entry and reverts them on exit.
Writing a dunder attribute of ``nn.Module`` makes CPython update the slot of every subclass, and with timm
or ultralytics loaded there are thousands: the four writes cost about 2 ms a trace.  A fusion traces each
child of an untraceable parent on its own (a YOLO model: about 60 traces), so that was a fifth of its time.

:func:`tracing_session` patches the two methods once.  Its wrappers hand each call to the
:class:`~reparam.fx.tracing.ReparamTracer` tracing in this thread (see :func:`tracing`), or to the original
when none is, and they carry fx's "already patched" mark, so each ``trace`` inside the session leaves them
as they are.  ``math``'s functions, which fx wraps so that ``math.sqrt(x.size(1))`` records a node, are
patched once for the session too (reparam's own code binds ``prod`` at import, so the planner's calls do
not go through the wrappers), and so are the functions registered with ``torch.fx.wrap`` (torchvision's
ops, timm's helpers: some fifty with those loaded), each trace's own patching of them turned off; a
wrapper called without a proxy calls its function.  Each module's globals are searched for math's
functions once per session, not once per trace (fx's search of the traced forward's globals included), and
fx's spelling of node names from their targets is cached.  When this torch's fx lacks a private name used
here, the session does nothing and every trace patches for itself, as before.  While a session is open, an fx
trace started by other code (in another thread) would find the two methods already patched and not record
module calls; fx's patches are process-wide, so concurrent fx traces interfere without reparam too.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from typing import Any

from torch import fx, nn

_fx = fx._symbolic_trace
_graph = fx.graph
_NEEDED = ("_Patcher", "_autowrap_check", "_create_wrapped_func", "CURRENT_PATCHER")
_MARK = "__fx_already_patched"
_WRAPPERS: dict[tuple[Any, Any], Any] = {}  # (fx's wrapper maker, a function fx wraps) -> the wrapper
_state = threading.local()  # .tracer: the ReparamTracer tracing in this thread; .active: a session is open


def fx_tracing() -> bool:
    """An fx trace is under way (its patcher is current)."""
    return getattr(_fx, "CURRENT_PATCHER", None) is not None


def session_math_ids() -> set[int] | None:
    """Inside a session, the ids of ``math``'s own functions, which a tracer autowraps (fx would read them off
    the math module, where the session's wrappers now are, and scan that module again each trace); else None."""
    return getattr(_state, "math_ids", None) if getattr(_state, "active", False) else None


def current_tracer() -> Any:
    return getattr(_state, "tracer", None)


@contextlib.contextmanager
def tracing(tracer: Any) -> Iterator[None]:
    """Route module calls and attribute reads to ``tracer`` while it traces (inside a session)."""
    outer = current_tracer()
    _state.tracer = tracer
    try:
        yield
    finally:
        _state.tracer = outer


@contextlib.contextmanager
def tracing_session() -> Iterator[None]:
    """Keep fx's tracing patches applied for the duration (nested sessions and fx traces already under
    way leave it a no-op)."""
    getattr_, call = nn.Module.__getattr__, nn.Module.__call__
    if (getattr(_state, "active", False) or not all(hasattr(_fx, n) for n in _NEEDED)
            or not hasattr(_fx._Patcher, "visit_once") or fx_tracing()):
        yield
        return

    @functools.wraps(getattr_)
    def module_getattr(mod: nn.Module, attr: str) -> Any:
        value = getattr_(mod, attr)
        tracer = current_tracer()
        return value if tracer is None else tracer.getattr(attr, value, tracer.proxy_cache)

    @functools.wraps(call)
    def module_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
        tracer = current_tracer()
        if tracer is None:
            return call(mod, *args, **kwargs)
        patcher = getattr(_fx, "CURRENT_PATCHER", None)
        if patcher is not None:  # as fx does on each call: math functions imported into the forward's module
            autowrap(patcher, getattr(getattr(mod, "forward", mod), "__globals__", {}), tracer._autowrap_function_ids)

        def forward(*a: Any, **k: Any) -> Any:
            return call(mod, *a, **k)
        return tracer.call_module(mod, forward, args, kwargs)

    wrap = _fx._create_wrapped_func
    scanned: dict[int, tuple[set[int], list[str]]] = {}  # id of a globals dict -> (function ids, names found)

    def autowrap(patcher: Any, frame_dict: dict[str, Any], function_ids: set[int]) -> None:
        """fx's ``_autowrap_check``, each module's globals scanned once per session, not once per trace (a
        YOLO model's 60 traces each scanned the same few large dicts)."""
        if not patcher.visit_once(frame_dict):
            return
        ids, names = scanned.get(id(frame_dict), (None, None))
        if ids != function_ids:
            names = [k for k, v in frame_dict.items()
                     if not k.startswith("_") and callable(v) and id(v) in function_ids]
            scanned[id(frame_dict)] = (set(function_ids), names)
        for k in names:
            if k in frame_dict and id(frame_dict[k]) in function_ids:  # (still what was found)
                patcher.patch(frame_dict, k, wrapped_once(frame_dict[k]))

    def wrapped_once(fn: Any) -> Any:  # the same wrapper each trace and session, not a new functools.wraps copy
        key = (wrap, fn)
        if key not in _WRAPPERS:
            _WRAPPERS[key] = wrap(fn)
        return _WRAPPERS[key]

    with _fx._Patcher() as patcher:
        patcher.patch_method(nn.Module, "__getattr__", module_getattr)
        patcher.patch_method(nn.Module, "__call__", module_call)
        for p in patcher.patches_made:  # the mark fx looks for (its own sets a name-mangled one, never found)
            setattr(p.new_fn, _MARK, True)
        patcher.patch(vars(_fx), "_create_wrapped_func", wrapped_once)
        patcher.patch(vars(_fx), "_autowrap_check", autowrap)  # (fx's check of the root forward's globals)
        math_fns = {name: fn for name, fn in vars(math).items() if not name.startswith("_") and callable(fn)}
        _state.math_ids = {id(fn) for fn in math_fns.values()}  # what a tracer made now must look for
        for name, fn in math_fns.items():  # fx's autowrapped module, patched by each trace otherwise
            patcher.patch(vars(math), name, wrapped_once(fn))
        if callable(getattr(_fx, "_patch_wrapped_functions", None)):  # those registered with fx.wrap, likewise
            _fx._patch_wrapped_functions(patcher)
            patcher.patch(vars(_fx), "_patch_wrapped_functions", lambda _patcher: None)
        if callable(getattr(_graph, "_snake_case", None)):  # a node's name from its target: a regex each node
            patcher.patch(vars(_graph), "_snake_case", functools.lru_cache(maxsize=None)(_graph._snake_case))
        _state.active = True
        try:
            yield
        finally:
            _state.active, _state.math_ids = False, None
