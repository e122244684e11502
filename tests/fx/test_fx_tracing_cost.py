"""What makes fusion cheaper must not change what it does: one set of tracing patches per build, Proxy
iteration decoded once per code object, single-op children left untraced (issue 10, fuse time)."""

from __future__ import annotations

import math
from math import sqrt

import pytest
import torch
import torch.fx._symbolic_trace as fx_internals
import torch.nn.functional as F
from fx_helpers import C, RepVGG, conv_bn, fuse_checked, ops, x_of
from torch import fx, nn

import reparam.fx.build as build
from reparam.fx.codegen import shared_code
from reparam.fx.patching import tracing_session
from reparam.fx.tracing import _piece_count, trace


def _patched_names() -> tuple:
    """What fx's tracing patches replace, as objects (compared before and after)."""
    return (nn.Module.__call__, nn.Module.__getattr__, fx_internals._create_wrapped_func,
            fx.graph._snake_case)


class Split(nn.Module):
    """``a, b = y.chunk(2, 1)`` (fx unpacks it) next to a loop over a proxy (fx cannot: opaque)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(C, 2 * C, 3)
        self.left, self.right = conv_bn(C, C, 1), conv_bn(C, C, 3)
        self.loop = LoopOverChunks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, 1)
        return self.loop(torch.cat([self.left(a), self.right(b)], 1))


class LoopOverChunks(nn.Module):
    """Iterates a proxy whose number of pieces depends on the input's height (``list(y.chunk(3, 2))``):
    untraceable, called whole."""

    def __init__(self) -> None:
        super().__init__()
        self.cv = conv_bn(2 * C, 2 * C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv(x).chunk(3, 2))
        return torch.cat(parts, 2)


def _signature(gm_graph: fx.Graph) -> list[tuple]:
    return [(n.op, str(n.target), n.name, tuple(str(a) for a in n.args)) for n in gm_graph.nodes]


def test_session_traces_the_same_graph_and_restores_fx() -> None:
    model = Split().eval()
    before = _patched_names()
    plain = trace(model)  # fx's own per-trace patching
    with tracing_session():
        assert nn.Module.__call__ is not before[0]
        inside = [trace(model) for _ in range(2)]  # the second reuses the session's wrappers
        y = model(x_of(2, C, 8, 8))  # a module called outside tracing runs as usual
    assert _patched_names() == before
    for ws in inside:
        assert _signature(ws.graph) == _signature(plain.graph)
        assert ws.opaque.keys() == plain.opaque.keys() == {"loop"}
    torch.testing.assert_close(y, model(x_of(2, C, 8, 8)))


def test_session_restores_fx_after_an_error() -> None:
    before = _patched_names()
    try:
        with tracing_session():
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert _patched_names() == before


def test_session_inside_a_session_is_a_no_op() -> None:
    with tracing_session():
        outer = nn.Module.__call__
        with tracing_session():
            assert nn.Module.__call__ is outer
        assert nn.Module.__call__ is outer


def test_fusion_through_unpacking_and_an_opaque_loop() -> None:
    model, x = Split(), x_of(2, C, 8, 8)
    before = _patched_names()
    fused, rep = fuse_checked(model, x, example=False)
    assert _patched_names() == before
    assert ops(fused, x)["batch_norm"] == 0  # the opaque loop's own conv+BN folds too, inside it
    assert "loop" in dict(rep.skipped) or any(w.startswith("loop") for w, _ in rep.skipped)


class C2fLike(nn.Module):
    """YOLO's C2f: ``list(cv1(x).chunk(2, 1))`` extended by a loop, then concatenated; the pieces are counted
    from the BN that ends ``cv1`` (fx alone cannot iterate a proxy).  Odd channels: chunk sizes round up."""

    def __init__(self, chunks: int = 2, how: str = "chunk") -> None:
        super().__init__()
        self.chunks, self.how = chunks, how
        c = 2 * C + 1
        self.cv1 = nn.Sequential(nn.Conv2d(C, c, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.m = nn.ModuleList(conv_bn(1, 1, 3) for _ in range(2))
        width = sum(t.shape[1] for t in self.pieces(torch.zeros(1, c, 1, 1))) + len(self.m)
        self.cv2 = conv_bn(width, C, 1)

    def pieces(self, y: torch.Tensor) -> list[torch.Tensor]:
        if self.how == "chunk":
            return list(y.chunk(self.chunks, 1))
        if self.how == "split":
            return list(torch.split(y, self.chunks, dim=1))
        return [t.unsqueeze(1) for t in y.unbind(1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pieces(self.cv1(x))
        for m in self.m:
            y.append(m(y[-1][:, -1:]))
        return self.cv2(torch.cat(y, 1))


def test_a_split_counted_from_its_bn_traces_whole() -> None:
    for chunks, how in [(2, "chunk"), (4, "chunk"), (3, "split"), (1, "unbind")]:
        model, x = C2fLike(chunks, how), x_of(2, C, 6, 6)
        ws = trace(model.eval())
        assert not ws.opaque, (chunks, how)
        fused, rep = fuse_checked(model, x, example=False)
        assert ops(fused, x)["batch_norm"] == 0 and not rep.skipped, (chunks, how)


def test_piece_counts_match_torch() -> None:
    """Every (channels, chunks) pair up to 9 x 5: the count read off the graph is the count torch gives."""
    for channels in range(1, 10):
        model = nn.Sequential(nn.Conv2d(1, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()).eval()
        graph = fx.symbolic_trace(model).graph
        out = next(n for n in graph.nodes if n.op == "output").args[0]
        for k in range(1, 6):
            y = torch.zeros(1, channels, 1, 1)
            for name, args, expected in [("chunk", (k, 1), len(y.chunk(k, 1))),
                                         ("split", (k, 1), len(y.split(k, 1))),
                                         ("unbind", (1,), channels)]:
                with graph.inserting_after(out):
                    node = graph.call_method(name, (out, *args))
                assert _piece_count(node, model) == expected, (channels, k, name)
                graph.erase_node(node)
    odd = nn.Sequential(nn.Conv2d(1, 4, 1)).eval()  # no BN: dim 1 might not be the channels (unbatched)
    graph = fx.symbolic_trace(odd).graph
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    with graph.inserting_after(out):
        assert _piece_count(graph.call_method("chunk", (out, 2, 1)), odd) is None


class HoldsLists(nn.Module):
    """Children in a ModuleList (never called itself) and a weightless concat module, under untraced code."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(conv_bn(C, C, 3) for _ in range(2))
        self.cat = Concat()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [b(x) for b in self.blocks]
        if ys[0].sum() > 0:  # data-dependent: the parent cannot be traced
            ys.reverse()
        return self.cat(ys)


class Concat(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, 1)


def test_containers_and_weightless_children_are_not_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = HoldsLists(), x_of(2, C, 6, 6)
    traced: list[str] = []

    def spy(m: nn.Module):
        traced.append(type(m).__name__)
        return trace(m)
    monkeypatch.setattr(build, "trace", spy)
    fused, rep = fuse_checked(model, x, example=False)
    assert traced == ["HoldsLists", "Sequential", "Sequential"]  # neither the ModuleList nor the concat
    assert ops(fused, x)["batch_norm"] == 0
    assert [w for w, _ in rep.skipped] == ["HoldsLists"]


class LoneLayers(nn.Module):
    """An untraceable parent whose children are single standard layers: none of them changes alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent: the parent cannot be traced
            y = -y
        return self.act(self.bn(y))


def test_single_op_children_are_kept_with_the_untraced_reason() -> None:
    model, x = LoneLayers(), x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == ops(model, x)
    assert [b.where for b in rep.bn_left] == ["bn"]
    assert "LoneLayers's own code" in rep.bn_left[0].reason
    fused.conv.weight.data.zero_()  # a copy: the input is untouched
    assert model.conv.weight.abs().sum() > 0


def test_single_op_children_with_allow_costlier_still_traced() -> None:
    model, x = LoneLayers(), x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False, allow_costlier=True)
    assert ops(fused, x)["batch_norm"] == len(rep.bn_left) == 1  # a BN alone is no region worth rewriting
    assert "LoneLayers's own code" in rep.bn_left[0].reason  # traced alone, it is explained the same way


class OpaqueHead(nn.Module):
    """timm's ConvMlp shape: an untraceable module holding only single layers, before a fusable stem."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(C, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 1 and x.sum() > 0:
            x = F.adaptive_avg_pool2d(x, 1)
        return self.fc2(self.act(self.fc1(x)))


def test_opaque_module_of_single_layers_is_copied_once() -> None:
    model, x = nn.Sequential(RepVGG(), OpaqueHead()), x_of(2, C, 6, 6)
    fused, _ = fuse_checked(model, x, example=False)
    assert ops(fused, x)["batch_norm"] == 0
    head = fused.get_submodule("1")
    assert isinstance(head, OpaqueHead) and head is not model[1]
    assert head.fc1.weight.data_ptr() != model[1].fc1.weight.data_ptr()


class PassesChildren(nn.Module):
    """yolov9's ELAN1 shape: untraceable code that hands its children on in a list (it may reach inside them,
    so they are kept as modules and their own children fused one by one)."""

    def __init__(self) -> None:
        super().__init__()
        self.cv2, self.cv3 = conv_bn(C, C, 3), conv_bn(C, C, 1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [x]
        for m in [self.cv2, self.cv3]:
            y.append(m(y[-1]))
        if y[-1].sum() > 0:
            return y[-1]
        return -y[-1]


def test_children_kept_because_the_parent_reaches_inside_say_so() -> None:
    model, x = PassesChildren(), x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x) == ops(model, x) and len(rep.bn_left) == 2
    for left in rep.bn_left:
        assert "PassesChildren's code reaches inside" in left.reason and left.reason.endswith("traced graph")


# ------------------------------------------------------------------ no-ops, fallback copies, rank checks


class WithNoOps(nn.Module):
    """Identity and dropout modules around a conv+BN, one Identity with a hook (it must still run)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.body, self.drop = nn.Identity(), conv_bn(C, C, 3), nn.Dropout(0.5)
        self.hooked = nn.Identity()
        self.calls = 0
        self.hooked.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hooked(self.drop(self.body(self.pre(x))))


def test_no_ops_are_left_out_while_tracing_and_reported() -> None:
    model, x = WithNoOps(), x_of(2, C, 6, 6)
    ws = trace(model.eval())
    called = [str(n.target) for n in ws.graph.nodes if n.op == "call_module"]
    assert "pre" not in called and "drop" not in called and "hooked" in called  # a hook keeps its call
    assert ws.elided == [("pre", "Identity"), ("drop", "Dropout")]
    fused, rep = fuse_checked(model, x, example=False)
    assert {w for w, _ in rep.removed} == {"pre", "drop"}
    model.calls = 0
    fused(x)
    assert ops(fused, x)["batch_norm"] == 0 and model.calls == 0  # the copy's hook counts on the copy


class TrainingDropout(nn.Dropout):
    """Stays in training mode after ``eval()``: it is not a no-op."""

    def train(self, mode: bool = True) -> TrainingDropout:
        return super().train(True)


def test_a_dropout_that_stays_in_training_mode_is_kept() -> None:
    model = nn.Sequential(conv_bn(C, C, 3), TrainingDropout(0.5)).eval()
    ws = trace(model)
    assert ws.elided == [] and [str(n.target) for n in ws.graph.nodes if n.op == "call_module"][-1] == "1"


class Shared(nn.Module):
    """An untraceable parent: two children share one activation; one child is replaced, one reached into."""

    def __init__(self) -> None:
        super().__init__()
        act = nn.ReLU()
        self.a = nn.Sequential(conv_bn(C, C, 3), act)
        self.b = nn.Sequential(conv_bn(C, C, 1, padding=0), act)
        self.tags = ["a", "b"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.sum() > 1e9:  # data-dependent: the parent cannot be traced
            y = -y
        return self.b[1](self.b[0](y))  # reaches into b: b is kept, its children fused


def test_fallback_copies_only_what_it_keeps_and_keeps_sharing() -> None:
    model, x = Shared(), x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert ops(fused, x)["batch_norm"] == 0, rep
    assert fused.b[1] is not model.b[1] and fused.tags == model.tags and fused.tags is not model.tags
    replaced_act = [m for m in fused.a.modules() if isinstance(m, nn.ReLU)]
    assert replaced_act == [fused.b[1]]  # still one activation, shared, and a copy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in fused.parameters():
        p.data.zero_()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched


def test_fallback_children_keep_copies_of_what_their_parent_reads() -> None:
    from test_fx_idioms import YoloLike

    model, x = YoloLike(), x_of(2, C, 8, 8)
    fused, _ = fuse_checked(model, x, example=False)
    assert fused.model[2].f == model.model[2].f and fused.model[2].f is not model.model[2].f
    fused.model[2].f.append(9)
    assert model.model[2].f == [0, 1]


class Checked(nn.Module):
    """timm-style norm layers, each asserting the rank of its input (``BNAct2d`` from the idiom corpus)."""

    def __init__(self) -> None:
        super().__init__()
        from test_fx_idioms import ConvNormAct

        self.blocks = nn.Sequential(*[ConvNormAct(C, C, 3) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _asserts(module: nn.Module) -> int:
    return sum(n.op == "call_function" and n.target is torch._assert for n in module.graph.nodes)


def test_rank_checks_implied_by_earlier_ones_are_removed() -> None:
    model, x = Checked(), x_of(2, C, 6, 6)
    fused, rep = fuse_checked(model, x, example=False)
    assert _asserts(fused) == 1 and any("2 rank checks" in n for n in rep.notes), rep.notes
    assert not any(n.op == "call_function" and n.target is getattr and not n.users for n in fused.graph.nodes)
    for module in (model, fused):  # the first check still stops a 3-D input, with the same message
        try:
            module(x_of(C, 6, 6))
            raise AssertionError("a 3-D input ran")
        except AssertionError as err:
            assert "expected 4D input" in str(err)


class CheckThenBN(nn.Module):
    """The check comes first, the fact that would imply it (a BatchNorm2d, which raises) only after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4-D")
        return self.bn(y * 2.0)


class InplaceRank(nn.Module):
    """A rank that changes in place, depending on the input (``squeeze_(0)`` of a batch of one): the check
    after it is not implied by the one before."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        torch._assert(y.ndim == 4, "4-D")
        y.squeeze_(0)
        torch._assert(y.ndim == 4, "a batch of one")
        return y


def test_rank_checks_stay_unless_implied_by_what_runs_before() -> None:
    for model in (CheckThenBN(), InplaceRank()):
        x = x_of(2, C, 6, 6)
        fused, _ = fuse_checked(model, x, example=False)
        want = sum(n.op == "call_function" and n.target is torch._assert for n in trace(model).graph.nodes)
        assert _asserts(fused) == want, type(model).__name__
    one = x_of(1, C, 6, 6)
    for module in (model, fused):
        try:
            module(one)
            raise RuntimeError("a batch of one ran")
        except AssertionError as err:
            assert "a batch of one" in str(err)


def test_the_direct_copy_of_standard_layers_is_a_deepcopy() -> None:
    from reparam.fx.tracing import safe_deepcopy

    model = nn.Sequential(conv_bn(C, C, 3), nn.ReLU(), nn.Upsample(scale_factor=2.0), nn.Flatten(1),
                          nn.Linear(C * 64, 3)).eval()
    model[0][0].weight.requires_grad_(False)
    holder = nn.Module()
    holder.net, holder.tied = model, model[4]  # one layer under two names
    copy_ = safe_deepcopy(holder).net
    x = x_of(2, C, 4, 4)
    torch.testing.assert_close(copy_(x), model(x), rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.named_modules(), copy_.named_modules()):
        assert type(a) is type(b) and a is not b, name
        assert {k: v for k, v in vars(a).items() if k not in ("_parameters", "_buffers", "_modules")} == {
            k: v for k, v in vars(b).items() if k not in ("_parameters", "_buffers", "_modules")}, name
        for (pn, p), (_, q) in zip(a.named_parameters(recurse=False), b.named_parameters(recurse=False)):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr() and p.requires_grad == q.requires_grad, pn
    both = safe_deepcopy(holder)
    assert both.tied is both.net[4]  # sharing kept
    copy_[1].register_forward_hook(lambda *_: None)
    assert not model[1]._forward_hooks  # hook dicts are the copy's own


class UsesMath(nn.Module):
    """``math`` on traced sizes, through the module and a name imported from it (fx records both)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y * math.sqrt(y.size(1)) / sqrt(y.size(2))


def test_math_calls_are_recorded_with_math_functions_as_targets() -> None:
    model = nn.Sequential(UsesMath(), UsesMath()).eval()
    plain = trace(model)
    with tracing_session():
        inside = [trace(model) for _ in range(2)]
        assert math.sqrt(4.0) == 2.0  # called outside a trace, the wrapper computes
    for ws in inside:
        assert _signature(ws.graph) == _signature(plain.graph)
        targets = [n.target for n in ws.graph.nodes if n.op == "call_function"]
        assert targets.count(math.sqrt) == 4, targets  # the functions themselves, not session wrappers
    fused, _ = fuse_checked(model, x_of(2, C, 6, 6), example=False)
    assert ops(fused, x_of(2, C, 6, 6))["batch_norm"] == 0


class _Scaled(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.k


class _Flagged(nn.Module):
    """Reads the untraceable parent's plain attribute, so the parent is fused child by child (as YOLO)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(conv_bn(C, C, 3), nn.ReLU()) for _ in range(3)])
        self.odd = nn.Sequential(conv_bn(C, C, 1), nn.ReLU(), nn.Hardswish())  # (another graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x) if x.sum() > -1e30 else x  # (control flow on a value: the parent cannot be traced)
        return self.odd(x)


def test_identical_graphs_share_their_code_and_keep_their_own_weights():
    """Inside shared_code(), GraphModules of identical graphs share one compiled forward; each still computes
    with its own module's weights, graphs that differ (a constant's sign, a target) get code of their own,
    and fx's code generator is itself again afterwards."""
    python_code = fx.Graph.python_code
    mods = [_Scaled(0.5), _Scaled(0.5), _Scaled(-0.0), _Scaled(0.0)]
    x = x_of(2, C, 8, 8)
    with shared_code():
        gms = [fx.symbolic_trace(m) for m in mods]
    assert fx.Graph.python_code is python_code
    assert type(gms[0]).forward is type(gms[1]).forward
    # the code was generated once, not again and found equal (fx stores kwargs as an immutable_dict)
    assert gms[0]._code is gms[1]._code and gms[2]._code is not gms[3]._code
    assert len({type(g).forward for g in gms}) == 3 and "-0.0" in gms[2].code and "-0.0" not in gms[3].code
    for m, g in zip(mods, gms):
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)
    outside = [fx.symbolic_trace(m) for m in mods[:2]]
    assert type(outside[0]).forward is not type(outside[1]).forward


def test_children_fused_one_by_one_share_code_and_compute_their_own_values():
    """The same, through reparam.fuse: the three blocks share the code of their one graph, the last child (another
    graph) has its own, and the model computes what it did."""
    torch.manual_seed(0)
    model = _Flagged().eval()
    x = x_of(2, C, 8, 8)
    fused, _ = fuse_checked(model, x)
    children = [fused.blocks[i] for i in range(3)]
    assert all(isinstance(c, fx.GraphModule) for c in children) and isinstance(fused.odd, fx.GraphModule)
    assert len({type(c).forward for c in children}) == 1 and type(fused.odd).forward is not type(children[0]).forward
    assert len({id(c._code) for c in children}) == 1  # (generated once)
    assert ops(fused, x)["batch_norm"] == 0


class LateRank(nn.Module):
    """Ranks fixed only by a BN further down (a flatten, a mean and a sum of two values read before it), and a
    per-channel constant whose output rank a later BN fixes."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.bn1 = nn.BatchNorm2d(C), nn.BatchNorm1d(C)
        self.register_buffer("k", torch.rand(C, 1, 1))

    def forward(self, x, y):
        f = torch.flatten(x, 2, 3)
        m = x.mean(3)
        s = (m + y.amax(2)).sum(-1)  # y's rank: only once the BN of w, after it, has fixed w's
        w = y * self.k
        return self.bn(x), self.bn1(f), self.bn1(m), s, self.bn(w)


def test_ranks_found_on_later_sweeps_are_the_ranks_the_graph_runs_with():
    """The ranks inferred without shapes (later sweeps only revisit the facts that depend on known ranks)
    are the ranks every value has when the traced graph runs (fx's shape propagation)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from reparam.fx.facts import fold_constants, infer_ranks

    ws = trace(LateRank().eval())
    fold_constants(ws)
    ranks = {n.name: r for n, r in infer_ranks(ws).items()}
    gm = fx.GraphModule(ws.root, ws.graph)
    ShapeProp(gm).propagate(torch.rand(2, C, 4, 4), torch.rand(2, C, 4, 4))
    actual = {n.name: len(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if isinstance(n.meta.get("tensor_meta"), fx.passes.shape_prop.TensorMetadata)}
    assert {"flatten", "mean", "amax", "add", "sum_1", "mul", "y"} <= ranks.keys()
    assert {k: actual[k] for k in ranks if k in actual} == {k: ranks[k] for k in ranks if k in actual}
