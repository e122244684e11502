"""The Python code of identical graphs generated and compiled once per fusion.

Each ``fx.GraphModule`` turns its graph into Python source and compiles it (``GraphModule.recompile``): about
0.2 ms for even a three-node graph, most of it fx's code generator.  A model fused child by child (YOLO's
parents are untraceable) makes a GraphModule for each child, and most of them are copies of a few blocks
(every ``Conv`` child: conv, act) whose graphs, node names included, are the same.  :func:`shared_code`
keeps, while it is open, the generated code of each graph by the graph's structure (each node's op, name,
target and arguments), and each compiled ``forward`` by its source and globals, so the copies reuse them.

Only plain graphs are shared: fx's default code generator, no verbose or profiler-recording output (which
read ``node.meta``), and arguments that are nodes or plain constants; any other graph is generated as
usual.  The cache lives for one build (:func:`.build.build`): a later one generates its own code.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from torch import fx

from .tracing import _PLAIN

_gm = fx.graph_module
_immutable = fx.immutable_collections
# a graph argument's sequence types as the code spells them (fx stores a node's lists as immutable_list)
_SEQUENCES = {tuple: tuple, list: list, _immutable.immutable_list: list}
_state = threading.local()  # .codes: graph key -> PythonCode; .forwards: source key -> (function, globals)


class _Unshared(Exception):
    """A graph argument the key cannot stand for."""


def _arg_key(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return ("node", a.name)
    kind = type(a)
    if kind is float:
        return (kind, repr(a))  # (0.0 == -0.0, but the code spells them apart)
    if kind in _PLAIN:
        return (kind, a)
    if kind in _SEQUENCES:
        return (_SEQUENCES[kind], tuple(_arg_key(x) for x in a))
    if kind is dict or kind is _immutable.immutable_dict:  # (a node's kwargs, as fx stores them)
        return (dict, tuple((k, _arg_key(v)) for k, v in a.items()))
    if kind is slice:
        return (kind, _arg_key(a.start), _arg_key(a.stop), _arg_key(a.step))
    raise _Unshared(kind.__name__)


def _graph_key(graph: fx.Graph) -> tuple | None:
    """What fx's default code generator reads of ``graph``, or None when it may read more (another code
    generator, an argument that is not a node or a plain constant)."""
    if type(graph._codegen) is not fx.graph.CodeGen:
        return None
    try:
        key = tuple((n.op, n.name, n.target, _arg_key(n.args), _arg_key(n.kwargs), n.type) for n in graph.nodes)
        hash(key)  # (a target or annotation that cannot be hashed: not shared)
    except (_Unshared, TypeError):
        return None
    return key


_lock = threading.Lock()
_users = 0  # threads inside shared_code(): the wrappers are installed while there is one
_originals: tuple[Any, Any] | None = None  # fx's python_code and _forward_from_src, once wrapped


def _shows_meta() -> bool:
    return os.environ.get("FX_GRAPH_SHOW_META", "0") == "1"  # (fx then prints node.meta into the code)


def _shared_python_code(graph: fx.Graph, root_module: str, **options: Any) -> Any:
    python_code = _originals[0]
    codes = getattr(_state, "codes", None)
    plain = codes is not None and not _shows_meta() and not any(
        options.get(k) for k in ("verbose", "record_func", "expanded_def"))
    key = _graph_key(graph) if plain else None
    if key is None:
        return python_code(graph, root_module, **options)
    key = (root_module, tuple(sorted(options.items())), key)
    if key not in codes:
        codes[key] = python_code(graph, root_module, **options)
    return codes[key]


def _shared_forward(src: str, globals: dict[str, Any], co_fields: dict[str, Any] | None = None) -> Any:
    forward_from_src = _originals[1]
    forwards = getattr(_state, "forwards", None)
    if forwards is None:
        return forward_from_src(src, globals, co_fields)
    key = (src, tuple((k, id(v)) for k, v in globals.items()), tuple(sorted((co_fields or {}).items())))
    if key not in forwards:  # (the globals are kept with it: the ids in the key stay theirs)
        forwards[key] = (forward_from_src(src, globals, co_fields), globals)
    return forwards[key][0]


@contextlib.contextmanager
def shared_code() -> Iterator[None]:
    """Share generated and compiled code among identical graphs made in this thread until the block ends
    (nested: a no-op).  Other threads generate their own code meanwhile."""
    global _users, _originals
    if getattr(_state, "codes", None) is not None or not callable(getattr(_gm, "_forward_from_src", None)):
        yield
        return
    with _lock:
        if _users == 0:
            _originals = (fx.Graph.python_code, _gm._forward_from_src)
            fx.Graph.python_code, _gm._forward_from_src = _shared_python_code, _shared_forward
        _users += 1
    _state.codes, _state.forwards = {}, {}
    try:
        yield
    finally:
        _state.codes = _state.forwards = None
        with _lock:
            _users -= 1
            if _users == 0:  # (_originals stays: a call already inside a wrapper still finds fx's functions)
                fx.Graph.python_code, _gm._forward_from_src = _originals


__all__ = ["shared_code"]
