"""What untraced code around a fused module can see of it.

When a model's own forward cannot be traced, its Python code keeps running around the children fusion
replaces.  That code reads plain attributes of a child (YOLO's ``m.f``, ``m.i``), tests its class
(``isinstance(m, Detect)``), or reaches inside it (iterates ``self.model``, indexes ``self.layers[0]``).  A
replacement keeps the first two (:func:`keep_face`); a child that is reached into is fused inside instead of
replaced (:func:`reads_inside`, read from the parent's source).
"""

from __future__ import annotations

import copy
import functools
import inspect
import re

import torch
from torch import fx, nn


@functools.lru_cache(maxsize=256)
def _class_source(cls: type) -> str | None:
    """The source of the methods of ``cls`` and its bases below nn.Module, construction aside (None when some
    of it is not available)."""
    parts = []
    for c in cls.__mro__:
        if c in (nn.Module, object) or c.__module__.startswith("torch.nn"):
            continue
        for key, fn in vars(c).items():
            fn = getattr(fn, "__func__", fn)
            if key in ("__init__", "__setstate__") or not inspect.isfunction(fn):
                continue
            try:
                parts.append(inspect.getsource(fn))
            except (OSError, TypeError):
                return None
    return "\n".join(parts)


_MODULE_API = set(dir(nn.Module))


def reads_inside(parent: nn.Module, name: str, child: nn.Module) -> bool:
    """Whether the code of ``parent`` (its class and bases) may reach into its child ``name``: anything but
    calling it or reading a plain attribute of it (``self.name(x)``, ``self.name.f``), which a replacement
    keeps.  Containers of torch.nn (Sequential...) are their elements' parents: their code only iterates."""
    cls = type(parent)
    if cls.__module__.startswith("torch.nn"):
        return False
    source = _class_source(cls)
    if source is None:
        return True
    inner = {n for n, _ in child.named_children()} | {n for n, _ in child.named_parameters(recurse=False)} \
        | {n for n, _ in child.named_buffers(recurse=False)}
    own = {k for c in type(child).__mro__ if c not in (nn.Module, object) for k in vars(c)} - _MODULE_API
    for match in re.finditer(rf"self\.{re.escape(name)}\b(\s*\(|\.(\w+))?", source):
        call, attr = match.group(1), match.group(2)
        if call is not None and attr is None:
            continue  # self.name(...)
        if attr is not None and attr not in inner and attr not in own and attr not in _MODULE_API:
            continue  # a plain attribute
        return True
    return False


_MODULE_STATE = {"training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_backward_pre_hooks",
                 "_backward_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks", "_modules", "_compiled_call_impl"}


def carry_attributes(original: nn.Module, gm: nn.Module, memo: dict | None = None) -> None:
    """Give ``gm`` the plain attributes of the module it replaces (``m.f``, ``m.stride``, ``num_classes``...),
    which surrounding code may read; modules, parameters and buffers are the graph's own business.  With a
    deepcopy ``memo``, ``gm`` gets copies (the original belongs to the caller's model)."""
    for key, value in vars(original).items():
        if key in _MODULE_STATE or key in vars(gm) or isinstance(value, (nn.Module, torch.Tensor)) or callable(value):
            continue  # (a bound method on the instance, as an exported module's eval(), is its own business)
        if memo is not None:
            value = copy.deepcopy(value, memo)
        try:
            object.__setattr__(gm, key, value)
        except (AttributeError, TypeError):  # a read-only property of GraphModule
            continue


def _overrides_module(cls: type) -> bool:
    """``cls`` (or a base below nn.Module) redefines an nn.Module method other than ``__init__``/``forward``:
    mixing it into a GraphModule would run that method on a module tree it does not know."""
    allowed = {"__init__", "forward", "extra_repr", "__doc__", "__module__", "__qualname__", "__dict__",
               "__weakref__", "__annotations__", "__firstlineno__", "__static_attributes__", "__parameters__",
               "__orig_bases__"}
    if issubclass(cls, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or hasattr(cls, "__getitem__"):
        return True  # indexing would reach the graph's modules, not the ones the code means: fail loudly instead
    module_names = set(dir(nn.Module)) | set(dir(fx.GraphModule))
    for c in cls.__mro__:
        if c in (nn.Module, object) or issubclass(fx.GraphModule, c):
            continue
        if (set(vars(c)) - allowed) & module_names:
            return True
    return False


def keep_face(original: nn.Module, gm: fx.GraphModule, memo: dict | None = None) -> nn.Module:
    """``gm`` as seen by the untraced code around it: the original's plain attributes (copied through
    ``memo`` when there is one), and, when that is safe, its class too (``isinstance(m, Detect)`` in a
    parent's forward keeps working)."""
    carry_attributes(original, gm, memo)
    cls = type(original)
    if not _overrides_module(cls):
        try:
            gm.__class__ = type(cls.__name__, (type(gm), cls), {"__module__": cls.__module__})
        except TypeError:  # an incompatible layout (slots, a metaclass): attributes only
            pass
    return gm


__all__ = ["carry_attributes", "keep_face", "reads_inside"]
