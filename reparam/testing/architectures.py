"""Hypothesis strategies for random re-parameterizable PyTorch blocks and networks.

:func:`rep_blocks` draws a training-form block: several parallel branches read one input (conv, conv+BN,
BN only, identity, per-channel scale, average pooling, 1x1->BN->kxk or 1x1->BN->avgpool chains, a
conv+BN+activation branch, nested sub-blocks), joined by ``+``, ``torch.add``, ``+=``, ``sum([...])``,
``Tensor.add`` or a balanced tree of adds.  :func:`architectures` draws a network mixing such blocks with
activations, residual adds, plain and transposed conv+BN layers and a Linear+BatchNorm1d head.

Every drawn module knows what a correct ``reparam.fuse`` must leave behind:
``module.expected_ops(allow_costlier)`` gives the number of convolutions, batch norms and linear layers
that still *execute* after fusion (compare with :func:`reparam.testing.count_executed_ops`), e.g.
exactly one conv for a block whose branches are all legal.  The expectation assumes ``example_inputs``
are passed to ``fuse`` (per-channel constants and Linear layers need shapes).  It is exact for
``allow_costlier=True``; for the default cost guard it is given only for modules drawn with
``cheap=True`` (no fusion step can raise the MAC count) and is None otherwise.

Weights come from a drawn seed (default torch init, then :func:`~reparam.testing.randomize_bn_`), so a
failing example is reproducible from its printed description.  Needs torch and Hypothesis.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from .torch_checks import randomize_bn_

__all__ = [
    "BRANCH_KINDS",
    "JOINS",
    "RepBlock",
    "RepNet",
    "architectures",
    "rep_blocks",
    "tensors",
]

BRANCH_KINDS = ("conv", "conv_bn", "bn", "identity", "scale", "avgpool", "chain", "act", "nested")
"""Branch kinds :func:`rep_blocks` draws from (``chain`` is 1x1->[BN]->kxk or 1x1->[BN]->avgpool)."""

JOINS = ("plus", "torch_add", "iadd", "sum", "method", "tree")
"""How branch outputs are summed: ``a + b``, ``torch.add``, ``out += b``, ``sum([...])``, ``a.add(b)``,
and a balanced tree ``(a + b) + (c + d)``."""

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "leaky_relu": nn.LeakyReLU}


# ------------------------------------------------------------------------------------------------------
# expected-outcome bookkeeping


@dataclass(frozen=True)
class _Info:
    """What one branch puts into its block's main region (the one ending at the join).

    ``source``: ``"x"`` (a linear function of the block input), ``"h"`` (a refused 1x1->BN->padded chain:
    its tail reads the 1x1+BN value, which becomes a region of its own), ``"act"`` (reads an activation
    output: an identity term), ``"join"`` (only adds, from a nested block).
    """

    source: str
    ops: int = 0  # linear fx nodes inside the main region
    convs: int = 0  # conv nodes among them
    bns: int = 0  # BN nodes among them
    head_convs: int = 0  # convs left by regions outside the main one (each collapses to exactly one)
    identity: bool = False  # the branch is exactly the identity
    bias: bool = False  # the branch adds a (non-zero) bias


def _expected_main(infos: list[_Info], joins: int) -> tuple[int, int]:
    """(convs, batch norms) executed for a main region after fuse, plus the head regions' convs."""
    heads = sum(i.head_convs for i in infos)
    x_infos = [i for i in infos if i.source == "x"]
    ident = []
    if x_infos:
        ident.append(len(x_infos) == 1 and x_infos[0].identity)
    ident += [False for i in infos if i.source == "h"]
    ident += [True for i in infos if i.source == "act"]
    if any(i.bias for i in infos) and ident and all(ident):
        ident[0] = False  # the bias lands on the first term
    non_identity = sum(not i for i in ident)
    ops_after = non_identity + max(len(ident) - 1, 0)
    ops_before = joins + sum(i.ops for i in infos)
    if ops_after < ops_before:
        return heads + non_identity, 0
    return heads + sum(i.convs for i in infos), sum(i.bns for i in infos)


def _counts(conv: int = 0, batch_norm: int = 0, linear: int = 0) -> dict[str, int]:
    return {"conv": conv, "batch_norm": batch_norm, "linear": linear}


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


# ------------------------------------------------------------------------------------------------------
# branch modules


def _pad_for(k: tuple[int, ...], d: tuple[int, ...], margin: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(di * (ki - 1) // 2 - mi for ki, di, mi in zip(k, d, margin))


class _ConvBN(nn.Module):
    """conv -> optional BN, as modules or as ``F.convNd`` / ``F.batch_norm`` on stored tensors."""

    def __init__(self, nd: int, cin: int, cout: int, k, stride, pad, dil, groups: int, bias: bool, bn: bool,
                 functional: bool, mode: str = "zeros") -> None:
        super().__init__()
        self.functional = functional
        self.conv = _CONV[nd](cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias,
                              padding_mode=mode)
        self.functional = functional and mode == "zeros"  # F.convNd has no padding modes
        self.bn = _BN[nd](cout) if bn else None
        self.args = (tuple(stride), tuple(pad), tuple(dil), groups)
        self.nd = nd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            s, p, d, g = self.args
            y = _FCONV[self.nd](x, self.conv.weight, self.conv.bias, s, p, d, g)
            if self.bn is not None:
                b = self.bn
                y = F.batch_norm(y, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)
            return y
        y = self.conv(x)
        return self.bn(y) if self.bn is not None else y


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Scale(nn.Module):
    def __init__(self, nd: int, c: int, left: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(0.5 + torch.rand((1, c) + (1,) * nd))
        self.left = left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x if self.left else x * self.scale


class _Chain(nn.Module):
    """1x1 conv -> [BN] -> (kxk conv | avg pool) -> [BN]: DBB's kxk and avg branches."""

    def __init__(self, head: nn.Module, head_bn: nn.Module | None, tail: nn.Module, tail_bn: nn.Module | None):
        super().__init__()
        self.head, self.head_bn, self.tail, self.tail_bn = head, head_bn, tail, tail_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x)
        if self.head_bn is not None:
            y = self.head_bn(y)
        y = self.tail(y)
        return self.tail_bn(y) if self.tail_bn is not None else y


class _Act(nn.Module):
    """conv -> BN -> activation: the activation keeps this branch out of the block's sum."""

    def __init__(self, body: nn.Module, act: str) -> None:
        super().__init__()
        self.body = body
        self.act = _ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x))


def _join(outs: list[torch.Tensor], how: str) -> torch.Tensor:
    if how == "plus":
        y = outs[0]
        for o in outs[1:]:
            y = y + o
        return y
    if how == "torch_add":
        y = outs[0]
        for o in outs[1:]:
            y = torch.add(y, o)
        return y
    if how == "iadd":  # outs[0] is a fresh tensor (the block never starts an in-place sum with its input)
        y = outs[0]
        for o in outs[1:]:
            y += o
        return y
    if how == "sum":
        return sum(outs)
    if how == "method":
        y = outs[0]
        for o in outs[1:]:
            y = y.add(o)
        return y
    if how == "tree":
        while len(outs) > 1:
            outs = [outs[i] + outs[i + 1] if i + 1 < len(outs) else outs[i] for i in range(0, len(outs), 2)]
        return outs[0]
    raise ValueError(f"unknown join {how!r}")


def _join_ops(n: int, how: str) -> int:
    return n if how == "sum" else n - 1


class RepBlock(nn.Module):
    """A random multi-branch block: ``join(branch(x) for branch in branches)``.

    Attributes: ``in_channels``, ``out_channels``, ``ndim``, ``stride``, ``margin`` (per-dim shrink of a
    'valid' block: the output is ``(size - 2*margin - 1) // stride + 1``), ``cheap`` and ``spec`` (a
    readable description of the branches).
    """

    def __init__(self, branches: list[nn.Module], infos: list[list[_Info]], specs: list[str], join: str, *,
                 in_channels: int, out_channels: int, ndim: int, stride: tuple[int, ...],
                 margin: tuple[int, ...], cheap: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self._infos = infos
        self.join = join
        self.in_channels, self.out_channels, self.ndim = in_channels, out_channels, ndim
        self.stride, self.margin, self.cheap = tuple(stride), tuple(margin), cheap
        self.spec = f"{join}[{', '.join(specs)}]"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _join([b(x) for b in self.branches], self.join)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"

    def _flat_infos(self) -> list[_Info]:
        out = [i for infos in self._infos for i in infos]
        out.append(_Info("join", ops=_join_ops(len(self.branches), self.join)))
        return out

    def expected_ops(self, allow_costlier: bool = True, *, extra_identity: bool = False) -> dict[str, int] | None:
        """Convs / batch norms / linears that execute after ``reparam.fuse(block, x, allow_costlier=...)``.

        None when the default cost guard makes it ill-defined (a block not drawn with ``cheap=True``).
        ``extra_identity``: the block's output is summed with its input before any non-linear op (a
        residual ``act(block(x) + x)``), which adds one identity branch and one add.
        """
        if not allow_costlier and not self.cheap:
            return None
        infos = self._flat_infos()
        if extra_identity:
            infos = [*infos, _Info("x", identity=True), _Info("join", ops=1)]
        conv, bn = _expected_main(infos, 0)
        return _counts(conv, bn)

    def min_size(self) -> int:
        """The smallest spatial size this block accepts (every dim)."""
        lo = 2 * max(self.margin, default=0) + 1
        for m in self.modules():  # reflect padding must be smaller than the input, circular at most as large
            if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
                lo = max(lo, max(m.padding) + 1)
            if isinstance(m, nn.AvgPool3d):  # avg_pool3d refuses inputs smaller than the kernel, padded or not
                lo = max(lo, max(m.kernel_size))
        return lo

    def output_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((s - 2 * m - 1) // st_ + 1 for s, m, st_ in zip(size, self.margin, self.stride))

    def example_input(self, batch: int = 2, size: int | tuple[int, ...] = 6, seed: int = 0,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """A seeded standard-normal input ``[batch, in_channels, *size]`` in the block's dtype."""
        return _input(self, batch, self.in_channels, size, self.ndim, seed, dtype)


def _input(module: nn.Module, batch: int, c: int, size, nd: int, seed: int, dtype) -> torch.Tensor:
    sizes = (size,) * nd if isinstance(size, int) else tuple(size)
    dtype = dtype or next((t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()),
                          torch.float32)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((batch, c, *sizes), generator=gen, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------------
# block strategy


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class _Ctx:
    nd: int
    cin: int
    cout: int
    stride: tuple[int, ...]
    margin: tuple[int, ...]
    cheap: bool
    anchor_k: tuple[int, ...] | None  # cheap: every kernel fits inside the anchor's
    anchor_d: tuple[int, ...] | None
    anchor_g: int | None
    depth: int
    mode: str = "zeros"  # padding mode of every conv

    @property
    def same_shape(self) -> bool:
        return self.cin == self.cout and all(s == 1 for s in self.stride) and not any(self.margin)

    @property
    def pool_ok(self) -> bool:
        return self.cin == self.cout


def _kernel(draw, ctx: _Ctx, max_kernel: int, dilated: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A kernel and dilation (odd sizes, so every branch is centered) that fit the block's margin."""
    ks, ds = [], []
    anchored = ctx.anchor_k is not None and ctx.anchor_d is not None
    for i in range(ctx.nd):
        choices = [k for k in (1, 3, 5) if k <= max_kernel]
        if anchored:
            choices = [k for k in choices if k <= ctx.anchor_k[i]] or [1]
        k = draw(st.sampled_from(choices))
        if anchored:  # cheap: the taps must lie on the anchor's grid
            d = ctx.anchor_d[i] if k > 1 else 1
        else:
            d = draw(st.sampled_from([1, 2])) if dilated and k > 1 else 1
        if d * (k - 1) // 2 < ctx.margin[i]:  # a 'valid' block: the kernel must cover the margin
            k, d = (ctx.anchor_k[i], ctx.anchor_d[i]) if anchored else (2 * ctx.margin[i] + 1, 1)
        ks.append(k)
        ds.append(d)
    return tuple(ks), tuple(ds)


def _groups(draw, ctx: _Ctx, cin: int, cout: int) -> int:
    opts = _divisors(math.gcd(cin, cout))
    if ctx.anchor_g is not None:
        opts = [g for g in opts if g % ctx.anchor_g == 0]
    return draw(st.sampled_from(opts))


def _conv_branch(draw, ctx: _Ctx, bn: bool, max_kernel: int, dilated: bool, k=None, d=None, g=None):
    if k is None:
        k, d = _kernel(draw, ctx, max_kernel, dilated)
    if g is None:
        g = _groups(draw, ctx, ctx.cin, ctx.cout)
    bias = draw(st.booleans())
    functional = draw(st.sampled_from([False, False, True]))
    pad = _pad_for(k, d, ctx.margin)
    functional = functional and ctx.mode == "zeros"
    m = _ConvBN(ctx.nd, ctx.cin, ctx.cout, k, ctx.stride, pad, d, g, bias, bn, functional, ctx.mode)
    dil = f"d{'x'.join(map(str, d))}" if any(v > 1 for v in d) else ""
    spec = (f"{'f' if functional else ''}conv{'x'.join(map(str, k))}{dil}" + (f"g{g}" if g > 1 else "")
            + ("+b" if bias else "") + ("+bn" if bn else ""))
    return m, [_Info("x", ops=1 + bn, convs=1, bns=int(bn), bias=bias or bn)], spec, (k, d, g)


@st.composite
def _branch(draw, ctx: _Ctx, kind: str, opts: dict) -> tuple[nn.Module, list[_Info], str]:
    nd = ctx.nd
    if kind in ("conv", "conv_bn"):
        m, infos, spec, _ = _conv_branch(draw, ctx, kind == "conv_bn", opts["max_kernel"], opts["dilated"])
        return m, infos, spec
    if kind == "bn":
        return _BN[nd](ctx.cin), [_Info("x", ops=1, bns=1, bias=True)], "bn"
    if kind == "identity":
        return _Identity(), [_Info("x", identity=True)], "id"
    if kind == "scale":
        return _Scale(nd, ctx.cin, draw(st.booleans())), [_Info("x", ops=1)], "scale"
    if kind == "avgpool":
        k, _ = _kernel(draw, ctx, 3, dilated=False)
        pad = _pad_for(k, (1,) * nd, ctx.margin)
        trivial = all(v == 1 for v in (*k, *ctx.stride))  # a 1x1 pool with stride 1 is the identity
        return (_POOL[nd](k, ctx.stride, pad, count_include_pad=True), [_Info("x", ops=1, identity=trivial)],
                f"avg{'x'.join(map(str, k))}")
    if kind == "chain":
        return _chain(draw, ctx, opts)
    if kind == "act":
        k, d = _kernel(draw, ctx, opts["max_kernel"], opts["dilated"])
        g = draw(st.sampled_from(_divisors(math.gcd(ctx.cin, ctx.cout))))
        body = _ConvBN(nd, ctx.cin, ctx.cout, k, ctx.stride, _pad_for(k, d, ctx.margin), d, g, draw(st.booleans()),
                       True, False, ctx.mode)
        act = draw(st.sampled_from(sorted(_ACTS)))
        return _Act(body, act), [_Info("act", head_convs=1)], f"conv{'x'.join(map(str, k))}+bn+{act}"
    if kind == "nested":
        inner = draw(_nested(ctx, opts))
        return inner, inner._flat_infos(), f"nested{inner.spec}"
    raise ValueError(f"unknown branch kind {kind!r}")


@st.composite
def _nested(draw, ctx: _Ctx, opts: dict) -> RepBlock:
    inner = _replace(ctx, depth=ctx.depth + 1)
    return draw(_block(inner, {**opts, "max_branches": min(opts["max_branches"], 3)}))


def _chain(draw, ctx: _Ctx, opts: dict):
    nd = ctx.nd
    pool_ok = ctx.pool_ok and not ctx.cheap and ctx.mode == "zeros"
    tail_kind = "pool" if pool_ok and draw(st.integers(0, 3)) == 0 else "conv"
    head_bn = draw(st.booleans())
    head_bias = draw(st.booleans())
    if tail_kind == "pool":
        mid = ctx.cout
    elif ctx.cheap:
        mid = draw(st.sampled_from([ctx.cin, 2 * ctx.cin]))
    else:
        mid = draw(st.sampled_from(sorted({ctx.cin, ctx.cout, max(1, ctx.cin // 2), 2 * ctx.cin})))
    head = _CONV[nd](ctx.cin, mid, 1, bias=head_bias)
    hbn = _BN[nd](mid) if head_bn else None
    if tail_kind == "pool":
        k, _ = _kernel(draw, ctx, 3, dilated=False)
        d = (1,) * nd
        pad = _pad_for(k, d, ctx.margin)
        tail = _POOL[nd](k, ctx.stride, pad, count_include_pad=True)
        g, tail_bias = 1, False
    else:
        k, d = _kernel(draw, ctx, opts["max_kernel"], opts["dilated"])
        g = 1 if ctx.cheap else draw(st.sampled_from(_divisors(math.gcd(mid, ctx.cout))))
        pad = _pad_for(k, d, ctx.margin)
        tail_bias = draw(st.booleans())
        tail = _CONV[nd](mid, ctx.cout, k, stride=ctx.stride, padding=pad, dilation=d, groups=g, bias=tail_bias,
                         padding_mode=ctx.mode)
    tail_bn = draw(st.booleans())
    tbn = _BN[nd](ctx.cout) if tail_bn else None
    padded = any(pad)
    # zero padding would not see the 1x1's bias; reflect/replicate/circular padding commutes with a pointwise map
    refused = padded and ctx.mode == "zeros" and (head_bn or head_bias)
    tail_is_conv = tail_kind == "conv"
    spec = (f"chain(1x1{'+b' if head_bias else ''}{'+bn' if head_bn else ''}->"
            f"{'conv' if tail_is_conv else 'avg'}{'x'.join(map(str, k))}{'p' if padded else ''}"
            f"{'g' + str(g) if g > 1 else ''}{'+bn' if tail_bn else ''}{' REFUSED' if refused else ''})")
    if refused:
        info = _Info("h", ops=1 + tail_bn, convs=int(tail_is_conv), bns=int(tail_bn), head_convs=1,
                     bias=tail_bias or tail_bn)
    else:
        info = _Info("x", ops=2 + head_bn + tail_bn, convs=1 + tail_is_conv, bns=head_bn + tail_bn,
                     bias=head_bias or head_bn or tail_bias or tail_bn)
    return _Chain(head, hbn, tail, tbn), [info], spec


def _replace(ctx: _Ctx, **kw) -> _Ctx:
    d = {f: getattr(ctx, f) for f in _Ctx.__dataclass_fields__}
    d.update(kw)
    return _Ctx(**d)


@st.composite
def _block(draw, ctx: _Ctx, opts: dict) -> RepBlock:
    kinds = [k for k in opts["kinds"] if k != "nested" or ctx.depth < opts["max_depth"]]
    if not ctx.same_shape:
        kinds = [k for k in kinds if k not in ("bn", "identity", "scale")]
    if not ctx.pool_ok or ctx.mode != "zeros":  # average pooling pads with zeros
        kinds = [k for k in kinds if k != "avgpool"]
    if not opts["allow_refused"]:
        kinds = [k for k in kinds if k != "act"]
    if ctx.anchor_g is not None and ctx.anchor_g > 1:  # cheap: a chain composes into a dense kernel
        kinds = [k for k in kinds if k != "chain"]
    if ctx.anchor_d is not None and any(d > 1 for d in ctx.anchor_d):  # cheap: pool taps off the grid
        kinds = [k for k in kinds if k != "avgpool"]
    if not kinds:
        kinds = ["conv_bn"]
    n = draw(st.integers(2, max(2, opts["max_branches"])))
    branches: list[tuple[nn.Module, list[_Info], str]] = []
    if ctx.cheap:
        # the anchor: a conv whose kernel contains every other branch's, summed first, so that no partial
        # sum is costlier than its parts (a nested block repeats its parent's anchor)
        if ctx.anchor_k is None:
            k, d = _kernel(draw, ctx, opts["max_kernel"], opts["dilated"])
            g = None
        else:
            k, d, g = ctx.anchor_k, ctx.anchor_d, ctx.anchor_g
        m, infos, spec, (k, d, g) = _conv_branch(draw, ctx, draw(st.booleans()), opts["max_kernel"],
                                                 opts["dilated"], k=k, d=d, g=g)
        branches.append((m, infos, spec))
        ctx = _replace(ctx, anchor_k=k, anchor_d=d, anchor_g=g)
        if g > 1:
            kinds = [k for k in kinds if k != "chain"] or ["conv_bn"]
        if any(v > 1 for v in d):
            kinds = [k for k in kinds if k != "avgpool"] or ["conv_bn"]
    while len(branches) < n:
        kind = draw(st.sampled_from(kinds))
        m, infos, spec = draw(_branch(ctx, kind, opts))
        if not opts["allow_refused"] and any(i.source != "x" for i in infos):
            m, infos, spec, _ = _conv_branch(draw, ctx, True, opts["max_kernel"], opts["dilated"])
        branches.append((m, infos, spec))
    if all(isinstance(b[0], _Identity) for b in branches):  # x + x: the input would have one user
        m, infos, spec, _ = _conv_branch(draw, ctx, True, opts["max_kernel"], opts["dilated"])
        branches[-1] = (m, infos, spec)
    joins = [j for j in opts["joins"] if not (ctx.cheap and j == "tree")] or ["plus"]
    join = draw(st.sampled_from(joins))
    if join == "iadd":  # never start an in-place sum on the block's input (an identity branch)
        first = next((i for i, b in enumerate(branches) if not isinstance(b[0], _Identity)), None)
        if first is None:
            join = "plus"
        elif first:
            branches.insert(0, branches.pop(first))
    return RepBlock([b[0] for b in branches], [b[1] for b in branches], [b[2] for b in branches], join,
                    in_channels=ctx.cin, out_channels=ctx.cout, ndim=ctx.nd, stride=ctx.stride,
                    margin=ctx.margin, cheap=ctx.cheap)


def _resolve(draw, value: Any, default: st.SearchStrategy) -> Any:
    if value is None:
        return draw(default)
    if isinstance(value, st.SearchStrategy):
        return draw(value)
    return value


@st.composite
def rep_blocks(
    draw,
    channels: int | st.SearchStrategy[int] | None = None,
    ndim: int | st.SearchStrategy[int] = 2,
    *,
    out_channels: int | st.SearchStrategy[int] | None = None,
    stride: int | st.SearchStrategy[int] | None = 1,
    valid: bool | None = False,
    kinds: tuple[str, ...] = BRANCH_KINDS,
    joins: tuple[str, ...] = JOINS,
    max_branches: int = 4,
    max_kernel: int = 3,
    dilated: bool = True,
    max_depth: int = 1,
    allow_refused: bool = True,
    cheap: bool | None = False,
    padding_mode: str | st.SearchStrategy[str] | None = "zeros",
    seed: int | st.SearchStrategy[int] | None = None,
) -> RepBlock:
    """Draw a random re-parameterizable :class:`RepBlock` with random weights and BN statistics.

    - ``channels`` (default 1-6) input channels; ``out_channels`` defaults to ``channels`` (a different
      count rules out the identity, BN, scale and pooling branches), ``stride`` is shared by every branch
      (> 1 rules out identity, BN and scale; None draws 1 or 2).
    - ``valid=True`` draws a block whose branches pad less than 'same' by a margin (so some 1x1->BN->kxk
      chains are unpadded and fold); None draws it.
    - ``kinds``/``joins``: the branch kinds and join styles to draw from (:data:`BRANCH_KINDS`,
      :data:`JOINS`); ``max_depth`` bounds the nesting of sub-blocks.
    - ``allow_refused=False`` draws only blocks that must become exactly one conv (no activation branch,
      no padded chain after a bias).
    - ``cheap=True`` draws blocks where no fusion step raises the MAC count, so the default cost guard
      refuses nothing and ``expected_ops(allow_costlier=False)`` is defined; None draws it.
    - ``padding_mode``: of every conv ("zeros", "reflect", "replicate", "circular"; None draws it). With a
      non-zero mode there are no pooling branches, and padded chains fold (the padding commutes with the
      1x1 before it). Reflect/circular padding needs inputs at least as large as the padding (+1).
    """
    nd = int(_resolve(draw, ndim, st.integers(1, 3)))
    cin = int(_resolve(draw, channels, st.integers(1, 6)))
    cout = cin if out_channels is None else int(_resolve(draw, out_channels, st.nothing()))
    s = int(_resolve(draw, stride, st.sampled_from([1, 2])))
    is_valid = bool(_resolve(draw, valid, st.booleans()))
    is_cheap = bool(_resolve(draw, cheap, st.booleans()))
    margin = tuple(draw(st.sampled_from([0, 1])) for _ in range(nd)) if is_valid else (0,) * nd
    if is_valid and not any(margin):
        margin = (1,) + (0,) * (nd - 1)
    seed_v = int(_resolve(draw, seed, st.integers(0, 2**31 - 1)))
    mode = str(_resolve(draw, padding_mode, st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])))
    ctx = _Ctx(nd, cin, cout, (s,) * nd, margin, is_cheap, None, None, None, 0, mode)
    opts = {"kinds": tuple(kinds), "joins": tuple(joins), "max_branches": max_branches, "max_kernel": max_kernel,
            "dilated": dilated, "max_depth": max_depth, "allow_refused": allow_refused}
    with torch.random.fork_rng():
        torch.manual_seed(seed_v)
        block = draw(_block(ctx, opts))
    randomize_bn_(block, seed_v)
    block.eval()
    if mode != "zeros":
        block.spec = f"{mode}:{block.spec}"
    return block


# ------------------------------------------------------------------------------------------------------
# networks


class _Stem(nn.Module):
    """conv + BN + activation (also used for a plain conv stage)."""

    def __init__(self, nd: int, cin: int, cout: int, k: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv = _CONV[nd](cin, cout, k, stride, k // 2, bias=False)
        self.bn = _BN[nd](cout)
        self.act = _ACTS[act]()
        self.k, self.s = k, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def out_size(self, size):
        return tuple((v + 2 * (self.k // 2) - self.k) // self.s + 1 for v in size)


class _BlockStage(nn.Module):
    """``act(block(x))``, ``act(block(x)) + x`` ("post") or ``act(block(x) + x)`` ("pre")."""

    def __init__(self, block: RepBlock, act: str, residual: str | None) -> None:
        super().__init__()
        self.block, self.act, self.residual = block, _ACTS[act](), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.residual == "pre":
            return self.act(y + x)
        y = self.act(y)
        return y + x if self.residual == "post" else y

    def out_size(self, size):
        return self.block.output_size(size)


class _ConvTStage(nn.Module):
    """ConvTranspose + BN + activation (upsampling by 2)."""

    def __init__(self, nd: int, cin: int, cout: int, k: int, groups: int, act: str) -> None:
        super().__init__()
        self.conv = _CONVT[nd](cin, cout, k, stride=2, padding=(k - 2) // 2, groups=groups,
                               bias=bool(k % 2 == 0 and groups == 1))
        self.bn = _BN[nd](cout)
        self.act = _ACTS[act]()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def out_size(self, size):
        return tuple((v - 1) * 2 - 2 * ((self.k - 2) // 2) + self.k for v in size)


class _Head(nn.Module):
    """global average -> Linear -> BatchNorm1d -> activation -> Linear."""

    def __init__(self, nd: int, c: int, hidden: int, classes: int, act: str) -> None:
        super().__init__()
        self.dims = tuple(range(2, 2 + nd))
        self.fc1, self.bn, self.act, self.fc2 = nn.Linear(c, hidden), nn.BatchNorm1d(hidden), _ACTS[act](), \
            nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn(self.fc1(x.mean(self.dims)))))


# ------------------------------------------------------------------------------------------------------
# idioms of third-party model code (timm, torchvision, detection models), each a stage with known counts


class _BNAct(nn.modules.batchnorm._BatchNorm):
    """timm's BatchNormAct: asserts its input's rank, calls F.batch_norm, then an activation."""

    def __init__(self, nd: int, c: int, act: str | None) -> None:
        super().__init__(c)
        self.rank, self.act = nd + 2, nn.Identity() if act is None else _ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == self.rank, "unexpected input rank")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class _SameConv(nn.Conv2d):
    """TF-"same" padding computed from the input size at run time (not traceable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        kh, kw = self.kernel_size
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _Attention(nn.Module):
    """Softmax attention over positions with a residual (two 1x1 convs, a dropout): nothing in it folds."""

    def __init__(self, nd: int, c: int) -> None:
        super().__init__()
        self.q, self.k = _CONV[nd](c, c, 1), _CONV[nd](c, c, 1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x).flatten(2), self.k(x).flatten(2)
        a = self.drop(torch.softmax(q.transpose(1, 2) @ k / x.shape[1] ** 0.5, -1))
        return x + (x.flatten(2) @ a.transpose(1, 2)).view(x.shape)


class _ShapeAttention(nn.Module):
    """Attention over positions that reads its input's sizes (``x.shape``) and projects it with one qkv conv."""

    def __init__(self, nd: int, c: int) -> None:
        super().__init__()
        self.qkv, self.proj = _CONV[nd](c, 3 * c, 1, bias=False), _CONV[nd](c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q, k, v = self.qkv(x).reshape(b, 3, c, -1).unbind(1)
        a = torch.softmax(q.transpose(1, 2) @ k / c**0.5, -1)
        return self.proj((v @ a.transpose(1, 2)).reshape(x.shape))


class _Idiom(nn.Module):
    """One idiom stage; ``kind`` names it, ``counts`` is what runs after fusion, ``out_channels`` its width."""

    KINDS_ANY = ("bnact", "split_bn", "mixconv", "prenorm", "layerscale", "preact", "gated", "c2f", "attention",
                 "tokens", "normed_attention")
    KINDS_2D = ("shuffle", "tf_same")

    def __init__(self, kind: str, nd: int, c: int, act: str) -> None:
        super().__init__()
        self.kind, self.nd, self.c = kind, nd, c
        conv, bn = _CONV[nd], _BN[nd]
        h = c // 2 or 1
        self.act = _ACTS[act]()
        self.out_channels = c
        costlier = None  # what runs when a costlier rewrite is allowed, where that differs
        if kind == "bnact":  # conv -> BatchNormAct (rank assert): one conv
            self.conv, self.bn = conv(c, c, 3, padding=1, bias=False), _BNAct(nd, c, act)
            counts = _counts(conv=1)
        elif kind == "split_bn":  # conv, split along channels, a BN on each piece
            self.conv = conv(c, 2 * c + 1, 3, padding=1)
            self.bn_a, self.bn_b = bn(c), bn(c + 1)
            self.out_channels = 2 * c + 1
            counts = _counts(conv=1)
        elif kind == "mixconv":  # per-group depthwise kernels of two sizes, concatenated, then BN
            self.c3 = conv(h, h, 3, padding=1, groups=h, bias=False)
            self.c5 = conv(c - h, c - h, 5, padding=2, groups=c - h, bias=False) if c > h else None
            self.bn = _BNAct(nd, c, act)
            counts = _counts(conv=2 if c > h else 1)
        elif kind == "prenorm":  # act -> BN read by three unpadded 1x1 convs
            self.norm = bn(c)
            self.q, self.k, self.v = (conv(c, c, 1) for _ in range(3))
            counts = _counts(conv=3)
        elif kind == "layerscale":  # x + gamma[C, 1, ..] * bn(conv(x))
            self.conv, self.bn = conv(c, c, 3, padding=1, bias=False), bn(c)
            self.gamma = nn.Parameter(0.5 + torch.rand((c,) + (1,) * nd))
            counts = _counts(conv=1)
        elif kind == "gated":  # act(x + a * (bn(conv(act(conv(x)))) - x)): the gated sum stays, the BN folds
            self.fc1, self.fc2 = conv(c, 2 * c, 1), conv(2 * c, c, 1, bias=False)
            self.bn = bn(c)
            self.alpha = nn.Parameter(torch.randn(c))
            counts = _counts(conv=2)
            costlier = _counts(conv=3)  # allow_costlier: (1 - a) * x becomes a conv of its own
        elif kind == "c2f":  # YOLO's C2f: list(conv_bn_act(x).chunk(2, 1)), extended by a block, concatenated
            self.cv1 = nn.Sequential(conv(c, 2 * h, 1, bias=False), bn(2 * h), _ACTS[act]())
            self.m = nn.Sequential(conv(h, h, 3, padding=1, bias=False), bn(h), _ACTS[act]())
            self.cv2 = nn.Sequential(conv(3 * h, c, 1, bias=False), bn(c))
            counts = _counts(conv=3)
        elif kind == "preact":  # BN -> act -> conv: the BN cannot fold (it stays)
            self.bn, self.conv = bn(c), conv(c, c, 3, padding=1)
            counts = _counts(conv=1, batch_norm=1)
        elif kind == "shuffle":  # two conv+BN branches, concatenated, channel shuffle (contiguous before view)
            self.a, self.b = nn.Sequential(conv(c, c, 1), bn(c)), nn.Sequential(conv(c, c, 3, padding=1), bn(c))
            self.out_channels = 2 * c
            counts = _counts(conv=2)
        elif kind == "attention":  # conv -> BN -> act -> an attention submodule no fold touches (called whole)
            self.conv, self.bn, self.attn = conv(c, c, 3, padding=1, bias=False), bn(c), _Attention(nd, c)
            counts = _counts(conv=3)
        elif kind == "tokens":  # MaxViT's stage change: a Linear on channels-last tokens, permuted back, then
            # a BatchNormAct -> 1x1 conv and a pooled shortcut: only the BN's statistics give the channel count
            self.fc, self.norm = nn.Linear(c, c), _BNAct(nd, c, None)
            self.conv = conv(c, c, 1)
            self.shortcut = nn.Sequential(_POOL[nd](3, 1, 1), conv(c, c, 1, bias=False))
            counts = _counts(conv=2, linear=1)
            costlier = _counts(conv=1, linear=1)  # allow_costlier: the pooled 1x1 as a 3x3, summed with the other
        elif kind == "normed_attention":  # x + attn(bn(x)) (Visformer): the BN's sizes are read, it folds into qkv
            self.norm, self.attn = bn(c), _ShapeAttention(nd, c)
            counts = _counts(conv=2)
        elif kind == "tf_same":  # run-time padded conv (untraceable) -> BN
            self.conv, self.bn = _SameConv(c, c, 3, stride=1, bias=False), bn(c)
            counts = _counts(conv=1)
        else:
            raise ValueError(f"unknown idiom {kind!r}")
        self.counts = counts
        self.counts_costlier = costlier or counts

    def expected(self, allow_costlier: bool) -> dict[str, int]:
        """What runs after fusion (a costlier rewrite may be allowed to add convs)."""
        return self.counts_costlier if allow_costlier else self.counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "bnact":
            return self.bn(self.conv(x))
        if k == "split_bn":
            a, b = torch.split(self.conv(x), [self.c, self.c + 1], dim=1)
            return self.act(torch.cat([self.bn_a(a), self.bn_b(b)], 1))
        if k == "mixconv":
            h = self.c // 2 or 1
            if self.c5 is None:
                return self.bn(self.c3(x))
            x0, x1 = torch.split(x, [h, self.c - h], 1)
            return self.bn(torch.cat([self.c3(x0), self.c5(x1)], 1))
        if k == "prenorm":
            y = self.norm(self.act(x))
            return self.act(self.q(y) * torch.sigmoid(self.k(y)) + self.v(y))
        if k == "layerscale":
            return self.act(x + self.gamma * self.bn(self.conv(x)))
        if k == "c2f":
            y = list(self.cv1(x).chunk(2, 1))
            y.append(self.m(y[-1]))
            return self.act(self.cv2(torch.cat(y, 1)))
        if k == "preact":
            return self.act(self.conv(self.act(self.bn(x))))
        if k == "gated":
            a = torch.sigmoid(self.alpha).view((-1,) + (1,) * self.nd)
            return self.act(x + a * (self.bn(self.fc2(self.act(self.fc1(x)))) - x))
        if k == "attention":
            return self.attn(self.act(self.bn(self.conv(x))))
        if k == "normed_attention":
            return x + self.attn(self.norm(x))
        if k == "tokens":
            t = x.permute(0, *range(2, self.nd + 2), 1)
            y = (t + self.fc(t)).permute(0, self.nd + 1, *range(1, self.nd + 1))
            return self.act(self.shortcut(y) + self.conv(self.norm(y)))
        if k == "shuffle":
            y = torch.cat([self.a(x), self.b(x)], 1)
            b, c, h, w = y.shape
            return self.act(y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w))
        return self.act(self.bn(self.conv(x)))

    def out_size(self, size):
        return size


class RepNet(nn.Module):
    """A random network: stem, stages (blocks, conv, transposed conv, idioms of third-party code), optional
    classifier head.

    Attributes: ``in_channels``, ``ndim``, ``input_size`` (a valid spatial size), ``cheap``, ``spec``.
    """

    def __init__(self, stages: list[nn.Module], expected: list[dict[str, int] | None], specs: list[str], *,
                 in_channels: int, ndim: int, input_size: tuple[int, ...], cheap: bool, exact: bool = True) -> None:
        super().__init__()
        self.exact = exact
        self.stages = nn.ModuleList(stages)
        self._expected = expected
        self.in_channels, self.ndim, self.input_size, self.cheap = in_channels, ndim, input_size, cheap
        self.spec = " -> ".join(specs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"

    def expected_ops(self, allow_costlier: bool = True) -> dict[str, int] | None:
        """Convs / batch norms / linears that execute after ``reparam.fuse(net, x, allow_costlier=...)``;
        None when not well defined (see :func:`architectures`)."""
        if not self.exact:
            return None
        total = _counts()
        for stage, e in zip(self.stages, self._expected):
            if isinstance(stage, _BlockStage):
                e = stage.block.expected_ops(allow_costlier, extra_identity=stage.residual == "pre")
                if e is None:
                    return None
            elif isinstance(stage, _Idiom):
                e = stage.expected(allow_costlier)
            total = _add_counts(total, e)
        return total

    def example_input(self, batch: int = 2, seed: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A seeded standard-normal input ``[batch, in_channels, *input_size]``."""
        return _input(self, batch, self.in_channels, self.input_size, self.ndim, seed, dtype)


@st.composite
def architectures(
    draw,
    in_channels: int | st.SearchStrategy[int] | None = None,
    ndim: int | st.SearchStrategy[int] = 2,
    *,
    max_stages: int = 4,
    channels: int | st.SearchStrategy[int] | None = None,
    head: bool | None = None,
    transposed: bool = True,
    block_options: dict | None = None,
    cheap: bool | None = False,
    residual_into_linear: bool = False,
    idioms: bool = True,
    seed: int | st.SearchStrategy[int] | None = None,
) -> RepNet:
    """Draw a random :class:`RepNet`: a conv+BN+act stem, 1-``max_stages`` stages and maybe a head.

    Stages are :func:`rep_blocks` (stride 1 or 2, channel changes, 'valid' blocks) followed by an
    activation and sometimes a residual add (before or after the activation), plain conv+BN+act layers,
    and ConvTranspose+BN+act upsampling; the head is global average -> Linear -> BatchNorm1d -> act ->
    Linear.  ``block_options`` are passed to :func:`rep_blocks` (e.g. ``{"allow_refused": False}``);
    ``cheap`` as there.  ``net.expected_ops(...)`` counts what must still execute after fusion.

    A residual add after the activation (``act(block(x)) + x``) is a linear value; by default the next
    stage then never starts with linear ops (the residual is moved before the activation instead).
    ``residual_into_linear=True`` lets such an add feed a block or a conv directly; whether fusing through
    the add pays off is then the planner's choice, so ``expected_ops`` is None for those networks.

    ``idioms`` adds stages written the way third-party code writes them: a BatchNormAct layer that asserts
    its input's rank, BNs on split pieces of one conv, MixConv (concatenated per-group kernels then BN), a BN
    read by several 1x1 convs, a ``[C, 1, ...]`` layer scale, BN -> act -> conv (its BN stays), YOLO's C2f
    (a list of a conv's chunks, extended and concatenated), an attention submodule after a conv+BN that no
    fold touches (the result calls it whole), MaxViT's stage change (channels-last tokens permuted back, a
    BatchNormAct then a 1x1 conv), ``x + attn(bn(x))`` with an attention reading its input's sizes, and in 2-D
    a channel shuffle and a TF-"same" conv padded at run time.
    """
    nd = int(_resolve(draw, ndim, st.integers(1, 3)))
    cin = int(_resolve(draw, in_channels, st.integers(1, 4)))
    c = int(_resolve(draw, channels, st.integers(2, 6)))
    is_cheap = bool(_resolve(draw, cheap, st.booleans()))
    seed_v = int(_resolve(draw, seed, st.integers(0, 2**31 - 1)))
    with_head = bool(_resolve(draw, head, st.booleans()))
    bopts = dict(block_options or {})
    acts = sorted(_ACTS)
    stages: list[nn.Module] = []
    expected: list[dict[str, int] | None] = []
    specs: list[str] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed_v)
        stem_s = draw(st.sampled_from([1, 2]))
        stages.append(_Stem(nd, cin, c, 3, stem_s, draw(st.sampled_from(acts))))
        expected.append(_counts(conv=1))
        specs.append(f"stem(s{stem_s})")
        last_post = False  # the previous stage ended with a residual add (a linear value)
        exact = True
        for _ in range(draw(st.integers(1, max_stages))):
            kinds = ["block", "block", "block", "conv"] + (["convT"] if transposed else [])
            kinds += ["idiom", "idiom"] if idioms else []
            kind = draw(st.sampled_from(kinds))
            if last_post and kind in ("block", "conv", "idiom"):
                if residual_into_linear:
                    exact = False
                else:  # act(block(x)) + x -> act(block(x) + x)
                    stages[-1].residual = "pre"
                    specs[-1] = specs[-1].replace("res-post", "res-pre")
            act = draw(st.sampled_from(acts))
            if kind == "block":
                s = draw(st.sampled_from([1, 1, 2]))
                cout = draw(st.sampled_from([c, c, max(1, c // 2), c + 2]))
                options = {"valid": draw(st.sampled_from([False, False, True])), "cheap": is_cheap, **bopts}
                block = draw(rep_blocks(c, nd, out_channels=cout, stride=s, seed=draw(st.integers(0, 2**31 - 1)),
                                        **options))
                residual = None
                if block.in_channels == block.out_channels and s == 1 and not any(block.margin):
                    residual = draw(st.sampled_from([None, "pre", "post"]))
                stages.append(_BlockStage(block, act, residual))
                expected.append(None)
                specs.append(f"block({block.spec}, {act}{', res-' + residual if residual else ''})")
                last_post = residual == "post"
                c = cout
            elif kind == "conv":
                cout = draw(st.sampled_from([c, c + 2]))
                k = draw(st.sampled_from([1, 3]))
                stages.append(_Stem(nd, c, cout, k, 1, act))
                expected.append(_counts(conv=1))
                specs.append(f"conv{k}+bn+{act}")
                last_post, c = False, cout
            elif kind == "idiom":
                which = draw(st.sampled_from(_Idiom.KINDS_ANY + (_Idiom.KINDS_2D if nd == 2 else ())))
                stage = _Idiom(which, nd, c, act)
                stages.append(stage)
                expected.append(stage.counts)
                specs.append(f"idiom({which}, {act})")
                last_post, c = False, stage.out_channels
            else:
                cout = draw(st.sampled_from([c, max(1, c // 2)]))
                k = draw(st.sampled_from([2, 3, 4]))
                g = draw(st.sampled_from(_divisors(math.gcd(c, cout))))
                stages.append(_ConvTStage(nd, c, cout, k, g, act))
                expected.append(_counts(conv=1))
                specs.append(f"convT{k}g{g}+bn+{act}")
                last_post, c = False, cout
        if with_head:
            stages.append(_Head(nd, c, draw(st.sampled_from([3, 5])), draw(st.sampled_from([2, 4])),
                                draw(st.sampled_from(acts))))
            expected.append(_counts(linear=2))
            specs.append("head(mean, linear+bn1d, linear)")
    size = _valid_size(stages, nd, draw(st.integers(4, 9)))
    net = RepNet(stages, expected, specs, in_channels=cin, ndim=nd, input_size=size, cheap=is_cheap, exact=exact)
    randomize_bn_(net, seed_v)
    net.eval()
    return net


def _valid_size(stages: list[nn.Module], nd: int, start: int) -> tuple[int, ...]:
    """The smallest size >= ``start`` for which every stage gets a big enough input."""
    for s in range(start, 512):
        size, ok = (s,) * nd, True
        for stage in stages:
            if isinstance(stage, _BlockStage) and min(size) < stage.block.min_size():
                ok = False
                break
            if hasattr(stage, "out_size"):
                size = stage.out_size(size)
            if min(size) < 1:
                ok = False
                break
        if ok:
            return (s,) * nd
    raise ValueError("no valid input size")  # pragma: no cover


def tensors(shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]], dtype: torch.dtype = torch.float32,
            scale: float = 1.0) -> st.SearchStrategy[torch.Tensor]:
    """Seeded standard-normal tensors of ``shape`` (fixed or drawn) times ``scale``, cast to ``dtype``.

    Drawing a seed rather than every element keeps examples fast; the seed is what shrinks.
    """
    shapes = shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape))

    def make(args: tuple[tuple[int, ...], int]) -> torch.Tensor:
        shp, seed = args
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(tuple(shp), generator=gen, dtype=torch.float64) * scale).to(dtype)

    return st.tuples(shapes, st.integers(0, 2**31 - 1)).map(make)


class _CallableModule(types.ModuleType):
    """``reparam.testing.architectures`` names both this module and its network strategy: calling the
    module calls :func:`architectures`, so ``from reparam.testing import architectures`` works either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> st.SearchStrategy[RepNet]:
        return architectures(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
