"""Region collapse: find the linear regions of a neutral graph and collapse each into convs.

A frontend (torch.fx, ONNX) translates its graph into a :class:`LinearGraph`: every node is either a linear
op (:data:`~reparam.core.types.LinearOp`) or opaque (``op=None``: an activation, a concat, anything unknown).
:func:`plan` walks the graph once in topological order, keeping for every linear value an equivalent
``sum over sources s of Conv_s(s) + bias``.  A *source* is an opaque node, a graph input, or a linear node
whose value must exist on its own ("materialized"): one read by anything but exactly one linear user, or
one that a refused step had to cut.  Each materialized linear node is the exit of a region, which the
frontend replaces by one conv per source (identity terms stay plain adds).  A step the algebra cannot prove
exact (or that would raise the cost, unless allowed) is refused with a reason: its inputs are
materialized and the step is retried on them, so a refusal only ever keeps the original structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod  # (bound here: fx may patch the math module while a fusion traces)
from typing import Any

import numpy as np

from .conv_algebra import _is_channel_scale, avgpool_conv, bias_through, compose, identity, pad_conv, reach
from .errors import NotFusable, ReparamError
from .kernel_sum import KernelSum, sum_kernels
from .precision import cast_conv, conv64, f64
from .types import Add, Affine, AvgPool, BatchNorm, Conv, Identity, LinearOp, Pad


@dataclass
class Node:
    """A graph node: ``op`` is a linear op, or None for an opaque node (including graph inputs)."""

    name: str
    op: LinearOp | None
    inputs: list[str]
    channels: int | None = None
    ndim: int | None = None
    payload: Any = None
    spatial: tuple[int, ...] | None = None  # the value's spatial sizes where the graph fixes them


class Term:
    """One conv applied to one source; ``identity`` means the conv is exactly ``y = x`` (emit the source).

    The kernel is computed when asked for: :attr:`conv` gives it in float64, :meth:`cast` straight in the
    target dtype (each element rounded once from its float64 value, without a float64 copy of the kernel).
    """

    def __init__(self, source: str, kernel: KernelSum | Conv, *, bias: np.ndarray | None = None,
                 identity: bool = False) -> None:
        if isinstance(kernel, Conv):
            bias = kernel.bias if bias is None else bias
            kernel = KernelSum.of(kernel)
        self.source = source
        self.kernel = kernel
        self.bias = None if bias is None else f64(bias)
        self.identity = identity
        self._conv64: Conv | None = None

    @property
    def conv(self) -> Conv:
        """The term's conv in float64 (computed once)."""
        if self._conv64 is None:
            self._conv64 = self.kernel.geometry.with_(weight=self.kernel.evaluate(), bias=self.bias)
        return self._conv64

    def cast(self, dtype, out: np.ndarray | None = None, threads: int = 1) -> Conv:
        """The term's conv in ``dtype``; NotFusable if a value is not finite there.

        ``out``: where to write the kernel (shape of :attr:`shape`, ``dtype``), e.g. a fresh tensor's memory;
        ``threads``: how many threads may compute a large kernel.
        """
        if self._conv64 is not None:
            conv = cast_conv(self._conv64, dtype)
            if out is not None:
                out[...] = conv.weight
                conv = conv.with_(weight=out)
            return conv
        return self.kernel.to_conv(dtype, self.bias, out=out, threads=threads)

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape, ``[out, in/groups, *kernel]``."""
        return self.kernel.geometry.weight.shape

    def __repr__(self) -> str:
        return f"Term({self.source!r}, {self.kernel.geometry.describe()}, identity={self.identity})"


@dataclass
class Region:
    """A collapsed region: ``nodes`` (topological order, ending with ``exit``) become the sum of ``terms``.

    ``convs_before`` counts the real convs (and linear layers) among ``nodes``; ``blocked`` is the reason the
    plan keeps the region as it is although its rewrite would remove ops (it would run more convs or MACs).
    """

    exit: str
    nodes: list[str]
    terms: list[Term]
    convs_before: int = 0
    blocked: str | None = None

    @property
    def ops_before(self) -> int:
        return len(self.nodes)

    @property
    def convs_after(self) -> int:
        return sum(not t.identity for t in self.terms)

    @property
    def ops_after(self) -> int:
        """Ops the rewrite emits: one conv per non-identity term plus the adds joining the terms."""
        return sum(not t.identity for t in self.terms) + max(len(self.terms) - 1, 0)

    @property
    def worthwhile(self) -> bool:
        return self.blocked is None and self.ops_after < self.ops_before

    def why_kept(self) -> str | None:
        """Why the rewrite leaves this region as it is (None when it is rewritten)."""
        if self.blocked is not None:
            return self.blocked
        if self.ops_after >= self.ops_before:
            return "collapsing it would not remove an op"
        return None


@dataclass
class Refusal:
    """A step that was not fused, with the reason the algebra gave."""

    node: str
    reason: str


@dataclass
class Plan:
    regions: list[Region] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    sized: set[str] = field(default_factory=set)  # adds whose branch sum is exact only at the fixed spatial sizes


@dataclass
class _Value:
    terms: dict[str, KernelSum]  # deferred bias-free kernels, keyed by source
    bias: np.ndarray | None  # float64
    channels: int
    ndim: int
    priced: bool = False  # some kernel is a cost-only placeholder (see compose(weights=False))
    convs: int = 0  # real convs folded into the value (pads, pools and per-channel ops are not)


class LinearGraph:
    """A neutral DAG of linear and opaque nodes; names are unique, inputs refer to earlier nodes."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.outputs: set[str] = set()

    def add(self, name: str, op: LinearOp | None, inputs: Sequence[str] = (), *, channels: int | None = None,
            ndim: int | None = None, payload: Any = None, spatial: Sequence[int] | None = None) -> str:
        """Append a node (inputs must already exist); returns its name.

        ``spatial``: the node's spatial output sizes where the graph fixes them; branch sums read from it
        may then use the sum rule at those sizes (``Plan.sized`` lists them) instead of for every size.
        """
        if name in self.nodes:
            raise ReparamError(f"duplicate node name {name!r}")
        for i in inputs:
            if i not in self.nodes:
                raise ReparamError(f"node {name!r} reads unknown node {i!r}")
        self.nodes[name] = Node(name, op, list(inputs), channels, ndim, payload,
                                None if spatial is None else tuple(int(v) for v in spatial))
        return name

    def input(self, name: str, channels: int | None = None, ndim: int | None = None,
              spatial: Sequence[int] | None = None) -> str:
        """Add a graph input (an opaque node without inputs)."""
        return self.add(name, None, (), channels=channels, ndim=ndim, spatial=spatial)

    def mark_output(self, *names: str) -> None:
        """Values read outside the graph: they are always materialized."""
        self.outputs.update(names)

    def users(self) -> dict[str, list[str]]:
        """Distinct reading nodes of every node (a node reading a value twice counts once)."""
        out: dict[str, list[str]] = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for i in dict.fromkeys(node.inputs):
                out[i].append(node.name)
        return out


def macs_per_output(conv: Conv) -> int:
    """Multiply-accumulates per output position (all output channels), the cost model of the guard."""
    return int(conv.weight.size)  # out * in/groups * taps


class _Unpaid(NotFusable):
    """A sum refused by :meth:`_Planner._check_paid_for`; ``inputs``: the positions of the inputs at fault."""

    def __init__(self, message: str, inputs: list[int]) -> None:
        super().__init__(message)
        self.inputs = inputs


def _scaled(v: _Value, c: float) -> _Value:
    """``c * v`` (the coefficient of one input of a signed sum)."""
    if c == 1.0:
        return v
    scale = np.full(v.channels, c)
    terms = {s: t.scaled(scale) for s, t in v.terms.items()}
    return _Value(terms, None if v.bias is None else v.bias * c, v.channels, v.ndim, v.priced, v.convs)


def _composed(t: KernelSum, own: KernelSum) -> KernelSum:
    """``own`` (a conv's kernel, one part) applied after ``t``.  A per-channel ``t`` (a BN or a scale folded
    forward into the conv) stays deferred as an input scale of ``own``: no float64 copy of the conv's kernel
    is made until the result is computed, once, into its target; otherwise :func:`compose` computes it."""
    if _is_channel_scale(t.geometry):
        scale = t.evaluate().reshape(-1)
        return own if np.all(scale == 1) else own.scaled_inputs(scale)
    return KernelSum.of(compose(t.geometry._evolve(weight=t.evaluate()), conv64(own.parts[0].conv)))


def _weights(k: KernelSum) -> int:
    """Weights a kernel stores in the model (a source's identity stores none)."""
    return 0 if k.is_unit else int(k.geometry.weight.size)


def _value_cost(v: _Value) -> float:
    return float(sum(macs_per_output(t.geometry) for t in v.terms.values()))


class _Planner:
    def __init__(self, graph: LinearGraph, guarded: set[str], split: set[str] = frozenset(),
                 forced: set[str] = frozenset(), exact: set[str] = frozenset(),
                 memo: dict | None = None, strict: bool = True) -> None:
        self.g = graph
        self.strict = strict  # refuse sums that would need a conv nothing in the model pays for
        self.memo = {} if memo is None else memo  # per-op results that do not depend on the pass (BN affines)
        self.exact = exact  # nodes whose costlier compositions are computed rather than only priced
        self.forced = forced  # nodes materialized whatever their readers
        self.guarded = guarded  # nodes where a step that raises the cost is refused
        self.split = split  # nodes where an op on a value with several sources is refused
        self.op_cost: dict[str, tuple[float, float]] = {}  # node -> (MACs per output, stride product)
        self.current = ""
        self.users = graph.users()
        self.values: dict[str, _Value] = {}
        self.exits: set[str] = set()
        self.opaque: set[str] = {n for n, node in graph.nodes.items() if node.op is None}
        self.refusals: list[Refusal] = []
        self.sized: set[str] = set()

    # -- sources -------------------------------------------------------------------------------------
    def _source_shape(self, name: str) -> tuple[int, int]:
        node = self.g.nodes[name]
        if node.channels is not None and node.ndim is not None:
            return node.channels, node.ndim
        for user in self.users[name]:
            op = self.g.nodes[user].op
            if isinstance(op, Conv):
                return op.in_channels, op.ndim
        for user in self.users[name]:
            unode = self.g.nodes[user]
            if isinstance(unode.op, (BatchNorm, Affine, Identity, Add)) and unode.channels and unode.ndim is not None:
                return unode.channels, unode.ndim
        raise NotFusable(f"the channel count of {name!r} is unknown (give example inputs or shapes)")

    def _source(self, name: str) -> _Value:
        known = self.values.get(name)
        c, nd = (known.channels, known.ndim) if known is not None else self._source_shape(name)
        value = self.memo.get(("source", name, c, nd))  # the same object in every pass (see _step)
        if value is None:
            unit = self.memo.get(("unit", c, nd))
            if unit is None:
                unit = self.memo[("unit", c, nd)] = KernelSum.of(identity(c, nd), unit=True)
            value = self.memo[("source", name, c, nd)] = _Value({name: unit}, None, c, nd)
        return value

    def _input_value(self, name: str) -> _Value:
        if name in self.opaque or name in self.exits:
            return self._source(name)
        return self.values[name]

    # -- one step ------------------------------------------------------------------------------------
    def _apply(self, node: Node, ins: list[_Value]) -> _Value:
        op = node.op
        if isinstance(op, Add):
            return self._add(ins, op)
        (v,) = ins
        if len(v.terms) > 1 and self.current in self.split and not isinstance(op, Identity):
            raise NotFusable(f"its input is a sum of {len(v.terms)} values (such as a residual add): folding it in "
                             "would run it once per summand instead of once")
        if isinstance(op, Identity):
            return v
        if isinstance(op, BatchNorm):
            if op.channels != v.channels:
                raise NotFusable(f"batch norm has {op.channels} channels but its input has {v.channels}")
            affine = self.memo.get(("affine", node.name))
            if affine is None:
                affine = self.memo[("affine", node.name)] = op.to_affine()
            op = affine
        if isinstance(op, Affine):
            scale, shift = op.scale_for(v.channels), op.shift_for(v.channels)
            terms = v.terms if op.scale is None else {s: t.scaled(scale) for s, t in v.terms.items()}
            bias = shift if v.bias is None else v.bias * scale + shift
            return _Value(terms, bias, v.channels, v.ndim, v.priced, v.convs)
        if isinstance(op, Conv):
            return self._conv(v, op, node.name)
        if isinstance(op, AvgPool):
            return self._conv(v, avgpool_conv(op, v.channels))
        if isinstance(op, Pad):
            if len(op.padding) != v.ndim:
                raise NotFusable(f"pad has {len(op.padding)} spatial dims, the value has {v.ndim}")
            if self.strict and v.convs and any(p for pair in op.padding for p in pair):
                raise NotFusable("padding after a conv would make the conv run over the padded border too (more "
                                 "MACs, by the border's share of the output; allow_costlier=True permits it)")
            return self._conv(v, pad_conv(op, v.channels))
        raise ReparamError(f"unknown op {type(op).__name__} at {node.name!r}")

    def _conv(self, v: _Value, b: Conv, key: str | None = None) -> _Value:
        """``b`` applied to ``v``; ``key`` names the graph node whose op ``b`` is (its kernel is cached)."""
        if b.in_channels != v.channels or b.ndim != v.ndim:
            raise NotFusable(f"a conv expecting {b.in_channels} channels/{b.ndim}-d reads a value with "
                             f"{v.channels} channels/{v.ndim}-d")
        own = self._own_kernel(b, key)
        geo = own.geometry
        # a pool or pad is priced as the depthwise conv it becomes, so merging one into a conv that covers its
        # window costs nothing extra; that it never becomes a conv of its own is the region's conv count
        own_cost = macs_per_output(b)
        before = _value_cost(v) * float(prod(b.stride)) + own_cost
        priced = {s: geo if t.is_unit else compose(t.geometry, geo, weights=False) for s, t in v.terms.items()}
        # a conv composed onto a value no conv has been folded into yet (a source's identity, BN, pool or pad)
        # stores its own weights only, as the region's own test counts them (_original_weights)
        first = key is not None and not v.convs
        stored = (0 if first else sum(_weights(t) for t in v.terms.values())) + (
            b.weight.size if key is not None else 0)
        composed = sum(t.weight.size for s, t in priced.items() if not v.terms[s].is_unit or key is not None)
        costlier = sum(macs_per_output(t) for t in priced.values()) > before or composed > stored
        if costlier and self.current in self.guarded:
            after = sum(macs_per_output(t) for t in priced.values())
            if after > before:
                raise NotFusable(f"composing would cost {after:.0f} MACs per output position instead of "
                                 f"{before:.0f} unfused (allow_costlier=True permits it)")
            raise NotFusable(f"composing would store {composed} weights instead of {stored} (a pool or pad widens "
                             "the kernel; allow_costlier=True permits it)")
        only_priced = costlier and self.current not in self.exact
        if only_priced:
            terms = {s: KernelSum.of(t) for s, t in priced.items()}
        else:
            terms = {s: own if t.is_unit else _composed(t, own) for s, t in v.terms.items()}
        bias = f64(b.bias)
        if v.bias is not None and np.any(v.bias != 0):
            if b.is_padded and b.padding_mode == "zeros":
                raise NotFusable(
                    f"the conv pads {b.padding} with zeros but its input carries a bias (max |b| "
                    f"{np.abs(v.bias).max():.3g}) that the padded border would not see")
            bias = self._pushed(b, v.bias, key) + (0 if bias is None else bias)
        out = _Value(terms, bias, b.out_channels, b.ndim, v.priced or only_priced, v.convs + (key is not None))
        self.op_cost[self.current] = (float(own_cost), float(prod(b.stride)))
        return out

    def _pushed(self, b: Conv, bias: np.ndarray, key: str | None) -> np.ndarray:
        """``bias`` (the input's per-channel constant) through ``b``'s kernel; a graph node's is kept across
        passes for the same input bias (each pass pushes it again, a product over the whole kernel)."""
        if key is None:
            return bias_through(b.weight, bias, b.groups)
        memo_key = ("pushed", key, bias.tobytes())
        pushed = self.memo.get(memo_key)
        if pushed is None:
            pushed = self.memo[memo_key] = bias_through(b.weight, bias, b.groups)
        return pushed

    def _own_kernel(self, b: Conv, key: str | None) -> KernelSum:
        """``b``'s kernel as a source reads it (bias-free), kept across passes for a graph node's op."""
        own = self.memo.get(("conv", key)) if key is not None else None
        if own is None:
            plain = b._evolve(bias=None)
            if not plain.is_padded and plain.padding_mode != "zeros":
                plain = plain._evolve(padding_mode="zeros")  # the mode of a conv that never pads is moot
            own = KernelSum.of(plain)
            if key is not None:
                self.memo[("conv", key)] = own
        return own

    def _add(self, ins: list[_Value], op: Add) -> _Value:
        chans = {v.channels for v in ins}
        nds = {v.ndim for v in ins}
        if len(chans) > 1 or len(nds) > 1:
            raise NotFusable(f"add of values with different channels/dims: {sorted(chans)}/{sorted(nds)}")
        ins = [_scaled(v, op.coefficient(k)) for k, v in enumerate(ins)]
        if self.strict:  # after the coefficients: in ``bn(conv(h)) - x``, -x is a per-channel op of x
            self._check_paid_for(ins)
        grouped: dict[str, list[KernelSum]] = {}
        for v in ins:
            for s, t in v.terms.items():
                grouped.setdefault(s, []).append(t)
        terms = {s: sum_kernels(ts, self.g.nodes[s].spatial) for s, ts in grouped.items()}
        if any(len({reach(t.geometry, i) for t in ts}) > 1 for ts in grouped.values() for i in range(ins[0].ndim)):
            self.sized.add(self.current)
        if self.current in self.guarded:
            before = sum(_value_cost(v) for v in ins)
            after = float(sum(macs_per_output(t.geometry) for t in terms.values()))
            if after > before:
                raise NotFusable(f"summing these branches would cost {after:.0f} MACs per output position "
                                 f"instead of {before:.0f} (allow_costlier=True permits it)")
        biases = [v.bias for v in ins if v.bias is not None]
        bias = np.sum(biases, axis=0) if biases else None
        return _Value(terms, bias, ins[0].channels, ins[0].ndim, any(v.priced for v in ins), sum(v.convs for v in ins))

    @staticmethod
    def _check_paid_for(ins: list[_Value]) -> None:
        """Refuse a sum in which a per-channel op, pad or pool of a source would become a conv of its own:
        that source reaches the sum through no conv (``bn(x) + conv(y)``), so the rewrite would add one.
        The error names those inputs: materialized, they join the sum as plain values."""
        unpaid, first = [], None
        for k, v in enumerate(ins):
            if v.convs:
                continue
            others = {s for j, w in enumerate(ins) if j != k for s in w.terms}
            alone = [s for s, t in v.terms.items() if s not in others and not t.is_unit]
            if alone:
                unpaid.append(k)
                first = first or alone[0]
        if unpaid:
            raise _Unpaid(f"the value of {first!r} reaches this sum through no conv: summing it with other "
                          "sources would turn its per-channel op (a BN, scale or negation) into a conv of its own",
                          unpaid)

    # -- the pass ------------------------------------------------------------------------------------
    def _step(self, node: Node) -> _Value:
        """``_apply`` on the node's current inputs, reused from an earlier pass of the same plan when those
        inputs are the very same values and the node is guarded, split and exact as it was then (values are
        never changed once made, so the result, and what the step records, would be the same)."""
        ins = [self._input_value(i) for i in node.inputs]
        name = node.name
        flags = (name in self.guarded, name in self.split, name in self.exact)
        steps = self.memo.setdefault("steps", {})
        done = steps.get(name)
        if done is not None and done[1] == flags and len(done[0]) == len(ins) \
                and all(a is b for a, b in zip(done[0], ins)):
            _, _, value, sized, cost = done
            if sized:
                self.sized.add(name)
            if cost is not None:
                self.op_cost[name] = cost
            return value
        value = self._apply(node, ins)
        steps[name] = (ins, flags, value, name in self.sized, self.op_cost.get(name))
        return value

    def run(self) -> Plan:
        g = self.g
        self._choose_exits()
        for name, node in g.nodes.items():
            if name in self.opaque:
                continue
            self.current = name
            try:
                try:
                    self.values[name] = self._step(node)
                except _Unpaid as err:  # those inputs are computed as they are and summed as plain values
                    culprits = {node.inputs[k] for k in err.inputs} - self.exits - self.opaque
                    if not culprits:
                        raise
                    self.exits.update(culprits)
                    self.values[name] = self._step(node)
                if len(self.users[name]) > 1 and len(self.values[name].terms) > 1:
                    self.exits.add(name)  # inlining a sum of sources for several readers repeats them per source
                continue
            except NotFusable as err:
                self.refusals.append(Refusal(name, str(err)))
            cut = [i for i in node.inputs if i not in self.opaque and i not in self.exits]
            self.exits.update(cut)
            try:
                self.values[name] = self._step(node)
            except NotFusable as err:
                if str(err) != self.refusals[-1].reason:
                    self.refusals.append(Refusal(name, str(err)))
                self._make_opaque(name)
        return Plan(self._regions(), self.refusals, self.sized)

    def _choose_exits(self) -> None:
        """Materialize graph outputs, values read by opaque nodes, and values whose readers lead to more than
        one exit; a value read several times inside one region is computed inline."""
        reach: dict[str, frozenset[str]] = {}
        for name in reversed(self.g.nodes):
            if name in self.opaque:
                continue
            users = self.users[name]
            if name in self.forced or name in self.g.outputs or not users or any(u in self.opaque for u in users):
                self.exits.add(name)
            else:
                leads = frozenset().union(*(reach[u] for u in users))
                if len(leads) != 1:
                    self.exits.add(name)
            reach[name] = frozenset({name}) if name in self.exits else leads

    def _make_opaque(self, name: str) -> None:
        self.opaque.add(name)
        self.exits.discard(name)
        for i in self.g.nodes[name].inputs:
            if i not in self.opaque:
                self.exits.add(i)
        # a user of an opaque node needs it as a source: exits already cover linear inputs

    def _regions(self) -> list[Region]:
        order = {n: k for k, n in enumerate(self.g.nodes)}
        regions = []
        for e in sorted(self.exits, key=order.get):
            if e in self.opaque:
                continue
            members, stack = {e}, [e]
            while stack:
                n = stack.pop()
                for i in self.g.nodes[n].inputs:
                    if i not in self.opaque and i not in self.exits and i not in members:
                        members.add(i)
                        stack.append(i)
            members = sorted(members, key=order.get)
            convs = sum(isinstance(self.g.nodes[n].op, Conv) for n in members)
            regions.append(Region(e, members, _terms(self.values[e], order, self.memo.setdefault("identity", {})),
                                  convs))
        return regions


def _is_identity(term: Term) -> bool:
    """The term computes ``y = x`` exactly (its kernel is evaluated only when the geometry allows it)."""
    if term.kernel.is_unit:
        return True
    conv = term.kernel.geometry
    c = conv.out_channels
    if not (conv.in_channels == c and conv.is_pointwise and not conv.is_padded
            and all(s == 1 for s in conv.stride) and (term.bias is None or not np.any(term.bias))):
        return False
    first = term.kernel.evaluate_rows(0, 1).reshape(-1)  # an identity's first row is [1, 0, 0...]: a cheap
    if first[0] != 1.0 or np.count_nonzero(first) != 1:  # look rejects a real conv before it is computed whole
        return False
    return np.array_equal(term.conv.weight.reshape(c, -1), _eye(conv))


def _eye(conv: Conv) -> np.ndarray:
    per = conv.weight.shape[1]
    eye = np.zeros((conv.out_channels, per))
    rows = np.arange(conv.out_channels)
    eye[rows, rows % per] = 1.0
    return eye


def _terms(v: _Value, order: dict[str, int], identities: dict | None = None) -> list[Term]:
    """``v``'s terms in graph order, each marked when it is an identity (``identities``: the answers of
    earlier passes, by kernel, kept with the kernel so that its id stays its own)."""
    identities = {} if identities is None else identities
    terms = [Term(s, t) for s, t in sorted(v.terms.items(), key=lambda kv: order[kv[0]])]
    for t in terms:
        known = identities.get(id(t.kernel))
        if known is None or known[0] is not t.kernel or known[1] is not t.bias:
            known = identities[id(t.kernel)] = (t.kernel, t.bias, _is_identity(t))
        t.identity = known[2]
    if v.bias is not None:  # even a zero bias is kept on a conv (a folded BN gives its conv a bias)
        k = next((i for i, t in enumerate(terms) if not t.identity), 0 if np.any(v.bias != 0) else None)
        if k is not None:
            terms[k] = Term(terms[k].source, terms[k].kernel, bias=v.bias)
    return terms


def _original_cost(p: _Planner, region: Region) -> float:
    """MACs per exit position of the region's own ops (each op weighted by the strides after it, on its path
    to the exit: the first reader inside the region, as every inner value leads to the one exit)."""
    inside = set(region.nodes)
    factor = {region.exit: 1.0}  # stride product from a node's output to the exit
    total = 0.0
    for n in reversed(region.nodes):
        if n != region.exit:
            user = next(u for u in p.users[n] if u in inside)
            factor[n] = factor[user] * p.op_cost.get(user, (0.0, 1.0))[1]
        cost = p.op_cost.get(n, (0.0, 1.0))[0]
        if cost:
            total += cost * factor[n]
    return total


def plan(graph: LinearGraph, *, allow_costlier: bool = False, per_channel_terms: bool = False) -> Plan:
    """Find and collapse every linear region of ``graph``; the graph itself is not modified.

    Unless ``allow_costlier``, a region whose collapsed convs would cost more MACs than its original ops
    is planned again with every step inside it guarded: a step that raises the cost is refused (and cut).
    A region whose rewrite would not reduce the op count, or (unless ``allow_costlier``) would run more
    convs than it has, is planned again without folding ops into sums of several sources, so the parts of
    it that do shrink (a conv and its BN) are still collapsed.  Before
    either guard, such regions are re-planned with their values read several times materialized.

    A per-channel op (BN, affine) of a source summed with other sources would be a conv of its own: refused
    unless ``allow_costlier``, or ``per_channel_terms`` (the frontend writes such a term as a per-channel
    multiply-add, not a conv, as the ONNX frontend does).
    """
    forced: set[str] = set()
    guarded: set[str] = set()
    split: set[str] = set()
    exact: set[str] = set()
    memo: dict = {}
    while True:
        planner = _Planner(graph, guarded, split, forced, exact, memo,
                           strict=not (allow_costlier or per_channel_terms))
        result = planner.run()
        # a cut made after a value was inlined can leave that value inside two regions: materialize it
        seen: dict[str, int] = {}
        for r in result.regions:
            for n in r.nodes:
                seen[n] = seen.get(n, 0) + 1
        overlap = {n for n, k in seen.items() if k > 1}
        if overlap - forced:
            forced |= overlap
            continue
        costly = [] if allow_costlier else [r for r in result.regions if _macs_after(r) > _original_cost(planner, r)
                                            or _macs_after(r) > _original_weights(graph, r)]  # MACs per
        # output position of a kernel are its weight count: the second test is the weights stored
        # (one that would run more convs than it has is refused below: planned again the same way, its parts
        # that do not need a conv of their own still collapse, e.g. a BN after a residual sum into the next conv)
        unworthy = [r for r in result.regions if len(r.nodes) > 1 and (
            not r.worthwhile or (not allow_costlier and r.convs_after > r.convs_before))]
        bad = costly + unworthy
        if bad:
            # first undo the optional choice (computing a value read several times inline), then guard steps
            shared = {n for r in bad for n in r.nodes if n != r.exit and len(planner.users[n]) > 1} - forced
            if shared:
                forced |= shared
                continue
            new_guarded = guarded | {n for r in costly for n in r.nodes}
            new_split = split | {n for r in unworthy for n in r.nodes}
            if (new_guarded, new_split) != (guarded, split):
                guarded, split = new_guarded, new_split
                continue
        # the plan stands; compositions in it that were only priced are now computed for real
        priced = {n for r in result.regions if planner.values[r.exit].priced for n in r.nodes} - exact
        if not priced:
            if not allow_costlier:
                for r in result.regions:
                    r.blocked = _costlier(planner, r)
            return result
        exact |= priced


def _macs_after(r: Region) -> float:
    return float(sum(macs_per_output(t.kernel.geometry) for t in r.terms if not t.identity))


def _costlier(p: _Planner, r: Region) -> str | None:
    """Why collapsing ``r`` would make the model costlier (more convs or MACs than its own ops), or None."""
    if r.convs_after > r.convs_before:
        what = "no conv" if not r.convs_before else f"{r.convs_before} conv{'s' * (r.convs_before > 1)}"
        return (f"collapsing it would run {r.convs_after} conv{'s' * (r.convs_after > 1)} where it has {what}: "
                "there is no conv or linear layer next to its ops to fold them into")
    after, before = _macs_after(r), _original_cost(p, r)
    if after > before:
        return (f"collapsing it would cost {after:.0f} MACs per output position instead of {before:.0f} "
                "(allow_costlier=True permits it)")
    stored = _original_weights(p.g, r)
    if after > stored:
        return f"collapsing it would store {after:.0f} weights instead of {stored} (allow_costlier=True permits it)"
    return None


def _original_weights(g: LinearGraph, r: Region) -> int:
    """Weights the region's own convs store."""
    return sum(int(g.nodes[n].op.weight.size) for n in r.nodes if isinstance(g.nodes[n].op, Conv))


def collapse(graph: LinearGraph, exit: str, *, allow_costlier: bool = True) -> list[Term]:
    """The terms computing node ``exit`` from its sources, or NotFusable if a step inside was refused."""
    p = plan(graph, allow_costlier=allow_costlier)
    for r in p.regions:
        if r.exit == exit:
            inside = set(r.nodes)
            bad = [f.reason for f in p.refusals if f.node in inside]
            if bad:
                raise NotFusable(bad[0])
            return r.terms
    bad = [f"{f.node}: {f.reason}" for f in p.refusals]
    raise NotFusable(f"{exit!r} is not the exit of a linear region" + (f" ({bad[0]})" if bad else ""))


def chain(ops: Sequence[LinearOp], channels: int | None = None, ndim: int | None = None,
          *, dtype=None) -> Conv:
    """One conv equal to applying ``ops`` in sequence (e.g. ``[Conv, BatchNorm]``), cast to ``dtype``.

    ``channels``/``ndim`` describe the input and are needed only when the first op is not a conv.
    """
    return sum_branches([ops], channels, ndim, dtype=dtype)


def sum_branches(branches: Sequence[Sequence[LinearOp]], channels: int | None = None,
                 ndim: int | None = None, *, dtype=None) -> Conv:
    """One conv equal to the sum of several op chains read from one input (an empty chain is identity).

    Raises NotFusable with the reason when the sum is not exactly one conv.  ``dtype`` defaults to the
    dtype of the first conv weight met (float64 if there is none); the math is float64 throughout.
    """
    g = LinearGraph()
    g.input("x", channels, ndim)
    ends = []
    for bi, ops in enumerate(branches):
        prev = "x"
        for oi, op in enumerate(ops):
            prev = g.add(f"b{bi}.{oi}", op, [prev])
        ends.append(prev)
    if len(ends) > 1 or ends[0] == "x":
        g.add("sum", Add(), ends)
        out = "sum"
    else:
        out = ends[0]
    g.mark_output(out)
    p = plan(g, allow_costlier=True)
    if p.refusals:
        first = p.refusals[0]
        raise NotFusable(f"{first.node}: {first.reason}")
    terms = next(r.terms for r in p.regions if r.exit == out)
    if len(terms) != 1 or terms[0].source != "x":
        raise NotFusable(f"the branches do not reduce to one conv of the input (sources: {[t.source for t in terms]})")
    (term,) = terms
    if dtype is None:
        first = next((op for ops in branches for op in ops if isinstance(op, Conv)), None)
        dtype = np.float64 if first is None else first.weight.dtype
    return term.cast(dtype)


__all__ = ["LinearGraph", "Node", "Plan", "Refusal", "Region", "Term", "chain", "collapse",
           "macs_per_output", "plan", "sum_branches"]

