"""What :func:`reparam.onnx.fuse` did: regions fused, candidates refused (with reasons), BN mode changes."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

CONV_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class FusedRegion:
    """One linear region replaced by convs: ``exit`` is the value it computes (its name is kept)."""

    exit: str
    ops: tuple[str, ...]  # op types of the removed nodes, in graph order
    nodes: tuple[str, ...]  # their node names
    emitted: tuple[str, ...]  # op types of the nodes written in their place
    sources: tuple[str, ...]  # values the region reads
    fixed_sizes: tuple[str, ...] = ()  # input sizes ("16x16") its branch sum is exact for, when only for those

    @property
    def convs_before(self) -> int:
        return sum(op in CONV_OPS for op in self.ops)

    @property
    def convs_after(self) -> int:
        return sum(op in CONV_OPS for op in self.emitted)

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {op}" if n > 1 else op for op, n in Counter(self.ops).items())
        fixed = (f"; exact at the fixed input size {' / '.join(self.fixed_sizes)} the graph sets (not for every size)"
                 if self.fixed_sizes else "")
        return (f"{self.exit!r}: {len(self.ops)} ops ({kinds}) -> {len(self.emitted)} "
                f"({', '.join(self.emitted) or 'wired through'}); convs {self.convs_before} -> {self.convs_after}"
                + fixed)


@dataclass(frozen=True)
class Refused:
    """A candidate fusion step that was not taken, and why (the core algebra's reason, or the frontend's)."""

    node: str  # ONNX node name
    op: str  # its op type
    value: str  # the value it computes
    reason: str

    def describe(self) -> str:
        return f"{self.op} {self.node!r} -> {self.value!r}: {self.reason}"


@dataclass
class FuseReport:
    """The outcome of one :func:`~reparam.onnx.fuse` call (``str(report)`` gives the readable form)."""

    regions: list[FusedRegion] = field(default_factory=list)
    refusals: list[Refused] = field(default_factory=list)
    bn_converted: list[str] = field(default_factory=list)  # training-mode BN nodes now in inference form
    ops_before: Counter = field(default_factory=Counter)  # op type -> count, main graph
    ops_after: Counter = field(default_factory=Counter)  # the output's (after --simplify, if asked)
    notes: list[str] = field(default_factory=list)
    input_shapes: dict[str, list] = field(default_factory=dict)  # graph input shapes set by the caller
    constants_folded: list[str] = field(default_factory=list)  # values of constant subgraphs made initializers
    transposes_shared: int = 0  # Mul/Add chains rebuilt after a shared Transpose (tf2onnx NHWC graphs)
    pads_into_pools: int = 0  # MaxPools that now pad themselves (a zero Pad of a Relu output folded in)
    ops_fused: Counter | None = None  # op histogram after fusing, before the simplifier
    simplified_by: str | None = None  # "onnxslim 0.1.98" when --simplify ran

    @property
    def refused(self) -> list[tuple[str, str]]:
        """``(node, reason)`` pairs, the shape of ``reparam.fx.FuseReport.refused``."""
        return [(r.node, r.reason) for r in self.refusals]

    @property
    def nodes_before(self) -> int:
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.ops_after.values())

    @property
    def convs_before(self) -> int:
        return sum(self.ops_before[op] for op in CONV_OPS)

    @property
    def convs_after(self) -> int:
        return sum(self.ops_after[op] for op in CONV_OPS)

    @property
    def changed(self) -> bool:
        return bool(self.regions or self.bn_converted)

    @property
    def fixed_size_regions(self) -> list[FusedRegion]:
        """Regions exact only at the spatial sizes the graph fixes."""
        return [r for r in self.regions if r.fixed_sizes]

    def summary(self) -> str:
        """One line: node and conv counts before/after, BatchNormalization left."""
        bn = self.ops_after["BatchNormalization"]
        extra = []
        if self.bn_converted:
            extra.append(f"{len(self.bn_converted)} training-mode BatchNormalization converted")
        if self.fixed_size_regions:
            extra.append(f"{len(self.fixed_size_regions)} exact at the fixed input sizes only")
        if self.simplified_by:
            extra.append(f"then {self.simplified_by}")
        return (f"{len(self.regions)} regions fused: {self.nodes_before} -> {self.nodes_after} nodes, "
                f"convs {self.convs_before} -> {self.convs_after}, BatchNormalization "
                f"{self.ops_before['BatchNormalization']} -> {bn}; {len(self.refusals)} refused"
                + "".join(f"; {e}" for e in extra))

    def format(self) -> str:
        lines = [self.summary()]
        if self.bn_converted:
            lines.append(f"training-mode BatchNormalization converted to inference form using their running "
                         f"statistics ({len(self.bn_converted)}): " + ", ".join(repr(n) for n in self.bn_converted))
        lines.append(f"fused regions ({len(self.regions)}):")
        lines += [f"  {r.describe()}" for r in self.regions] or ["  (none)"]
        lines.append(f"refused ({len(self.refusals)}):")
        lines += [f"  {r.describe()}" for r in self.refusals] or ["  (none)"]
        if self.input_shapes:
            lines.append("input shapes set: " + ", ".join(f"{k}{v}" for k, v in self.input_shapes.items()))
        if self.constants_folded:
            lines.append(f"constant subgraphs evaluated with onnx.reference ({len(self.constants_folded)} values): "
                         + ", ".join(repr(v) for v in self.constants_folded[:8])
                         + (", ..." if len(self.constants_folded) > 8 else ""))
        if self.transposes_shared:
            lines.append(f"{self.transposes_shared} per-channel Mul/Add chains moved after a shared Transpose")
        if self.pads_into_pools:
            lines.append(f"{self.pads_into_pools} zero Pad(s) of a Relu output folded into the MaxPool reading them")
        if self.simplified_by:
            lines.append(f"simplified by {self.simplified_by}: {sum(self.ops_fused.values())} -> "
                         f"{self.nodes_after} nodes")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = format

    def to_dict(self) -> dict:
        """JSON-ready form (``reparam onnx --json`` prints it)."""
        return {
            "summary": self.summary(),
            "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
            "convs_before": self.convs_before, "convs_after": self.convs_after,
            "regions": [dict(asdict(r), convs_before=r.convs_before, convs_after=r.convs_after)
                        for r in self.regions],
            "refusals": [asdict(r) for r in self.refusals],
            "bn_converted": list(self.bn_converted),
            "ops_before": dict(self.ops_before),
            "ops_after": dict(self.ops_after),
            "ops_fused": None if self.ops_fused is None else dict(self.ops_fused),
            "input_shapes": dict(self.input_shapes),
            "constants_folded": list(self.constants_folded),
            "transposes_shared": self.transposes_shared,
            "pads_into_pools": self.pads_into_pools,
            "simplified_by": self.simplified_by,
            "notes": list(self.notes),
        }


__all__ = ["CONV_OPS", "FuseReport", "FusedRegion", "Refused"]
