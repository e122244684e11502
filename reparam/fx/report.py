"""What ``reparam.fuse`` did: regions collapsed, ops removed, what still runs and why, and op counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.report import COUNTED, Leftover, describe_counts, describe_leftovers, grouped


def is_bn_label(op: str) -> bool:
    """A leftover's op label names a batch norm (``BatchNorm2d``, ``SyncBatchNorm``, ``batch_norm``...)."""
    return "batchnorm" in op.lower().replace("_", "")


@dataclass
class RegionReport:
    """One collapsed region: where it was, which ops it held, and conv counts before and after."""

    where: str
    ops: list[str]
    convs_before: int
    convs_after: int


@dataclass
class FuseReport:
    """The report of one :func:`reparam.fuse` call, attached to the result as ``reparam_report``.

    - ``regions``: linear regions collapsed (each into one conv per source), and other folds applied.
    - ``removed``: eval-mode no-ops dropped (``nn.Identity``, dropout): ``(where, op)``.
    - ``leftovers``: every fusion candidate that still runs (each batch norm, per-channel constant or
      branch sum not folded), with its reason and reason kind (:data:`reparam.core.report.KINDS`).
    - ``skipped``: modules called whole because fx cannot trace their forward: ``(path, why)``.
    - ``undone``: folds taken back because the checked result failed or differed: ``(where, why)``.
    - ``counts_before`` / ``counts_after``: conv, batch_norm, add and linear counts, executed on the example
      inputs when they were given (``counted_on == "example inputs"``), else counted in the traced graph.
    - ``check``: ``{"max_abs": .., "max_rel": ..}`` of the result against the input model on the example
      inputs, or None when no inputs were given (the result was then not run).
    """

    regions: list[RegionReport] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    undone: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts_before: Counter = field(default_factory=Counter)
    counts_after: Counter = field(default_factory=Counter)
    counted_on: str = "traced graph"
    check: dict[str, float] | None = None
    params_before: int = 0
    params_after: int = 0

    @property
    def refused(self) -> list[tuple[str, str]]:
        """``(where, reason)`` of every leftover."""
        return [(x.where, x.reason) for x in self.leftovers]

    @property
    def bn_left(self) -> list[Leftover]:
        """The leftovers that are batch norms (modules, or ``batch_norm`` calls of traced BN layers)."""
        return [x for x in self.leftovers if is_bn_label(x.op)]

    @property
    def convs_before(self) -> int:
        """Convs inside the collapsed regions before fusion."""
        return sum(r.convs_before for r in self.regions)

    @property
    def convs_after(self) -> int:
        return sum(r.convs_after for r in self.regions)

    def by_kind(self) -> dict[str, list[Leftover]]:
        """Leftovers grouped by reason kind, the largest group first."""
        return grouped(self.leftovers)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, strings, numbers) for tools and JSON."""
        return {
            "regions": [asdict(r) for r in self.regions],
            "removed": [list(r) for r in self.removed],
            "leftovers": [x.to_dict() for x in self.leftovers],
            "skipped": [list(s) for s in self.skipped],
            "undone": [list(u) for u in self.undone],
            "notes": list(self.notes),
            "counts_before": dict(self.counts_before),
            "counts_after": dict(self.counts_after),
            "counted_on": self.counted_on,
            "check": self.check,
            "params_before": self.params_before,
            "params_after": self.params_after,
        }

    def summary(self) -> str:
        """The first line of ``str(report)``."""
        if self.regions:
            head = f"reparam.fuse: {len(self.regions)} region{'s' * (len(self.regions) != 1)} collapsed"
        else:
            head = "reparam.fuse: nothing fused"
        parts = [head, f"{describe_counts(self.counts_before, self.counts_after, COUNTED)} ({self.counted_on})",
                 f"{len(self.leftovers)} left"]
        if self.removed:
            parts.append(f"{len(self.removed)} no-ops removed")
        if self.skipped:
            parts.append(f"{len(self.skipped)} modules not traced")
        if self.undone:
            parts.append(f"{len(self.undone)} undone")
        parts.append(f"params {self.params_before:,} -> {self.params_after:,}")
        if self.check is not None:
            parts.append(f"checked: max rel diff {self.check['max_rel']:.2g}")
        return "; ".join(parts)

    def describe(self, *, examples: int = 3, regions: bool = False) -> str:
        """The summary, leftovers grouped by reason (``examples`` per group, 0 for all), modules not traced,
        folds undone and, with ``regions``, every collapsed region."""
        lines = [self.summary()]
        lines += describe_leftovers(self.leftovers, examples=examples)
        for where, why in self.skipped:
            lines.append(f"  not traced {where}: {why}")
        for where, why in self.undone:
            lines.append(f"  undone {where}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        if regions:
            for r in self.regions:
                lines.append(f"  fused {r.where}: {' + '.join(r.ops)} ({r.convs_before} convs -> {r.convs_after})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()
