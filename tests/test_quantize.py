"""quantize: dynamic, static, qat and weight-only on the real sample models."""

from __future__ import annotations

import pytest
import torch

from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.techniques.quantize import WeightOnlyLinear

from .conftest import (
    DIGITS_TEACHER,
    DIGITS_TEST,
    DIGITS_TRAIN,
    MNIST1D_TEACHER,
    MNIST1D_TEST,
    MNIST1D_TRAIN,
    MNIST1D_TRANSFORMER,
    fresh_outputs,
    one_line_error,
    same_process_outputs,
)

METHODS = {
    "dynamic": [],
    "static": ["--calib-data", DIGITS_TRAIN],
    "qat": ["--data", DIGITS_TRAIN],
    "weight-only": [],
    "weight-only-4": ["--bits", "4"],
}


def _drop(rep: dict) -> float:
    return (rep["metrics"]["input"]["accuracy"] - rep["metrics"]["output"]["accuracy"]) * 100


@pytest.mark.parametrize("method", list(METHODS))
def test_digits_accuracy_size_and_fresh_reload(cli, tmp_path, method):
    out = tmp_path / f"{method}.safetensors"
    r = cli("quantize", DIGITS_TEACHER, "--method", method.removesuffix("-4"), *METHODS[method], "-o", out,
            "--eval-data", DIGITS_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    rep = r.json
    ratio = DIGITS_TEACHER.stat().st_size / out.stat().st_size
    if method == "weight-only-4":
        assert ratio >= 6.0
        assert _drop(rep) <= 1.0
    else:
        assert ratio >= 3.5
        assert _drop(rep) <= 0.5
    assert rep["steps"][0]["after"]["sqnr_db"] > 15
    schemes = {row["scheme"] for row in rep["steps"][0]["layers"]}
    assert not schemes & {"float32"}, schemes  # every Linear is quantized
    model = load_checkpoint(out).model
    assert torch.equal(fresh_outputs(out, DIGITS_TEST, tmp_path), same_process_outputs(model, DIGITS_TEST))


def test_pt_output_is_plain_integer_tensors(cli, tmp_path):
    out = tmp_path / "d.pt"
    assert cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "-o", out, "-q").code == 0
    archive = torch.load(out, weights_only=True)
    tensors = archive["tensors"]
    assert all(isinstance(t, torch.Tensor) and not t.is_quantized for t in tensors.values())
    assert any(t.dtype == torch.int8 for t in tensors.values())


def test_int4_is_packed_two_per_byte():
    lin = torch.nn.Linear(64, 8)
    q = WeightOnlyLinear.from_float(lin, 4, 32)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (8, 32)
    err = (q.dequantized_weight() - lin.weight).abs().max()
    assert err <= q.scales.max() / 2 + 1e-6  # within half a quantization step
    odd = WeightOnlyLinear.from_float(torch.nn.Linear(13, 3), 4, 0)  # odd width, per channel
    assert odd.dequantized_weight().shape == (3, 13)


@pytest.mark.slow
def test_mnist1d_static_loses_at_most_one_point(cli, tmp_path):
    r = cli("quantize", MNIST1D_TEACHER, "--method", "static", "--calib-data", MNIST1D_TRAIN, "-o",
            tmp_path / "s.safetensors", "--eval-data", MNIST1D_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    assert _drop(r.json) <= 1.0
    model = load_checkpoint(tmp_path / "s.safetensors").model
    assert torch.equal(fresh_outputs(tmp_path / "s.safetensors", MNIST1D_TEST, tmp_path),
                       same_process_outputs(model, MNIST1D_TEST))


@pytest.mark.parametrize("method", ["dynamic", "weight-only"])
def test_transformer_every_block_linear_quantized(cli, tmp_path, method):
    out = tmp_path / f"t-{method}.safetensors"
    r = cli("quantize", MNIST1D_TRANSFORMER, "--method", method, "-o", out, "--eval-data", MNIST1D_TEST,
            "--json", "-q")
    assert r.code == 0, r.stderr
    assert _drop(r.json) <= 1.0
    rows = {row["name"]: row for row in r.json["steps"][0]["layers"]}
    float_model = load_checkpoint(MNIST1D_TRANSFORMER).model
    block_linears = [n for n, m in float_model.named_modules() if n.startswith("blocks.")
                     and isinstance(m, torch.nn.Linear)]
    assert len(block_linears) == 12
    for name in block_linears:
        assert rows[name]["scheme"] != "float32", rows[name]
    model = load_checkpoint(out).model
    assert torch.equal(fresh_outputs(out, MNIST1D_TEST, tmp_path), same_process_outputs(model, MNIST1D_TEST))


def test_quantize_bad_inputs_exit_2_and_write_nothing(cli, tmp_path):
    q = tmp_path / "q.safetensors"
    assert cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "-o", q, "-q").code == 0
    cases = {
        "static without calibration data": [DIGITS_TEACHER, "--method", "static"],
        "qat without data": [DIGITS_TEACHER, "--method", "qat"],
        "bits 3": [DIGITS_TEACHER, "--method", "weight-only", "--bits", "3"],
        "int4 dynamic": [DIGITS_TEACHER, "--method", "dynamic", "--bits", "4"],
        "nothing quantizable": [DIGITS_TEACHER, "--method", "dynamic", "--include", "layers.1"],
        "calibration data of the wrong shape": [DIGITS_TEACHER, "--method", "static", "--calib-data",
                                                MNIST1D_TRAIN],
        "already quantized": [q, "--method", "weight-only"],
        "unknown method": [DIGITS_TEACHER, "--method", "fp8"],
    }
    before = set(tmp_path.iterdir())
    for what, args in cases.items():
        r = cli("quantize", *args, "-o", tmp_path / "out.safetensors")
        assert r.code == 2, f"{what}: {r.code} {r.stderr}"
        one_line_error(r)
    assert set(tmp_path.iterdir()) == before


def test_no_deprecation_warning_reaches_the_terminal(tmp_path):
    from .conftest import run_modelzip

    r = run_modelzip("quantize", DIGITS_TEACHER, "--method", "static", "--calib-data", DIGITS_TRAIN, "-o",
                     tmp_path / "s.pt", "-q")
    assert r.returncode == 0, r.stderr
    assert "deprecat" not in r.stderr.lower() and "warn" not in r.stderr.lower(), r.stderr
    r = run_modelzip("eval", tmp_path / "s.pt", "--data", DIGITS_TEST, "-q")
    assert r.returncode == 0 and "deprecat" not in r.stderr.lower(), r.stderr


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.gru = torch.nn.GRU(16, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):  # (B, T, 8) → (B, 4)
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y[:, -1])


def test_dynamic_quantizes_the_linears_of_a_recurrent_model_and_says_lstm_and_gru_stay_float():
    from modelzip_cli.checkpoint.io import Manifest
    from modelzip_cli.nn import int8
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.techniques.quantize import DynamicConfig, apply

    torch.manual_seed(0)
    model = _Recurrent().eval()
    x = torch.randn(4, 5, 8)
    step = apply(model, DynamicConfig(), Context(example_input=x[:1]),
                 Manifest(arch="tests:recurrent", input_shape=[1, 5, 8]))
    q, manifest = step.model, Manifest(arch="tests:recurrent").with_edits(step.edits)
    assert manifest.edits[0]["modules"] == ["head"]
    assert isinstance(q.head, int8.DynamicInt8Linear)
    assert type(q.lstm) is torch.nn.LSTM and type(q.gru) is torch.nn.GRU
    assert any("lstm, gru" in n and "float" in n for n in step.notes), step.notes
    assert step.after["sqnr_db"] > 20


def test_pruned_then_quantized_weights_stay_compact(cli, tmp_path):
    dense_q = tmp_path / "q.safetensors"
    pruned = tmp_path / "p.safetensors"
    sparse_q = tmp_path / "pq.safetensors"
    assert cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "-o", dense_q, "-q").code == 0
    assert cli("prune", DIGITS_TEACHER, "--ratio", "0.7", "-o", pruned, "-q").code == 0
    assert cli("quantize", pruned, "--method", "dynamic", "-o", sparse_q, "-q").code == 0
    # int8 zeros are stored as a bitmask too: 70% zeros → well under the dense int8 file
    assert sparse_q.stat().st_size < 0.6 * dense_q.stat().st_size
    model = load_checkpoint(sparse_q).model
    assert torch.equal(fresh_outputs(sparse_q, DIGITS_TEST, tmp_path), same_process_outputs(model, DIGITS_TEST))


@pytest.mark.parametrize("method", ["dynamic", "weight-only"])
def test_apply_keeps_no_copy_of_the_model_and_its_sqnr_is_the_copys(monkeypatch, method):
    """The SQNR probe compares against float outputs kept before quantizing, not a deep copy of the model (a
    second model's bytes at the peak): the same figure as against a copy, and no copy made."""
    import copy
    import math

    from modelzip_cli.checkpoint.format import Manifest
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.techniques import quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    reference = copy.deepcopy(model)
    ctx = Context(example_input=torch.randn(1, 32))
    x, _ = quantize._probe_inputs(ctx)
    cfg = quantize.DynamicConfig() if method == "dynamic" else quantize.WeightOnlyConfig(bits=4, group_size=16)

    deepcopy = copy.deepcopy

    def refused(obj, *args, **kwargs):
        if obj is model:
            raise AssertionError("quantize.apply copied the model")
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", refused)
    result = quantize.apply(model, cfg, ctx, Manifest(arch=None))
    monkeypatch.undo()
    with torch.no_grad():
        a, b = reference(x), result.model(x)
    signal, noise = (float(t.pow(2).sum(dtype=torch.float64)) for t in (a, a - b))
    expected = 10 * math.log10(signal / noise)
    assert result.after["sqnr_db"] == pytest.approx(expected, abs=1e-2) and result.after["sqnr_db"] > 10
