"""reparam_zoo: RepGhostNet (all widths and the paper's ablations), GhostNet, a MAC/param profiler and a
checkpoint loader for the reference implementation's weights.

>>> import reparam_zoo
>>> model = reparam_zoo.create_model("repghostnet_1_0x")
>>> reparam_zoo.profile(model)  # (MACs, params) at 224x224
(142397872, 4073604)
>>> deploy = reparam_zoo.convert(model)  # BN and re-parameterization branches folded
"""

from __future__ import annotations

from reparam._extras import require

require("torch", feature="reparam_zoo")

from .checkpoint import CheckpointError, LoadResult, extract_state_dict, load_checkpoint
from .conversion import convert, convert_
from .ghostnet import (
    GhostBottleneck,
    GhostModule,
    GhostNet,
    ghostnet,
    ghostnet_0_5x,
    ghostnet_1_0x,
    ghostnet_1_3x,
)
from .layers import SqueezeExcite, hard_sigmoid, make_divisible
from .profiling import MacCount, count_macs, count_params, format_count, profile, profile_table
from .registry import create_model, list_models, register_model
from .repghost import (
    REPARAM_BRANCHES,
    RepGhostBottleneck,
    RepGhostModule,
    RepGhostNet,
    parse_reparam,
    repghostnet,
    repghostnet_0_5x,
    repghostnet_0_8x,
    repghostnet_0_58x,
    repghostnet_1_0x,
    repghostnet_1_3x,
    repghostnet_1_5x,
    repghostnet_1_11x,
    repghostnet_2_0x,
)

__all__ = [
    "REPARAM_BRANCHES",
    "CheckpointError",
    "GhostBottleneck",
    "GhostModule",
    "GhostNet",
    "LoadResult",
    "MacCount",
    "RepGhostBottleneck",
    "RepGhostModule",
    "RepGhostNet",
    "SqueezeExcite",
    "convert",
    "convert_",
    "count_macs",
    "count_params",
    "create_model",
    "extract_state_dict",
    "format_count",
    "ghostnet",
    "ghostnet_0_5x",
    "ghostnet_1_0x",
    "ghostnet_1_3x",
    "hard_sigmoid",
    "list_models",
    "load_checkpoint",
    "make_divisible",
    "parse_reparam",
    "profile",
    "profile_table",
    "register_model",
    "repghostnet",
    "repghostnet_0_5x",
    "repghostnet_0_8x",
    "repghostnet_0_58x",
    "repghostnet_1_0x",
    "repghostnet_1_3x",
    "repghostnet_1_5x",
    "repghostnet_1_11x",
    "repghostnet_2_0x",
]
