"""``reparam.fuse`` on ``torch.export`` programs: an ExportedProgram in, an ExportedProgram out, checked against
the program's own module (and the eager model), before and after ``run_decompositions()``."""

from __future__ import annotations

import io

import pytest
import torch
from fx_helpers import ACNet, C, RepVGG, conv_bn, examples, x_of
from hypothesis import given
from hypothesis import strategies as st
from test_fx_idioms import GatedResidual, LayerScale, MixConv, MobileOneBlock, PreNorm, SplitBN, Tokens
from torch import nn
from torch.export import Dim

import reparam
from reparam.testing import assert_outputs_close, count_executed_ops, randomize_bn_
from reparam.testing.architectures import architectures


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(RepVGG(), ACNet(), nn.ReLU(), nn.Flatten(1), nn.Linear(C * 36, 5), nn.BatchNorm1d(5))
    randomize_bn_(model, 0)
    return model.eval()


def _export(model: nn.Module, x: torch.Tensor, dynamic: bool = True, decomposed: bool = False):
    shapes = ({0: Dim("batch", min=1, max=64)},) if dynamic else None
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    return program.run_decompositions() if decomposed else program


def _run(program, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return program.module()(x)


@pytest.mark.parametrize("decomposed", [False, True])
def test_program_in_program_out(decomposed: bool) -> None:
    model = _net()
    x = x_of(2, C, 6, 6)
    program = _export(model, x, decomposed=decomposed)
    before = {k: v.clone() for k, v in program.state_dict.items()}
    fused = reparam.fuse(program)
    assert isinstance(fused, torch.export.ExportedProgram)
    rep = fused.reparam_report
    assert rep.counted_on == "example inputs" and rep.check["max_rel"] < 1e-5, rep
    for batch in (1, 2, 7):  # the batch dim stays dynamic
        y = x_of(batch, C, 6, 6, seed=batch)
        assert_outputs_close(_run(program, y), _run(fused, y), rtol=1e-5)
        assert_outputs_close(model(y), _run(fused, y), rtol=1e-5)
    assert list(fused.range_constraints.values()) == list(program.range_constraints.values())
    ops = count_executed_ops(fused.module(), x)
    assert (ops["conv"], ops["batch_norm"], ops["linear"]) == (2, 0, 1), rep
    assert all(torch.equal(v, program.state_dict[k]) for k, v in before.items())  # the input is untouched
    assert fused.call_spec.in_spec == program.call_spec.in_spec


def test_untouched_state_keeps_its_names_and_fused_state_has_its_own() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(C, C, 3), nn.ReLU(), nn.Conv2d(C, C, 1), nn.PReLU()).eval()
    program = torch.export.export(model, (x_of(1, C, 6, 6),))
    fused = reparam.fuse(program)
    names = set(fused.state_dict)
    assert {"2.weight", "2.bias", "3.weight"} <= names  # untouched
    assert any("fused" in n for n in names) and not names & {"0.0.weight", "0.1.running_mean"}


def test_round_trip_save_load_module_and_onnx() -> None:
    pytest.importorskip("onnxscript")
    model = _net()
    x = x_of(2, C, 6, 6)
    fused = reparam.fuse(_export(model, x))
    buffer = io.BytesIO()
    torch.export.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    y = x_of(3, C, 6, 6, seed=3)
    assert_outputs_close(model(y), _run(loaded, y), rtol=1e-5)
    onnx_program = torch.onnx.export(fused, (y,), dynamo=True, verbose=False)
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString())
    (got,) = session.run(None, {session.get_inputs()[0].name: y.numpy()})
    assert_outputs_close(model(y), torch.from_numpy(got), rtol=1e-5)


@pytest.mark.parametrize("make,shape", [
    (MobileOneBlock, (2, C, 6, 6)), (PreNorm, (2, C, 6, 6)), (lambda: SplitBN("split"), (2, C, 6, 6)),
    (lambda: MixConv(), (2, 2 * C, 6, 6)), (LayerScale, (2, C, 6, 6)), (Tokens, (2, C, 8, 8)),
    (GatedResidual, (2, C, 6, 6))])
@pytest.mark.parametrize("decomposed", [False, True])
def test_idioms_through_export(make, shape, decomposed: bool) -> None:
    """The real-world idioms, exported and fused, against the eager model and the eager fusion."""
    if make is Tokens and decomposed:
        pytest.skip("decomposed, a Linear on transposed tokens becomes expand + bmm: not folded (docs/export.md)")
    torch.manual_seed(0)
    model = make()
    randomize_bn_(model, 0)
    model.eval()
    x = x_of(*shape)
    program = _export(model, x, dynamic=False, decomposed=decomposed)
    fused = reparam.fuse(program)
    eager = reparam.fuse(model, x)
    assert_outputs_close(model(x), _run(fused, x), rtol=1e-5)
    got = count_executed_ops(fused.module(), x)
    want = count_executed_ops(eager, x)
    assert (got["conv"], got["batch_norm"]) == (want["conv"], want["batch_norm"]), fused.reparam_report


def test_zoo_model_through_export() -> None:
    from reparam_zoo import repghostnet

    torch.manual_seed(0)
    model = repghostnet(0.5)
    randomize_bn_(model, 0)
    model.eval()
    x = x_of(1, 3, 64, 64)
    fused = reparam.fuse(torch.export.export(model, (x,)))
    eager = reparam.fuse(model, x)
    assert_outputs_close(model(x), _run(fused, x), rtol=1e-4)
    got, want = count_executed_ops(fused.module(), x), count_executed_ops(eager, x)
    assert got["batch_norm"] == want["batch_norm"] == 0 and got["conv"] == want["conv"]


def test_program_exported_in_training_mode_keeps_batch_statistics_with_a_reason() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(C, C, 3), nn.ReLU())
    program = torch.export.export(model.train(), (x_of(2, C, 6, 6),))
    fused = reparam.fuse(program)
    (left,) = fused.reparam_report.bn_left
    assert left.kind == "not-foldable" and "training" in left.reason, fused.reparam_report


@pytest.mark.parametrize("decomposed", [False, True])
def test_eval_mode_dropout_between_bn_and_linear_is_an_identity(decomposed: bool) -> None:
    """A classifier head ``linear(dropout(bn1d(mean(x))))`` (LeViT's): the exported eval-mode dropout is
    ``aten.dropout(x, p, False)``, a no-op, so the BN folds forward into the Linear as in the eager module."""
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(C, C, 3), nn.ReLU(), nn.Flatten(2), Mean(), nn.BatchNorm1d(C), nn.Dropout(0.2),
                          nn.Linear(C, 5))
    randomize_bn_(model, 0)
    model.eval()
    x = x_of(2, C, 6, 6)
    fused = reparam.fuse(_export(model, x, decomposed=decomposed))
    assert_outputs_close(model(x), _run(fused, x), rtol=1e-5)
    assert count_executed_ops(fused.module(), x)["batch_norm"] == 0, fused.reparam_report


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(2)


def test_module_of_a_program_is_fused_too() -> None:
    model = _net()
    x = x_of(2, C, 6, 6)
    module = _export(model, x).module()
    fused = reparam.fuse(module, x)
    assert_outputs_close(model(x), fused(x), rtol=1e-5)
    assert count_executed_ops(fused, x)["batch_norm"] == 0


@examples(6)
@given(net=architectures(ndim=2, cheap=True, transposed=False, max_stages=3), decomposed=st.booleans())
def test_random_architectures_through_export(net, decomposed: bool) -> None:
    x = net.example_input()
    program = torch.export.export(net, (x,), strict=False)
    if decomposed:
        program = program.run_decompositions()
    fused = reparam.fuse(program)
    assert_outputs_close(net(x), _run(fused, x), rtol=1e-4)
    got, want = count_executed_ops(fused.module(), x), net.expected_ops(allow_costlier=False)
    if want is not None:
        assert got["conv"] <= want["conv"] and got["batch_norm"] <= want["batch_norm"], (net.spec, fused.reparam_report)
