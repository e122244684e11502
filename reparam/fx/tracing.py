"""Symbolic tracing for fusion: standard layers stay leaves, BN subclasses are traced through."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import fx, nn

from ..torch_ops import _BNS, _CONV_TRANSPOSES, _CONVS, _PADS, _POOLS


class ReparamTracer(fx.Tracer):
    """Keeps conv/BN/pool/pad modules (and their plain subclasses) as leaves.

    A BN subclass that overrides ``forward`` (a "BatchNormAct" layer) is traced through so its
    ``F.batch_norm`` call and its activation appear as separate nodes; its input-rank check, which
    would branch on a traced value, is skipped while tracing.
    """

    _LEAVES = (*_CONVS, *_CONV_TRANSPOSES, *_POOLS, *_PADS, nn.Linear)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _BNS):
            return _plain_forward(m)
        if isinstance(m, self._LEAVES) and _plain_forward(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if isinstance(m, _BNS) and not self.is_leaf_module(m, ""):
            with _no_input_check(m):
                return super().call_module(m, forward, args, kwargs)
        return super().call_module(m, forward, args, kwargs)


def _plain_forward(m: nn.Module) -> bool:
    cls = type(m)
    std = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn"))
    return cls.forward is std.forward


@contextlib.contextmanager
def _no_input_check(m: nn.Module) -> Iterator[None]:
    m._check_input_dim = lambda _x: None
    try:
        yield
    finally:
        del m._check_input_dim


def trace(module: nn.Module) -> fx.GraphModule:
    """Trace ``module`` (already in the mode to fuse in); raises whatever fx raises when it cannot."""
    tracer = ReparamTracer()
    graph = tracer.trace(module)
    name = module.__class__.__name__ if isinstance(module, nn.Module) else "Module"
    return fx.GraphModule(tracer.root, graph, name)


@contextlib.contextmanager
def eval_mode(module: nn.Module, keep: bool) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's flag afterwards unless ``keep``."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        if not keep:
            for m, flag in flags.items():
                m.training = flag


def still_training(module: nn.Module) -> bool:
    """A module that stays in training mode after ``eval()`` (it overrides ``train``)."""
    return bool(module.training)


