"""The torch.fx frontend: trace, translate to the core graph, collapse, rewrite."""

from .._extras import require

require("torch", feature="reparam.fx (reparam.fuse, reparam.verify)")

from .api import REPORT_ATTRIBUTE, fuse, verify
from .report import FuseReport, RegionReport

__all__ = ["REPORT_ATTRIBUTE", "FuseReport", "RegionReport", "fuse", "verify"]
