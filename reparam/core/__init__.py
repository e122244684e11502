"""reparam.core: the weight algebra of structural re-parameterization, in numpy only.

Value types (:mod:`.types`), the rules (:mod:`.rules`, float64 inside, cast back outside) and the region
collapse (:mod:`.regions`) that frontends call; the kernels a plan holds are deferred (:mod:`.kernel_sum`)
until a frontend asks for them in its dtype.  Importing this package never imports torch or onnx.
"""

from .errors import NotFusable, ReparamError
from .kernel_sum import KernelSum
from .regions import (
    LinearGraph,
    Node,
    Plan,
    Refusal,
    Region,
    Term,
    chain,
    collapse,
    macs_per_output,
    plan,
    sum_branches,
)
from .rules import (
    affine_to_conv,
    avgpool_to_conv,
    compose,
    fold_bn,
    fold_bn_input,
    fold_bn_transpose,
    identity_conv,
    pad_kernel,
    pad_to_conv,
    regroup,
    sum_convs,
)
from .types import PADDING_MODES, Add, Affine, AvgPool, BatchNorm, Conv, ConvTranspose, Identity, LinearOp, Pad

__all__ = [
    "PADDING_MODES", "Add", "Affine", "AvgPool", "BatchNorm", "Conv", "ConvTranspose", "Identity",
    "KernelSum", "LinearGraph", "LinearOp", "Node", "NotFusable", "Pad", "Plan", "Refusal", "Region", "ReparamError",
    "Term", "affine_to_conv", "avgpool_to_conv", "chain", "collapse", "compose", "fold_bn",
    "fold_bn_input", "fold_bn_transpose", "identity_conv", "macs_per_output", "pad_kernel", "pad_to_conv", "plan",
    "regroup", "sum_branches", "sum_convs",
]
