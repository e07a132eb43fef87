"""Int8 that is faster or says so (issue 25, item 3)."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from tests.conftest import MNIST1D_TEACHER, MNIST1D_TRAIN


def test_dynamic_says_convolutions_are_not_covered_and_suggests_static(cli, tmp_path):
    r = cli("quantize", MNIST1D_TEACHER, "--method", "dynamic", "-o", tmp_path / "d.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    convs = [row["name"] for row in r.json["steps"][0]["layers"] if row["type"] == "Conv1d"]
    assert convs and all(row["scheme"] == "float32" for row in r.json["steps"][0]["layers"]
                         if row["name"] in convs)  # indeed left float
    warning = next(w for w in r.json["warnings"] if w.startswith("dynamic quantization covers Linear layers only"))
    assert all(name in warning for name in convs) and "--method static" in warning


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.Flatten(),
                         nn.Linear(8 * 40, 10)).eval()


def _static(model: nn.Module) -> nn.Module:
    from modelzip_cli.nn import int8

    q = copy.deepcopy(model)
    for name in ("0", "2"):
        q._modules[name] = int8.StaticInt8Conv.from_float(model._modules[name], 0.05, 0)
    return q


def test_static_int8_convolutions_that_run_slower_are_named(monkeypatch):
    from modelzip_cli.nn import int8
    from modelzip_cli.techniques.quantize import StaticConfig, conv_warnings

    reference = _conv_net()
    quantized = _static(reference)
    plain = int8.StaticInt8Conv.forward

    def slow(self, x):
        time.sleep(0.05)  # an int8 convolution 50 ms slower than its float original, whatever the load
        return plain(self, x)

    monkeypatch.setattr(int8.StaticInt8Conv, "forward", slow)
    x = torch.randn(16, 1, 40)
    [warning] = conv_warnings(reference, quantized, StaticConfig(), x, 16)
    assert warning.startswith("int8 is slower than the float model (batch 1: ")
    assert "batch 16: " in warning and "(0, 2)" in warning and "--exclude" in warning


def test_static_int8_at_the_float_speed_is_no_warning():
    from modelzip_cli.techniques.quantize import StaticConfig, conv_warnings

    quantized = _static(_conv_net())
    assert conv_warnings(copy.deepcopy(quantized), quantized, StaticConfig(), torch.randn(16, 1, 40), 16) == []


def test_static_cnn_report_carries_the_measurement(cli, tmp_path):
    """A real static quantization of the MNIST-1D CNN runs the check (its warnings are in the report, if any)."""
    r = cli("quantize", MNIST1D_TEACHER, "--method", "static", "--calib-data", MNIST1D_TRAIN,
            "-o", tmp_path / "s.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    assert r.json["steps"][0]["warnings"] == [w for w in r.json["warnings"] if w.startswith("int8 is slower")]
