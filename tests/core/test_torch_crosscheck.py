"""A second, independent oracle: fused convs from the numpy core against the unfused torch modules."""

from __future__ import annotations

import numpy as np
import pytest
from core_helpers import FAST, abs_op, assert_close, run_branches
from hypothesis import given
from hypothesis import strategies as st

from reparam.core import BatchNorm, Conv, ConvTranspose, fold_bn_transpose, sum_branches
from reparam.measure import torch_threads
from reparam.testing import reference as ref
from reparam.testing import strategies as rs

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny CPU convs only lose from OpenMP threads on a loaded 2-core machine."""
    with torch_threads(1):
        yield


def _bn_module(bn: BatchNorm, c: int, cls):
    m = cls(c, eps=bn.eps, dtype=torch.float64).eval()
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(bn.running_mean))
        m.running_var.copy_(torch.from_numpy(bn.running_var))
        if bn.gamma is not None:
            m.weight.copy_(torch.from_numpy(bn.gamma))
            m.bias.copy_(torch.from_numpy(bn.beta))
    return m


def _conv_module(conv: Conv):
    (ph, pw) = (p[0] for p in conv.padding)
    m = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, (ph, pw),
                        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(conv.weight))
        if conv.bias is not None:
            m.bias.copy_(torch.from_numpy(conv.bias))
    return m


@FAST
@given(data=st.data())
def test_multi_branch_block_matches_torch_modules(data):
    """k x k + 1x1 + BN-only branches (RepVGG / MobileOne style, any groups and mode) vs torch."""
    c = data.draw(st.sampled_from([2, 4]), label="channels")
    k = data.draw(st.sampled_from([3, 5]), label="k")
    mode = data.draw(st.sampled_from(["zeros", "reflect", "circular"]), label="mode")
    branches, mods = [], []
    for kk in data.draw(st.lists(st.sampled_from([1, k]), min_size=1, max_size=3), label="kernels"):
        conv = data.draw(rs.convs(c, c, 2, kk, None, 1, 1, (kk - 1) // 2, False, padding_mode=mode), label="conv")
        bn = data.draw(rs.batch_norms(c, affine=True), label="bn")
        branches.append([conv, bn])
        mods.append(torch.nn.Sequential(_conv_module(conv), _bn_module(bn, c, torch.nn.BatchNorm2d)))
    if data.draw(st.booleans(), label="bn branch"):
        bn = data.draw(rs.batch_norms(c, affine=True), label="bn_only")
        branches.append([bn])
        mods.append(_bn_module(bn, c, torch.nn.BatchNorm2d))
    fused = sum_branches(branches, c, 2)
    x = np.random.default_rng(data.draw(rs.seeds())).standard_normal((2, c, 6, 7))
    xt = torch.from_numpy(x)
    with torch.no_grad():
        expected = sum(m(xt) for m in mods).numpy()
        pads = tuple(v for p in reversed(fused.padding) for v in p)
        mode_t = {"zeros": "constant"}.get(fused.padding_mode, fused.padding_mode)
        got = F.conv2d(F.pad(xt, pads, mode=mode_t), torch.from_numpy(fused.weight), torch.from_numpy(fused.bias),
                       groups=fused.groups).numpy()
    assert_close(got, expected, run_branches(branches, x, absolute=True))


@FAST
@given(data=st.data())
def test_fold_bn_transpose_matches_torch(data):
    g = data.draw(st.sampled_from([1, 2]), label="groups")
    cin, og = 2 * g, data.draw(st.integers(1, 3), label="out per group")
    s, k = data.draw(st.integers(1, 2), label="stride"), data.draw(st.integers(1, 3), label="k")
    rng = np.random.default_rng(data.draw(rs.seeds()))
    ct = ConvTranspose(rng.standard_normal((cin, og, k, k)), rng.standard_normal(g * og), stride=(s, s),
                       padding=(0, 0), output_padding=(0, 0), dilation=(1, 1), groups=g)
    bn = data.draw(rs.batch_norms(g * og, affine=True), label="bn")
    fused = fold_bn_transpose(ct, bn)
    x = torch.from_numpy(rng.standard_normal((2, cin, 4, 3)))
    with torch.no_grad():
        y = F.conv_transpose2d(x, torch.from_numpy(ct.weight), torch.from_numpy(ct.bias), stride=s, groups=g)
        expected = _bn_module(bn, g * og, torch.nn.BatchNorm2d)(y).numpy()
        got = F.conv_transpose2d(x, torch.from_numpy(fused.weight), torch.from_numpy(fused.bias), stride=s,
                                 groups=g).numpy()
    assert_close(got, expected, ref.run_op(abs_op(bn), ref.run_op(abs_op(ct), np.abs(x.numpy()))))
