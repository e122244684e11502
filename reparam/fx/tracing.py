"""Symbolic tracing for fusion: standard layers stay leaves, BN subclasses are traced through."""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import dis
import functools
import inspect
import math
import operator
from collections.abc import Iterator
from types import CodeType
from typing import Any

import torch
from torch import fx, nn

from ..torch_ops import _BNS, _CONV_TRANSPOSES, _CONVS, _PADS, _POOLS, is_exported_module, is_no_op, plain_forward
from .facts import _arg
from .patching import session_math_ids, tracing
from .workspace import Call, Calls, Workspace


class _Behaviour:
    """What the proxies of a reparam trace do differently from fx's (mixed into its Proxy and Attribute).

    ``y += b`` is recorded as ``operator.iadd`` so the traced graph keeps the in-place update (and aliases see
    it); plain fx falls back to ``y = y + b`` there, which changes what other references to ``y`` read."""

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other):
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other):
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other):
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})

    def __getattr__(self, k: str) -> fx.Proxy:
        return _Attribute(self, k)  # (``x.shape`` is one: ``b, c, h, w = x.shape`` iterates it)

    def __len__(self) -> int:
        """The number of pieces of a split that the graph decides (see :meth:`ReparamTracer.iter`); fx's
        error otherwise."""
        node = vars(self).get("_node") if isinstance(self, fx.proxy.Attribute) else self.node  # (not made here)
        count = None if node is None else _piece_count(node, self.tracer.root)
        return super().__len__() if count is None else count

    def __iter__(self):
        """As fx's: ``a, b = proxy`` gives that many items, any other iteration fails; the calling code's
        instructions are decoded once per code object instead of on every call."""
        caller = inspect.currentframe().f_back
        offsets, unpacks = _instructions(caller.f_code)
        at = bisect.bisect_left(offsets, caller.f_lasti)
        count = unpacks[at] if at < len(unpacks) else None
        if count is not None:
            return (self[i] for i in range(count))
        return self.tracer.iter(self)


class _InplaceProxy(_Behaviour, fx.Proxy):
    """A traced value."""


class _Attribute(_Behaviour, fx.proxy.Attribute):
    """An attribute of a traced value (a node only once used as a value: ``x.size(1)`` is one method call)."""


@functools.lru_cache(maxsize=4096)
def _instructions(code: CodeType) -> tuple[list[int], list[int | None]]:
    """The offsets of ``code``'s instructions and, for each, its item count if it is an UNPACK_SEQUENCE."""
    insts = list(dis.get_instructions(code))
    return [i.offset for i in insts], [i.argval if i.opname == "UNPACK_SEQUENCE" else None for i in insts]


class _Stack(collections.OrderedDict):
    """fx's module stack, copied for each node's ``nn_module_stack`` by ``copy.copy``: this one copies in C
    (an OrderedDict's generic copy goes through ``__reduce_ex__``, a tenth of the cost of tracing a node)."""

    def __copy__(self) -> collections.OrderedDict:
        return collections.OrderedDict(self)


_PLAIN = {int, float, bool, str, type(None), type(...), torch.dtype, torch.device, torch.memory_format,
          torch.layout}  # the plain values a graph argument holds as they are


class ReparamTracer(fx.Tracer):
    """Keeps conv/BN/pool/pad modules (and their plain subclasses) as leaves, and any submodule whose
    forward cannot be traced.

    A BN subclass that overrides ``forward`` (a "BatchNormAct" layer) is traced through so its
    ``F.batch_norm`` call and its activation appear as separate nodes; its input-rank check, which
    would branch on a traced value, is skipped while tracing.  A submodule whose forward fails to trace
    (control flow on a tensor, run-time padding from ``x.shape``...) becomes a leaf: the nodes traced so far
    inside it are dropped, it is called as a whole, and :attr:`opaque` records why by module path, so one
    untraceable layer no longer keeps the rest of the model from being traced.

    An eval-mode no-op (a plain ``nn.Identity`` or dropout module) is not recorded at all: its call gives back
    its input, as the module itself does, and :attr:`elided` lists it for the report.  Those calls are a fifth
    of the nodes of a timm model (every norm-act layer has two), and each node costs every pass below.
    """

    _LEAVES = (*_CONVS, *_CONV_TRANSPOSES, *_POOLS, *_PADS, nn.Linear)

    def __init__(self) -> None:
        math_ids = session_math_ids()  # in a session, math is patched already: nothing to scan for each trace
        super().__init__(autowrap_modules=(math,) if math_ids is None else ())
        if math_ids is not None:
            self._autowrap_function_ids = math_ids
        self.module_stack = _Stack()  # fx copies it into every node's meta
        self.opaque: dict[str, str] = {}  # module path -> why its forward could not be traced
        self.elided: list[tuple[str, str]] = []  # (module path, class name) of each no-op call left out
        self.saved: State = {}  # the modules' plain state before tracing (forward code may cache proxies in it)
        self._paths: dict[int, str] | None = None  # id of each parameter and buffer -> its path
        self.named: list[tuple[str, nn.Module]] = []  # the root's named_modules(), walked once
        self.calls: list[Call] = []  # each submodule call traced through that could be called whole again

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceProxy(node, self)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self.proxy_cache: dict = {}  # fx's parameter proxy cache, for a session's module wrappers
        if isinstance(root, nn.Module) and not self.named:
            self.named = list(root.named_modules())
        with tracing(self):
            return super().trace(root, concrete_args)

    def _path_of(self, t: torch.Tensor) -> str | None:
        if self._paths is None:  # as named_buffers() then named_parameters(), from the one module walk
            buffers: dict[int, str] = {}
            params: dict[int, str] = {}
            for path, m in self.named or self.root.named_modules():
                for table, own in ((buffers, m._buffers), (params, m._parameters)):
                    for k, v in own.items():
                        if v is not None:
                            table.setdefault(id(v), f"{path}.{k}" if path else k)
            self._paths = buffers | params  # parameters win, as in fx, where both could match
        return self._paths.get(id(t))

    def create_arg(self, a):
        """A stored tensor passed as an argument becomes a ``get_attr``, found in the same table.  Proxies,
        plain numbers, strings and their tuples and lists take a short path: fx's general one looks each
        argument's type up among registered opaque types, which costs more than tracing the node."""
        kind = type(a)
        if kind in _PLAIN:
            return a
        if isinstance(a, fx.Proxy):
            return a.node
        if kind in (tuple, list):
            return kind([self.create_arg(x) for x in a])
        if kind is slice:
            return slice(self.create_arg(a.start), self.create_arg(a.stop), self.create_arg(a.step))
        if isinstance(a, torch.Tensor):
            name = self._path_of(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        """fx's, with the arguments set after the node is made: ``Graph.create_node`` walks them (a pytree
        traversal, a tenth of the cost of a traced node) for symbolic ints, which a symbolic trace never has."""
        node = super().create_node(kind, target, (), {}, name, type_expr)
        if args:
            node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        """fx's lookup of a parameter or buffer read in a traced forward, by identity in a table made once:
        fx searches ``named_parameters()`` on every read, quadratic in the size of a model whose BN layers
        are traced through."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self._path_of(attr_val)
        if name is None or (not isinstance(attr_val, nn.Parameter) and not self.proxy_buffer_attributes):
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def iter(self, obj: fx.Proxy) -> Iterator:
        """fx refuses to iterate a traced value; a split whose number of pieces follows from the graph
        (``list(conv_bn(x).chunk(2, 1))`` in YOLO's C2f blocks) gives that many pieces, so such a block is
        traced whole instead of failing and being fused child by child."""
        count = _piece_count(obj.node, self.root)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque:
            return True
        if m.training:  # stays in training mode after eval(): keep it whole, with its own train()
            return True
        if isinstance(m, _BNS):
            return plain_forward(m)
        if isinstance(m, self._LEAVES) and plain_forward(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if is_no_op(m) and len(args) == 1 and not kwargs and isinstance(args[0], fx.Proxy):
            self.elided.append((qualname, type(m).__name__))
            return args[0]
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # the graph's last node: what the attempt adds comes after it
        stack = list(self.module_stack.items())  # O(depth); num_calls only numbers repeated calls: left as is
        calls = len(self.calls)
        as_saved = _state_unchanged(m, self.saved)  # (nothing the caller set: it can be called whole)
        try:
            with _no_input_check(m) if isinstance(m, _BNS) else contextlib.nullcontext():
                out = super().call_module(m, forward, args, kwargs)
        except Exception as err:  # fx raises many types for untraceable code
            restore(self.saved, m)  # what the attempt cached refers to nodes about to be erased
            while self.graph._root.prev is not last:
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack.clear()
            self.module_stack.update(stack)
            del self.calls[calls:]
            self.opaque[qualname] = brief(err)
            return super().call_module(m, forward, args, kwargs)
        call = _record(qualname, args, kwargs, out, last, self.graph) if as_saved else None
        if call is not None:
            self.calls.append(call)
        return out


def _piece_count(node: fx.Node, root: nn.Module) -> int | None:
    """How many tensors ``node`` (a ``split``/``chunk``/``unbind``) gives, when the graph decides it: a list of
    sizes, or a split along dim 1 of a value whose channel count a BN fixes (a BN also fixes that dim 1 is
    its channels).  None otherwise."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and node.target in (torch.split, torch.chunk, torch.unbind):
        name = node.target.__name__
    else:
        return None
    if name not in ("split", "chunk", "unbind") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    dim = _arg(node, 1 if name == "unbind" else 2, "dim", 0)
    if name == "unbind":
        size = None
    else:
        size = _arg(node, 1, "chunks") if name == "chunk" else \
            _arg(node, 1, "split_size", node.kwargs.get("split_size_or_sections"))
        if name == "split" and isinstance(size, (list, tuple)) and all(type(k) is int for k in size):
            return len(size)
        if type(size) is not int or size < 1:
            return None
    channels = _bn_channels(node.args[0], root) if dim == 1 else None
    if not channels:
        return None
    if name == "unbind":
        return channels
    per = -(-channels // size) if name == "chunk" else size  # a chunk's size, rounded up as torch does
    return -(-channels // per)


_CHANNEL_KEEPING = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout)


def _bn_channels(node: fx.Node, root: nn.Module) -> int | None:
    """The channel count of ``node`` when it is a BN's output, possibly through activations."""
    for _ in range(8):
        if node.op == "call_module":
            m = _stored(root, node.target)
            if isinstance(m, _BNS):
                return m.num_features
            if not isinstance(m, _CHANNEL_KEEPING) or len(node.args) != 1:
                return None
        elif node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
            stats = node.args[1] if len(node.args) > 1 else node.kwargs.get("running_mean")
            t = _stored(root, stats.target) if isinstance(stats, fx.Node) and stats.op == "get_attr" else None
            return t.numel() if isinstance(t, torch.Tensor) and t.ndim == 1 else None
        else:
            return None
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
    return None


def _stored(root: nn.Module, target: str) -> object:
    """The module or tensor at ``target``, read from the modules' own tables (while tracing, reading an
    attribute records a node)."""
    obj: object = root
    for part in target.split("."):
        own = vars(obj)
        for table in ("_modules", "_parameters", "_buffers"):
            if part in own.get(table, ()):
                obj = own[table][part]
                break
        else:
            return None
    return obj


State = dict[int, tuple[nn.Module, dict, dict]]
_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
              "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"}


def snapshot(root: nn.Module, modules: list[nn.Module] | None = None) -> State:
    """Every module's plain attributes, with a copy of each dict, list or set among them (``modules``:
    ``root.modules()``, if already listed)."""
    out: State = {}
    for m in root.modules() if modules is None else modules:
        attrs = {k: v for k, v in vars(m).items() if k not in _INTERNALS}
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in (dict, list, set)}
        out[id(m)] = (m, attrs, contents)
    return out


def restore(saved: State, root: nn.Module, modules: list[nn.Module] | None = None) -> None:
    """Put back the plain attributes of ``root``'s modules as ``saved`` holds them: tracing runs forward code
    that may store proxies in them (a cache dict filled on first call) or add attributes."""
    for m in root.modules() if modules is None else modules:
        entry = saved.get(id(m))
        if entry is None:
            continue
        _, attrs, contents = entry
        for k in [k for k in vars(m) if k not in _INTERNALS and k not in attrs]:
            del m.__dict__[k]
        for k, v in attrs.items():
            m.__dict__[k] = v
            if k in contents:
                if isinstance(v, dict):
                    v.clear()
                    v.update(contents[k])
                elif isinstance(v, list):
                    v[:] = contents[k]
                else:
                    v.clear()
                    v.update(contents[k])


class _NotWhole(Exception):
    """A call's arguments or result cannot be written as graph arguments."""


def _as_nodes(value: Any) -> Any:
    """``value`` (call arguments or a forward's result) with each traced value as its node; raises
    :class:`_NotWhole` for anything a graph argument cannot hold."""
    if isinstance(value, fx.proxy.Attribute) and vars(value).get("_node") is None:
        raise _NotWhole("attribute")  # (its node, made on first use, would be made now, after the call's)
    if isinstance(value, fx.Proxy):
        return value.node
    if type(value) in _PLAIN:
        return value
    if type(value) in (tuple, list):
        return type(value)(_as_nodes(v) for v in value)
    if type(value) is dict and all(type(k) is str for k in value):
        return {k: _as_nodes(v) for k, v in value.items()}
    raise _NotWhole(type(value).__name__)


def _record(path: str, args: tuple, kwargs: dict, out: Any, before: fx.Node, graph: fx.Graph) -> Call | None:
    """The call of ``path`` whose nodes follow ``before`` in ``graph``; None when it made no node or cannot
    be called whole (arguments or result that are not traced values and plain constants)."""
    last = graph._root.prev
    if last is before:
        return None
    try:
        args, kwargs, out = _as_nodes(args), _as_nodes(kwargs), _as_nodes(out)
    except _NotWhole:
        return None
    if not (isinstance(out, fx.Node) or (type(out) in (tuple, list) and all(
            isinstance(v, fx.Node) or type(v) in _PLAIN for v in out))):
        return None
    return Call(path, args, kwargs, out, before.next, last)


def _state_unchanged(m: nn.Module, saved: State) -> bool:
    """``m``'s plain attributes are those it had before tracing (the caller's code set none of them: the
    module called whole in the result reads them as they are)."""
    entry = saved.get(id(m))
    if entry is None:
        return False
    attrs = entry[1]
    seen = 0
    for k, v in vars(m).items():
        if k in _INTERNALS:
            continue
        if k not in attrs or attrs[k] is not v:
            return False
        seen += 1
    return seen == len(attrs)


def brief(err: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters: an error quoted in a report."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


@contextlib.contextmanager
def _no_input_check(m: nn.Module) -> Iterator[None]:
    m._check_input_dim = lambda _x: None
    try:
        yield
    finally:
        del m._check_input_dim


def trace(module: nn.Module) -> Workspace:
    """Trace ``module`` (already in the mode to fuse in); raises whatever fx raises when its own forward
    cannot be traced.  Submodules that cannot be traced are leaves, listed in the workspace's ``opaque``."""
    if isinstance(module, fx.GraphModule):  # already a graph (symbolic_trace, an exported program's module())
        graph = fx.Graph()
        graph._codegen = module.graph._codegen  # an exported module's pytree in/out handling (read only)
        graph.output(graph.graph_copy(module.graph, {}))
        return Workspace(module, graph, type(module).__name__)
    tracer = ReparamTracer()
    before = set(vars(module))
    tracer.named = list(module.named_modules())
    modules = [m for _, m in tracer.named]
    tracer.saved = snapshot(module, modules)
    try:
        graph = tracer.trace(module)
    finally:
        # fx stores tensors the code reads from outside the module (globals) on the module itself as
        # ``_tensor_constant<i>``: take them back off the model, the workspace holds them
        added = {k: vars(module).pop(k) for k in set(vars(module)) - before}
        restore(tracer.saved, module, modules)
    name = module.__class__.__name__ if isinstance(module, nn.Module) else "Module"
    ws = Workspace(tracer.root, graph, name)
    ws.opaque = tracer.opaque
    ws.elided = tracer.elided
    ws.calls = Calls.of(graph, tracer.calls)
    for k, v in added.items():
        ws.add_submodule(k, v)
    return ws


@contextlib.contextmanager
def eval_mode(module: nn.Module, keep: bool) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's flag afterwards unless ``keep``."""
    if is_exported_module(module):  # an exported graph has no mode (and refuses eval()): nothing to do
        yield
        return
    flags = {m: m.training for m in module.modules()}
    # eval() is called when some module is in training mode or has its own train(), which may do more
    called = any(flags.values()) or any(type(m).train is not nn.Module.train for m in flags)
    if called:
        module.eval()
    try:
        yield
    finally:
        if not keep and called:
            for m, flag in flags.items():
                if m.training != flag:
                    m.training = flag


@contextlib.contextmanager
def frozen_training_state(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without leaving a trace: buffers of submodules still in training mode (BN running
    statistics) are restored afterwards."""
    saved = [(b, b.detach().clone()) for m in module.modules() if m.training for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, old in saved:
                b.copy_(old)


def safe_deepcopy(obj, memo: dict | None = None):
    """``copy.deepcopy`` that also copies modules holding computed (non-leaf) tensors, such as old-style
    ``weight_norm``'s ``weight``: those are detached copies, recomputed by their hooks on the next call.
    Objects already in ``memo`` (by id) are used as they are.  A standard torch.nn layer without children or
    hooks is copied directly (its attribute dict, its tensors through ``copy.deepcopy``): the same copy, in
    a third of the time of deepcopy's generic reconstruction."""
    memo = {} if memo is None else memo
    modules = obj.values() if isinstance(obj, dict) else [obj]
    for root in modules:
        if not isinstance(root, nn.Module):
            continue
        for m in _to_copy(root, memo):
            for v in vars(m).values():
                if isinstance(v, torch.Tensor) and not v.is_leaf:
                    memo[id(v)] = v.detach().clone()
            if not m._modules:
                _copy_layer(m, memo)
    return copy.deepcopy(obj, memo)


def _to_copy(root: nn.Module, memo: dict) -> list[nn.Module]:
    """The modules of ``root`` a deepcopy through ``memo`` reaches: not those under one already in it (a
    replaced child), each once."""
    seen: set[int] = set()
    out, stack = [], [root]
    while stack:
        m = stack.pop()
        if id(m) in memo or id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


_IMMUTABLE = _PLAIN | {torch.Size}


def setting_kind(v: Any) -> str | None:
    """What a module's plain attribute is: ``"value"`` (an immutable number, string, dtype... or a tuple of
    them), ``"empty"`` (an empty dict, set or list, such as an unused hook table), ``"names"`` (a set of
    strings, such as the non-persistent buffer names), None for anything else (an object whose state could
    change what the module does)."""
    kind = type(v)
    if kind in _IMMUTABLE or (kind is tuple and all(type(x) in _IMMUTABLE for x in v)):
        return "value"
    if kind in (dict, collections.OrderedDict, set, list) and not v:
        return "empty"
    if kind is set and all(type(x) is str for x in v):
        return "names"
    return None


def _copy_layer(m: nn.Module, memo: dict) -> None:
    """Put a copy of ``m`` in ``memo`` when it is a standard layer holding only numbers, strings, empty hook
    dicts, parameters and buffers (anything else is left to ``copy.deepcopy``)."""
    cls = type(m)
    if not cls.__module__.startswith("torch.nn.modules.") or "__deepcopy__" in vars(cls):
        return
    state = {}
    for k, v in m.__dict__.items():
        if k == "_parameters" or k == "_buffers":
            state[k] = {n: None if t is None else copy.deepcopy(t, memo) for n, t in v.items()}
            continue
        kind = setting_kind(v)
        if kind is None:
            return
        state[k] = v if kind == "value" else type(v)(v)
    new = object.__new__(cls)
    object.__setattr__(new, "__dict__", state)
    memo[id(m)] = new


