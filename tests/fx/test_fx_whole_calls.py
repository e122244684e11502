"""A submodule call that no fold touched is called whole in the result, not inlined (issue 10, fuse time):
its own code runs there as in the input, and only where calling it whole computes what its traced ops did."""

from __future__ import annotations

import torch
from fx_helpers import C, conv_bn, fuse_checked, ops, x_of
from torch import fx, nn

import reparam
from reparam.fx.counting import COUNTS


class Attention(nn.Module):
    """Softmax attention over positions, a residual and a dropout: nothing in it folds."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.q, self.k = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.drop = nn.Dropout(0.1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k = self.q(x).flatten(2), self.k(x).flatten(2)
        a = self.drop(torch.softmax(q.transpose(1, 2) @ k / c ** 0.5, -1))
        return x + (x.flatten(2) @ a.transpose(1, 2)).view(b, c, h, w)


class Net(nn.Module):
    def __init__(self, attn: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = conv_bn(C, C, 3)
        self.act = nn.ReLU()
        self.attn = attn or Attention()
        self.head = conv_bn(C, C, 1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.act(self.stem(x))))


def _whole(fused: nn.Module) -> list[str]:
    return [n.target for n in fused.graph.nodes if COUNTS in n.meta]


def test_an_untouched_submodule_is_called_whole() -> None:
    x = x_of(2, C, 5, 6)
    model = Net()
    fused, rep = fuse_checked(model, x, example=False)
    assert _whole(fused) == ["attn"]  # its input is the fused stem's output: an equal value, not a change
    assert type(fused.attn) is Attention and fused.attn is not model.attn
    assert ops(fused, x) == {"conv": 4, "batch_norm": 0, "linear": 0}
    # its traced ops are counted as before: the report's counts do not lose the add inside it
    assert rep.counts_after == {"conv": 4, "add": 1}
    assert not any("attn" in where for where, _ in rep.removed)  # its dropout still runs (a no-op in eval)
    # each fused part is still checked on example inputs
    fused2, rep2 = fuse_checked(Net(), x)
    assert _whole(fused2) == ["attn"] and rep2.check["max_rel"] < 1e-5


class Fused(nn.Module):
    """A block with a conv+BN inside: fused, so not called whole."""

    def __init__(self) -> None:
        super().__init__()
        self.cb = conv_bn(C, C, 3)
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.cb(x)) * self.scale


def test_a_submodule_with_a_fold_inside_is_not_called_whole() -> None:
    x = x_of(2, C, 5, 6)
    fused, _ = fuse_checked(Net(Fused()), x, example=False)
    assert "attn" not in _whole(fused)
    assert ops(fused, x)["batch_norm"] == 0


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        return x.relu(), 3, x.sigmoid()


class UsesPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pair = conv_bn(C, C, 3), Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, n, b = self.pair(self.stem(x))
        return a * n + b


def test_a_tuple_result_is_indexed() -> None:
    x = x_of(2, C, 5, 6)
    fused, _ = fuse_checked(UsesPair(), x, example=False)
    assert _whole(fused) == ["pair"]
    assert ops(fused, x)["batch_norm"] == 0


class ReadsFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class SetsFlag(nn.Module):
    """The parent sets what its child reads, in its own forward: the child called alone would read the
    attribute as left before tracing, so it stays inlined."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.child = conv_bn(C, C, 3), ReadsFlag()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.child.gain = 3.0
        return self.child(torch.relu(self.stem(x)))


class MutatesInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return x.sigmoid()


class ReLUsInput(nn.Module):
    """Changes its input in place through a module (``nn.ReLU(inplace=True)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x).sigmoid()


class PassesMutated(nn.Module):
    def __init__(self, child: nn.Module | None = None) -> None:
        super().__init__()
        self.stem, self.child = conv_bn(C, C, 3), child or MutatesInput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        return self.child(y) + y  # reads y after the child changed it


class ReadsOutside(nn.Module):
    """Reads a tensor the parent stored on it during forward (not an argument)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.extra


class StoresTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.child = conv_bn(C, C, 3), ReadsOutside()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        self.child.extra = y.mean()
        return self.child(torch.relu(y))


def test_calls_that_depend_on_their_surroundings_stay_inlined() -> None:
    x = x_of(2, C, 5, 6)
    for model in (SetsFlag(), PassesMutated(), PassesMutated(ReLUsInput()), StoresTensor()):
        fused, _ = fuse_checked(model, x, example=False)
        assert "child" not in _whole(fused), type(model).__name__
        assert ops(fused, x)["batch_norm"] == 0


class SharedWeight(nn.Module):
    """The parent reads its child's weight too (one get_attr node, used inside and outside the call)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.child = conv_bn(C, C, 3), Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.child(torch.relu(self.stem(x)))
        return y * self.child.q.bias.view(1, -1, 1, 1)


def test_a_call_whose_tensors_are_read_outside_it_is_right() -> None:
    x = x_of(2, C, 5, 6)
    fused, _ = fuse_checked(SharedWeight(), x, example=False)
    assert ops(fused, x)["batch_norm"] == 0


def test_called_twice_each_call_whole() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.attn = conv_bn(C, C, 3), Attention()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(self.attn(torch.relu(self.stem(x))))

    x = x_of(2, C, 5, 6)
    fused, _ = fuse_checked(Twice(), x, example=False)
    assert _whole(fused) == ["attn", "attn"]


def test_a_trace_reused_for_checks_calls_whole_too() -> None:
    """With example inputs the build runs again on a copy of the cached trace: the calls are mapped to it."""
    x = x_of(2, C, 5, 6)
    model = Net()
    fused, _ = fuse_checked(model, x)
    assert _whole(fused) == ["attn"]
    graph = fx.symbolic_trace(model).graph  # (an independent trace, for the op count of the input)
    assert sum(n.op == "call_module" for n in graph.nodes) > sum(n.op == "call_module" for n in fused.graph.nodes)


def test_inplace_calls_the_model_s_own_module() -> None:
    x = x_of(2, C, 5, 6)
    model = Net()
    model.eval()
    ref = model(x)
    attn = model.attn
    fused = reparam.fuse(model, inplace=True)
    assert fused.attn is attn
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
