"""Test support: an independent numpy reference of every linear op, and Hypothesis strategies.

:mod:`reparam.testing.reference` needs only numpy; :mod:`reparam.testing.strategies` needs Hypothesis
(the ``test`` extra), so it is imported on first use rather than here.  The same goes for the torch-side
helpers (:mod:`reparam.testing.torch_checks`: ``assert_equivalent``, ``count_executed_ops``,
``randomize_bn_``) and the PyTorch block/network strategies (:mod:`reparam.testing.architectures`:
``rep_blocks``, ``architectures``, ``tensors``), which need torch (and Hypothesis): importing
``reparam.testing`` imports neither.
"""

from __future__ import annotations

from .reference import (
    affine,
    avg_pool,
    batch_norm,
    conv_nd,
    conv_transpose_nd,
    pad,
    pad_nd,
    run_conv,
    run_op,
)

# name -> submodule that defines it, imported on first access (torch / Hypothesis are optional)
_LAZY = {
    "assert_equivalent": "torch_checks",
    "assert_outputs_close": "torch_checks",
    "count_executed_ops": "torch_checks",
    "eval_no_grad": "torch_checks",
    "randomize_bn_": "torch_checks",
    "BRANCH_KINDS": "architectures",
    "JOINS": "architectures",
    "RepBlock": "architectures",
    "RepNet": "architectures",
    "rep_blocks": "architectures",
    "tensors": "architectures",
}

__all__ = [
    "BRANCH_KINDS",
    "JOINS",
    "RepBlock",
    "RepNet",
    "affine",
    "architectures",
    "assert_equivalent",
    "assert_outputs_close",
    "avg_pool",
    "batch_norm",
    "conv_nd",
    "conv_transpose_nd",
    "count_executed_ops",
    "eval_no_grad",
    "pad",
    "pad_nd",
    "randomize_bn_",
    "reference",
    "rep_blocks",
    "run_conv",
    "run_op",
    "strategies",
    "tensors",
    "torch_checks",
]


def __getattr__(name: str):
    import importlib

    if name in ("strategies", "torch_checks", "architectures"):  # lazy: Hypothesis/torch are optional
        # ``architectures`` is both the submodule and the network strategy: the module is callable
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
