"""Deferred kernels: a fused kernel kept as a sum of scaled, placed parts until it is needed.

The planner folds a BN into a conv or adds branches thousands of times while it decides what to collapse;
doing each step on float64 copies of the weights costs several full passes over a large model's memory.
A :class:`KernelSum` records the steps instead (``sum over parts of scale[o] * part.weight``, each part
placed in a common window) and :meth:`KernelSum.evaluate` computes the kernel once, straight into the
target dtype: every element is its exact float64 value rounded once, the same result as computing in
float64 and casting, without the float64 copy of the whole kernel.  Part weights are only ever read, so
they may be views of the caller's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod  # (bound here: fx may patch the math module while a fusion traces)

import numpy as np

from .conv_algebra import _add_regrouped, _window_slices, sum_geometry, zeros_placeholder
from .errors import NotFusable
from .precision import NATIVE_FLOATS, all_finite, cast_array, f64
from .types import Conv


def placeholder(conv: Conv) -> Conv:
    """``conv``'s geometry, bias-free, with a zero-memory read-only kernel of the same shape."""
    return conv._evolve(weight=zeros_placeholder(conv.weight.shape), bias=None)


@dataclass(frozen=True)
class Part:
    """``scale[o] * conv.weight[o, c] * in_scale[i]``, ``i`` the input channel that ``[o, c]`` reads (a scale
    None means 1); ``unit`` marks the identity kernel of a source."""

    conv: Conv
    scale: np.ndarray | None = None
    unit: bool = False
    in_scale: np.ndarray | None = None


@dataclass(frozen=True)
class KernelSum:
    """A bias-free conv kernel kept as parts; ``geometry`` holds its shape, stride, padding, dilation, groups."""

    geometry: Conv
    parts: tuple[Part, ...]

    @classmethod
    def of(cls, conv: Conv, *, unit: bool = False) -> KernelSum:
        """One part holding ``conv``'s kernel (its bias is dropped: values carry biases separately)."""
        if conv.weight.dtype not in NATIVE_FLOATS:  # e.g. bfloat16: numpy ufuncs cannot mix it with float64
            conv = conv.with_(weight=f64(conv.weight))
        conv = conv._evolve(bias=None) if conv.bias is not None else conv
        return cls(placeholder(conv), (Part(conv, unit=unit),))

    @property
    def is_unit(self) -> bool:
        """Exactly a source's identity (nothing applied yet)."""
        return len(self.parts) == 1 and self.parts[0].unit and self.parts[0].scale is None and (
            self.parts[0].in_scale is None)

    def scaled(self, scale: np.ndarray) -> KernelSum:
        """The kernel with output channel ``o`` multiplied by ``scale[o]`` (float64), deferred."""
        parts = tuple(Part(p.conv, scale if p.scale is None else p.scale * scale, p.unit, p.in_scale)
                      for p in self.parts)
        return KernelSum(self.geometry, parts)

    def scaled_inputs(self, scale: np.ndarray) -> KernelSum:
        """The kernel applied to its input with channel ``i`` multiplied by ``scale[i]`` (float64): a per-channel
        map (a BN, a layer scale) composed before it, deferred like :meth:`scaled`, so a large kernel is not
        copied to float64 and multiplied whole while the planner decides."""
        parts = tuple(Part(p.conv, p.scale, p.unit, scale if p.in_scale is None else p.in_scale * scale)
                      for p in self.parts)
        return KernelSum(self.geometry, parts)

    def evaluate(self, dtype=np.float64, out: np.ndarray | None = None) -> np.ndarray:
        """The kernel as a new array of ``dtype`` (float16/32/64), each element rounded once from float64.

        ``out``: an array of the kernel's shape and ``dtype`` to write into instead (a frontend can pass
        the memory of the tensor that will hold the kernel).
        """
        return self._evaluate(dtype, out)[0]

    def evaluate_rows(self, r0: int, r1: int) -> np.ndarray:
        """Output channels ``r0:r1`` of the kernel in float64, the rest not computed (a cheap first look)."""
        shape = self.geometry.weight.shape
        dest = np.empty((r1 - r0,) + shape[1:])
        self._blocks(zeros_placeholder(shape)).rows(r0, r1, dest)
        return dest

    def _evaluate(self, dtype, out: np.ndarray | None, threads: int = 1) -> tuple[np.ndarray, bool]:
        """The kernel and whether every value of it is finite (checked once it is written)."""
        shape = self.geometry.weight.shape
        if out is not None and (out.shape != shape or out.dtype != np.dtype(dtype)):
            raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}, expected {shape} and {dtype}")
        if out is None or not out.flags.c_contiguous:
            target = np.empty(shape, dtype)
        else:
            target = out
        finite = self._blocks(target).run(threads)
        if target is not out and out is not None:
            out[...] = target
            target = out
        return target, finite

    def _blocks(self, target: np.ndarray) -> _Blocks:
        """The parts placed in the kernel's window, to be computed into ``target``."""
        g = self.geometry
        start = tuple(-b for b, _ in g.padding)
        placed = [(p, _window_slices(p.conv, start, g.dilation, g.kernel_size)[0]) for p in self.parts]
        full = (slice(None), slice(None), *(slice(0, k, 1) for k in g.kernel_size))
        main = next((k for k, (p, where) in enumerate(placed)
                     if where == full and p.conv.groups == g.groups), None)
        rest = placed if main is None else placed[:main] + placed[main + 1:]
        return _Blocks(target, None if main is None else placed[main][0], rest, g.groups)

    def to_conv(self, dtype=np.float64, bias: np.ndarray | None = None, what: str = "fused weight",
                out: np.ndarray | None = None, threads: int = 1) -> Conv:
        """The kernel (and ``bias``) as a :class:`Conv` of ``dtype`` (kernel written into ``out`` if given);
        a non-finite result is refused.  ``threads``: split a large kernel's output channels among that
        many threads (numpy releases the GIL while it computes, and first writes to fresh memory, page
        faults, are handled in parallel too)."""
        if np.dtype(dtype) not in NATIVE_FLOATS:  # bfloat16 and friends: round once from float64
            w = cast_array(self.evaluate(), dtype, what)
            b = None if bias is None else cast_array(f64(bias), dtype, "fused bias")
            return self.geometry.with_(weight=w, bias=b)
        w, finite = self._evaluate(dtype, out, threads)
        if not finite:
            cast_array(self.evaluate(), dtype, what)  # raises with the reason (overflow or non-finite input)
            raise NotFusable(f"{what} has non-finite values after folding")
        b = None if bias is None else cast_array(f64(bias), dtype, "fused bias")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"bias of shape {b.shape} for a kernel of {w.shape[0]} output channels")
        return self.geometry._evolve(weight=w, bias=b)  # (the geometry's own shape: nothing to validate again)


_BLOCK = 262144  # float64 elements per block (2 MiB): few numpy calls per kernel, the block stays in cache
_THREADED = 1 << 22  # kernels of 4M+ elements are split among threads when asked to (smaller: no gain measured)


class _Blocks:
    """Fill C-contiguous ``out`` with ``main + sum(rest)``, block by block of output channels.

    Each block is computed in a float64 buffer (``main`` spans the whole window at the kernel's groups and
    is copied and scaled; the other parts are added at their taps) and rounded once into ``out``, so the
    kernel is read and written once and never held in float64 as a whole; every temporary is block-sized.
    When the other parts touch a strict sub-box of the taps (RepVGG's 1x1 and identity sit at the centre of
    the 3x3), they are summed over that box first and the box is added to the block in one step.
    """

    def __init__(self, out: np.ndarray, main: Part | None, rest: list[tuple[Part, tuple]], groups: int) -> None:
        self.out, self.main, self.rest, self.groups = out, main, rest, groups
        self.box: tuple[slice, ...] | None = None
        if main is not None and rest:
            box = tuple(slice(min(w[d].start for _, w in rest), max(w[d].stop for _, w in rest))
                        for d in range(2, out.ndim))
            if prod(b.stop - b.start for b in box) < prod(out.shape[2:]):
                self.box = box
                self.rest = [(p, (*where[:2], *(slice(w.start - b.start, w.stop - b.start, w.step)
                                                for w, b in zip(where[2:], box)))) for p, where in rest]

    def run(self, threads: int = 1) -> bool:
        """Compute every block, on up to ``threads`` threads for a large kernel; True if all values are finite."""
        n = self.out.shape[0]
        if threads <= 1 or self.out.size < _THREADED or n < 2:
            return self.rows(0, n)
        cuts = [n * k // threads for k in range(threads + 1)]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reparam-kernel") as pool:
            return all(list(pool.map(self.rows, cuts[:-1], cuts[1:])))

    def rows(self, r0: int, r1: int, dest: np.ndarray | None = None) -> bool:
        """Compute output channels ``r0:r1`` (into ``dest``, holding just those rows, if given); True if they
        are all finite."""
        out, main = self.out, self.main
        rows = out[r0:r1] if dest is None else dest
        factor = None if self.rest or main is None else _one_factor(main, r0, r1)
        if factor is not None:  # one ufunc call: widened, multiplied and rounded element by element
            with np.errstate(over="ignore", invalid="ignore"):
                np.multiply(main.conv.weight[r0:r1], factor, out=rows, dtype=np.float64, casting="unsafe")
            return all_finite(rows)
        per = prod(out.shape[1:])
        step = max(1, min(r1 - r0, max(8, _BLOCK // max(per, 1))))
        buf = np.empty((step,) + out.shape[1:])
        if self.box is not None:
            box_buf = np.empty((step,) + out.shape[1:2] + tuple(b.stop - b.start for b in self.box))
            at = (slice(None), slice(None), *self.box)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported as a refusal instead
            for i in range(r0, r1, step):
                j = min(i + step, r1)
                b = buf[: j - i]
                if main is None:
                    b.fill(0.0)
                else:
                    _widened_rows(main, i, j, b)
                target = b
                if self.box is not None:
                    target = box_buf[: j - i]
                    target.fill(0.0)
                for p, where in self.rest:
                    _add_rows(target, p, where, self.groups, i, j)
                if self.box is not None:
                    b[at] += target
                np.copyto(out[i:j] if dest is None else dest[i - r0:j - r0], b, casting="unsafe")
        # one check over the rows written: cheaper than one per block (two reductions each), measured
        return all_finite(rows)


def _one_factor(p: Part, r0: int, r1: int) -> np.ndarray | None:
    """The one float64 factor rows ``r0:r1`` of ``p``'s weight are multiplied by, broadcast to them, when ``p``
    has a single scale (an output or an input scale); else None.  numpy's multiply with a float64 loop then
    computes each element as the block loop does (widened, one product, rounded once), without a float64
    buffer."""
    if p.in_scale is None and p.scale is not None:
        return _out_factor(p, r0, r1)
    if p.scale is None and p.in_scale is not None:
        return _in_factor(p, r0, r1)
    return None


def _out_factor(p: Part, r0: int, r1: int) -> np.ndarray:
    """``p``'s output scale for rows ``r0:r1``, broadcast to them."""
    return p.scale[r0:r1].reshape((-1,) + (1,) * (p.conv.weight.ndim - 1))


def _in_factor(p: Part, r0: int, r1: int) -> np.ndarray:
    """``p``'s input scale for rows ``r0:r1``, broadcast to them: row ``o`` of a grouped kernel reads the inputs
    of its group, ``o // (out / groups)``."""
    w, groups = p.conv.weight, p.conv.groups
    per, tail = w.shape[1], (1,) * (w.ndim - 2)
    if groups == 1:
        return p.in_scale.reshape((1, per) + tail)
    group = np.arange(r0, r1) // (p.conv.out_channels // groups)
    return p.in_scale.reshape(groups, per)[group].reshape((r1 - r0, per) + tail)


def _widened_rows(p: Part, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``r0:r1`` of ``p`` in float64 (into ``out`` if given; without scales, a view of the weight may be
    returned).  Widened first, then scaled in place, the input scale before the output scale, in the order
    the ops run."""
    w = p.conv.weight[r0:r1]
    if out is None:
        if p.scale is None and p.in_scale is None:
            return w
        out = np.empty(w.shape)
    np.copyto(out, w, casting="unsafe")
    if p.in_scale is not None:
        out *= _in_factor(p, r0, r1)
    if p.scale is not None:
        out *= _out_factor(p, r0, r1)
    return out


def _add_rows(block: np.ndarray, p: Part, where: tuple, groups: int, r0: int, r1: int) -> None:
    """``block += rows r0:r1 of p`` placed at ``where``, in float64 (block-diagonal when ``p`` has more groups)."""
    w = _widened_rows(p, r0, r1)
    if p.conv.groups == groups:
        block[(slice(None), *where[1:])] += w
    else:
        _add_regrouped(block, w, p.conv.groups, groups, where, (r0, r1, p.conv.out_channels))


def sum_kernels(kernels: list[KernelSum], sizes: Sequence[int | None] | None = None) -> KernelSum:
    """The deferred sum of kernels applied to one input; legality as :func:`conv_algebra.sum_convs`
    (``sizes``: the input's fixed spatial sizes, if any)."""
    if len(kernels) == 1:
        return kernels[0]
    geometry = sum_geometry([k.geometry for k in kernels], sizes)
    return KernelSum(geometry, tuple(p for k in kernels for p in k.parts))


__all__ = ["KernelSum", "Part", "placeholder", "sum_kernels"]
