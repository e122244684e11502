"""The torch.fx frontend: trace, translate to the core graph, collapse, rewrite."""

from .api import fuse, verify
from .report import FuseReport, RegionReport

__all__ = ["FuseReport", "RegionReport", "fuse", "verify"]
