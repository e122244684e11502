"""Report pieces both frontends share: what was left unfused and why, grouped for reading, and op counts.

A :class:`Leftover` is an op that could have been folded (a batch norm, a per-channel constant, a branch
sum) but still runs in the result.  Its ``reason`` is the sentence a user reads; its ``kind`` is a stable
key from :data:`KINDS`, so a report on a large model can say "61 left: 40 after an activation, 21 inside
an untraceable module" and tools can group without parsing sentences.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

#: Reason kinds, with the heading a report prints for each group.
KINDS: dict[str, str] = {
    "no-neighbour": "no conv or linear layer next to it to fold into",
    "padded-conv": "the conv after it pads with zeros, which the shift would not reach",
    "shared": "the value it would fold into is also read elsewhere",
    "costlier": "folding it would run more convs or MACs",
    "not-foldable": "it cannot be folded exactly (batch statistics, hooks, custom forward...)",
    "needs-shapes": "folding depends on a rank or size only example inputs can tell",
    "untraced": "it runs inside a module whose forward cannot be traced",
    "algebra": "the algebra refused the step",
    "undone": "undone after checking the result on the example inputs",
}


@dataclass(frozen=True)
class Leftover:
    """An op that still runs after fusion although it is a fusion candidate, and why.

    ``where`` is the module path (or, for a functional op, the graph node name); ``op`` names the op
    (``BatchNorm2d``, ``batch_norm``, ``mul``...); ``kind`` is a key of :data:`KINDS`.
    """

    where: str
    op: str
    reason: str
    kind: str = "algebra"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown leftover kind {self.kind!r}; expected one of {sorted(KINDS)}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def grouped(leftovers: Iterable[Leftover]) -> dict[str, list[Leftover]]:
    """Leftovers by kind, the largest group first (ties in :data:`KINDS` order)."""
    groups: dict[str, list[Leftover]] = {}
    for item in leftovers:
        groups.setdefault(item.kind, []).append(item)
    order = list(KINDS)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), order.index(kv[0]))))


def describe_leftovers(leftovers: list[Leftover], *, examples: int = 3, indent: str = "  ") -> list[str]:
    """Readable lines: one heading per kind with its count, then up to ``examples`` items each (all when
    ``examples`` is 0 or negative)."""
    lines = []
    for kind, items in grouped(leftovers).items():
        lines.append(f"{indent}{len(items)} left: {KINDS[kind]}")
        shown = items if examples <= 0 else items[:examples]
        for item in shown:
            lines.append(f"{indent}  {item.where} ({item.op}): {item.reason}")
        if len(shown) < len(items):
            lines.append(f"{indent}  ... and {len(items) - len(shown)} more (report.leftovers lists all)")
    return lines


COUNTED = ("conv", "batch_norm", "add")


def describe_counts(before: Mapping[str, int], after: Mapping[str, int], keys: Iterable[str] = COUNTED) -> str:
    """``conv 44 -> 22, batch_norm 61 -> 0, add 22 -> 0``."""
    return ", ".join(f"{k} {before.get(k, 0)} -> {after.get(k, 0)}" for k in keys)


__all__ = ["COUNTED", "KINDS", "Leftover", "describe_counts", "describe_leftovers", "grouped"]
