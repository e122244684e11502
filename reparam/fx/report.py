"""What ``reparam.fuse`` did: regions collapsed, candidates refused, parts it could not trace."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RegionReport:
    """One collapsed region: where it was, which ops it held, and conv counts before and after."""

    where: str
    ops: list[str]
    convs_before: int
    convs_after: int


@dataclass
class FuseReport:
    """The report attached to a fused module as ``reparam_report`` (and returned with ``report=True``)."""

    regions: list[RegionReport] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def convs_before(self) -> int:
        return sum(r.convs_before for r in self.regions)

    @property
    def convs_after(self) -> int:
        return sum(r.convs_after for r in self.regions)

    def __str__(self) -> str:
        lines = [f"reparam.fuse: {len(self.regions)} regions collapsed, {len(self.refused)} refused, "
                 f"{len(self.skipped)} parts not traced; params {self.params_before:,} -> {self.params_after:,}"]
        for r in self.regions:
            lines.append(f"  fused   {r.where}: {' + '.join(r.ops)} ({r.convs_before} convs -> {r.convs_after})")
        for where, why in self.refused:
            lines.append(f"  refused {where}: {why}")
        for where, why in self.skipped:
            lines.append(f"  skipped {where}: {why}")
        return "\n".join(lines)
