"""Every refusal of the algebra, one targeted case each: NotFusable with a message naming the condition;
and the near misses next to them, which are legal and must be exact."""

from __future__ import annotations

import numpy as np
import pytest
from core_helpers import BF16, check_fused

from reparam.core import (
    Affine,
    AvgPool,
    BatchNorm,
    Conv,
    NotFusable,
    Pad,
    avgpool_to_conv,
    chain,
    compose,
    fold_bn,
    identity_conv,
    pad_kernel,
    pad_to_conv,
    regroup,
    sum_convs,
)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
R = np.random.default_rng(0).standard_normal


def cv(*shape, **kw):
    return Conv(R(shape), **kw)


def bn(c, var=1.0, eps=1e-5, mean=1.0):
    return BatchNorm(np.full(c, mean), np.full(c, var), np.full(c, 2.0), np.ones(c), eps=eps)


REFUSALS = {
    # branch sums
    "sum: misaligned windows": (lambda: sum_convs([cv(2, 2, 3, 3, padding=1), cv(2, 2, 3, 3)]),
                                r"windows do not align in dim 0"),
    "sum: misaligned asymmetric even kernels": (
        lambda: sum_convs([cv(2, 2, 2, padding=((1, 0),)), cv(2, 2, 2, padding=((1, 1),))]), r"do not align"),
    "sum: misaligned dilation": (lambda: sum_convs([cv(2, 2, 3, padding=1, dilation=2), cv(2, 2, 3, padding=1)]),
                                 r"windows do not align.*dil=2"),
    "sum: different strides": (lambda: sum_convs([cv(2, 2, 3, padding=1, stride=2), cv(2, 2, 3, padding=1)]),
                               r"stride differs \(\(2,\) vs \(1,\)\)"),
    "sum: different in channels": (lambda: sum_convs([cv(2, 2, 1), cv(2, 3, 1)]), r"in_channels differs"),
    "sum: different out channels": (lambda: sum_convs([cv(2, 2, 1), cv(3, 2, 1)]), r"out_channels differs"),
    "sum: different spatial dims": (lambda: sum_convs([cv(2, 2, 1), cv(2, 2, 1, 1)]), r"ndim differs"),
    "sum: mixed padding modes zeros/reflect": (
        lambda: sum_convs([cv(2, 2, 3, padding=1, padding_mode="reflect"), cv(2, 2, 3, padding=1)]),
        r"padding modes differ between padded branches: \['reflect', 'zeros'\]"),
    "sum: mixed non-zero modes": (
        lambda: sum_convs([cv(2, 2, 3, padding=1, padding_mode="reflect"),
                           cv(2, 2, 3, padding=1, padding_mode="circular")]), r"padding modes differ"),
    "sum: nothing": (lambda: sum_convs([]), r"nothing to sum"),
    # composition and the border rule
    "compose: non-zero bias before zero-padded conv": (
        lambda: compose(cv(2, 2, 1, bias=np.ones(2)), cv(2, 2, 3, padding=1)),
        r"non-zero bias .*zero padding does not see"),
    "chain: BN then padded conv": (lambda: chain([bn(2), cv(2, 2, 3, padding=1)], 2, 1),
                                   r"pads .* with zeros but its input carries a bias"),
    "compose: non-pointwise first before padded second": (
        lambda: compose(cv(2, 2, 3), cv(2, 2, 3, padding=1)), r"the first has kernel \(3,\)"),
    "compose: first pads in reflect mode before zero-padded second": (
        lambda: compose(cv(2, 2, 1, padding=1, padding_mode="reflect"), cv(2, 2, 3, padding=1)),
        r"the first pads \(\(1, 1\),\) in reflect mode"),
    "compose: strided first under non-zero mode": (
        lambda: compose(cv(2, 2, 1, stride=2), cv(2, 2, 3, padding=1, padding_mode="reflect")),
        r"the first has stride \(2,\) under reflect padding"),
    "compose: padded first under non-zero mode": (
        lambda: compose(cv(2, 2, 1, padding=1), cv(2, 2, 3, padding=1, padding_mode="replicate")),
        r"the first pads \(\(1, 1\),\)"),
    "compose: channels": (lambda: compose(cv(3, 2, 1), cv(2, 2, 1)), r"3 channels feed a conv expecting 2"),
    "compose: spatial dims": (lambda: compose(cv(2, 2, 1), cv(2, 2, 1, 1)), r"spatial dims differ \(1 vs 2\)"),
    # pooling and padding ops
    "avgpool: ceil_mode": (lambda: avgpool_to_conv(AvgPool((3,), (2,), ceil_mode=True), 2), r"ceil_mode=True"),
    "avgpool: count_include_pad=False with padding": (
        lambda: avgpool_to_conv(AvgPool((3, 3), (1, 1), 1, count_include_pad=False), 2),
        r"count_include_pad=False divides border windows"),
    "pad: non-zero constant": (lambda: pad_to_conv(Pad(((1, 1),), "constant", 1.5), 2),
                               r"constant padding with value 1.5"),
    "pad: negative (crop)": (lambda: pad_to_conv(Pad(((1, -1),)), 2), r"negative padding"),
    "conv: negative padding": (lambda: cv(1, 1, 3, padding=((-1, 2),)), r"negative padding .*\(a crop\)"),
    # batch norm statistics and dtype policy
    "bn: var + eps == 0": (lambda: fold_bn(cv(2, 2, 1), bn(2, var=-1e-5)), r"running_var \+ eps <= 0"),
    "bn: var + eps < 0 with eps 0": (lambda: fold_bn(cv(2, 2, 1), bn(2, var=-1.0, eps=0.0)), r"var.*<= 0"),
    "bn: zero variance and eps": (lambda: fold_bn(cv(2, 2, 1), bn(2, var=0.0, eps=0.0)), r"<= 0"),
    "bn: non-finite variance": (lambda: fold_bn(cv(2, 2, 1), bn(2, var=np.nan)), r"non-finite"),
    "bn: channel count": (lambda: fold_bn(cv(2, 2, 1), bn(3)), r"batch norm has 3 channels, the conv outputs 2"),
    "affine: channel count": (lambda: fold_bn(cv(2, 2, 1), Affine(scale=np.ones(3))),
                              r"affine scale has 3 entries but the value has 2 channels"),
    "fold: non-finite result (float64 overflow)": (
        lambda: fold_bn(Conv(np.full((2, 2, 1), 1e200)), Affine(scale=np.array([1e200]))),
        r"non-finite values after folding"),
    "fold: integer weights (no rounding)": (
        lambda: fold_bn(Conv(np.array([[[1], [2]]])), Affine(scale=np.array([0.5]))),
        r"cannot be stored in the input's int64 dtype without rounding"),
    "fold: NaN weight": (lambda: fold_bn(Conv(np.full((2, 2, 1), np.nan)), bn(2)), r"non-finite"),
    "float16 overflow on cast": (lambda: fold_bn(Conv(np.ones((2, 2, 1), np.float16)), bn(2, var=1e-10, eps=0.0)),
                                 r"overflows float16"),
    "bfloat16 overflow on cast": (lambda: fold_bn(Conv(np.ones((2, 2, 1), BF16)), Affine(scale=np.array([1e39]))),
                                  r"overflows bfloat16"),
    "float16 overflow of a branch sum": (
        lambda: sum_convs([Conv(np.full((1, 1, 1), 6e4, np.float16))] * 2), r"overflows float16"),
    # kernel re-expression
    "pad_kernel: odd difference without offset": (lambda: pad_kernel(cv(2, 2, 3, 3), (4, 5)),
                                                   r"odd difference 1\); give an explicit offset"),
    "pad_kernel: smaller kernel": (lambda: pad_kernel(cv(2, 2, 3, 3), (2, 3), (0, 0)), r"cannot place a 3-tap"),
    "pad_kernel: offset out of range": (lambda: pad_kernel(cv(2, 2, 3, 3), (5, 5), (3, 0)), r"at offset 3"),
    "pad_kernel: negative offset": (lambda: pad_kernel(cv(2, 2, 3, 3), (5, 5), (-1, 1)), r"at offset -1"),
    "pad_kernel: dims": (lambda: pad_kernel(cv(2, 2, 3, 3), (5,)), r"has 1 dims, the conv has 2"),
    "regroup: not a divisor": (lambda: regroup(cv(4, 1, 3, groups=4), 3), r"groups=4 into groups=3 \(not a divisor"),
    "regroup: more groups": (lambda: regroup(cv(4, 2, 3, groups=2), 4), r"not a divisor"),
    "identity_conv: groups not dividing channels": (lambda: identity_conv(4, 2, 3, groups=3), r"not a divisor"),
    "identity_conv: even kernel": (lambda: identity_conv(4, 2, 2), r"odd difference"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_refusal_names_its_condition(case):
    fn, pattern = REFUSALS[case]
    with pytest.raises(NotFusable, match=pattern):
        fn()


def _compose_case(a, b):
    return compose(a, b), [[a, b]]


def _sum_case(*convs):
    return sum_convs(list(convs)), [[c] for c in convs]


def _chain_case(*ops):
    return chain(list(ops), 2, 1), [list(ops)]


def _op_case(op, to_conv):
    return to_conv(op, 2, np.float64), [[op]]


NEAR_MISSES = {
    "zero bias before zero-padded conv": lambda: _compose_case(cv(2, 2, 1, bias=np.zeros(2)), cv(2, 2, 3, padding=1)),
    "strided zero-padded 1x1 before zero-padded conv": lambda: _compose_case(
        cv(2, 2, 1, stride=2, padding=1), cv(2, 2, 3, padding=1)),
    "reflect-padded first before unpadded second": lambda: _compose_case(
        cv(2, 2, 3, padding=1, padding_mode="reflect", bias=np.ones(2)), cv(2, 2, 3)),
    "biased 1x1 before reflect-padded conv": lambda: _compose_case(
        cv(2, 2, 1, bias=np.ones(2)), cv(2, 2, 3, padding=1, padding_mode="reflect")),
    "unpadded reflect-mode branch with zero-padded branch": lambda: _sum_case(
        cv(2, 2, 3, padding=1), cv(2, 2, 1, padding_mode="reflect")),
    "even kernels at different offsets, same reach": lambda: _sum_case(
        cv(2, 2, 2, padding=((1, 0),)), cv(2, 2, 2, padding=((0, 1),))),
    "BN with zero shift before padded conv": lambda: _chain_case(
        BatchNorm(np.zeros(2), np.full(2, 0.5), np.full(2, -3.0)), cv(2, 2, 3, padding=1)),
    "avgpool count_include_pad=False unpadded": lambda: _op_case(
        AvgPool((2,), (2,), count_include_pad=False), avgpool_to_conv),
    "pad: constant 0": lambda: _op_case(Pad(((1, 2),), "constant", 0.0), pad_to_conv),
    "float16 just below the max": lambda: _chain_case(Conv(np.ones((2, 2, 1), np.float16)),
                                                      Affine(scale=np.array([65500.0]))),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_miss_is_accepted_and_exact(name):
    fused, branches = NEAR_MISSES[name]()
    for size in (6, 7):
        check_fused(fused, branches, R((2, 2, size)))
