"""Count MACs and parameters of any ``nn.Module`` with forward hooks.

Convention (the one the RepGhostNet numbers are quoted in):

* ``ConvNd`` / ``ConvTransposeNd``: ``out_elems * (in_channels / groups * prod(kernel) + has_bias)``;
* ``Linear``: ``in_features * out_elems``;
* everything else (BatchNorm, activations, pooling, the SE multiply, adds, concatenations) counts zero;
* parameters: every parameter of the model, BatchNorm affine included (each shared tensor once).

Only module calls are seen: convolutions done with ``torch.nn.functional`` directly are not counted.  A module
called several times is counted at every call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["MacCount", "count_macs", "count_params", "format_count", "profile", "profile_table"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class MacCount(NamedTuple):
    """MACs of one forward pass, split into the weights' share and the conv biases' (one per output element)."""

    weights: int
    biases: int

    @property
    def total(self) -> int:
        return self.weights + self.biases


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(
    model: nn.Module,
    input_size: Sequence[int] = (1, 3, 224, 224),
    inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> MacCount:
    """MACs of one forward pass in eval mode, weights and conv biases apart (see :func:`profile`).

    The split says why folding raises the count: a folded BN's shift becomes a conv bias, which the
    convention charges one MAC per output element, while the BN itself counts zero.
    """
    weights = biases = 0

    def hook(module: nn.Module, _inp: object, output: object) -> None:
        nonlocal weights, biases
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, _CONV_TYPES):
            weights += output.numel() * (module.in_channels // module.groups * math.prod(module.kernel_size))
            biases += output.numel() * (module.bias is not None)
        elif isinstance(module, nn.Linear):
            weights += module.in_features * output.numel()

    if inputs is None:
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        args: tuple[torch.Tensor, ...] = (torch.zeros(tuple(input_size), dtype=dtype, device=device),)
    elif isinstance(inputs, torch.Tensor):
        args = (inputs,)
    else:
        args = tuple(inputs)

    counted = (*_CONV_TYPES, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    was_training = model.training
    try:
        model.eval()
        model(*args)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return MacCount(weights, biases)


def profile(
    model: nn.Module,
    input_size: Sequence[int] = (1, 3, 224, 224),
    inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> tuple[int, int]:
    """Return ``(macs, params)`` of one forward pass in eval mode.

    ``inputs`` (a tensor or a tuple of positional tensors) overrides the zero tensor of shape ``input_size``
    created on the device and floating dtype of the model's first parameter.  The model's training flag is
    restored afterwards.
    """
    return count_macs(model, input_size, inputs).total, count_params(model)


def format_count(n: int | float, unit: str = "M") -> str:
    """``142400000 -> '142.40M'`` (units ``K``, ``M``, ``G``)."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}[unit]
    return f"{n / scale:.2f}{unit}"


def profile_table(
    names: Iterable[str],
    input_size: Sequence[int] = (1, 3, 224, 224),
    **model_kwargs: object,
) -> str:
    """Build each named model (``reparam_zoo.create_model``); return a text table of params and MACs."""
    from .registry import create_model

    rows = []
    for name in names:
        model = create_model(name, **model_kwargs)
        macs, params = profile(model, input_size)
        rows.append((name, f"{params:,}", format_count(macs)))
    header = ("model", "params", "MACs")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        f"{header[0]:<{widths[0]}}  {header[1]:>{widths[1]}}  {header[2]:>{widths[2]}}",
        "  ".join("-" * w for w in widths),
    ]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    return "\n".join(lines)
