"""Streamed transforms (streaming.py), sharded checkpoints (shards.py) and --max-memory (memory.py).

The streamed path must write exactly what the whole-model path writes: every tensor bit for bit, and the
same manifest (edits, encodings, layer table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from modelzip_cli import load_model, save_model
from modelzip_cli.commands import streaming
from modelzip_cli.files import Outputs
from modelzip_cli.techniques.prune import MagnitudeConfig, kth_magnitude
from modelzip_cli.techniques.quantize import WeightOnlyConfig
from tests.conftest import DIGITS_TEACHER, MNIST1D_TRANSFORMER, SAMPLES, one_line_error

TINY_LLAMA = SAMPLES / "tiny_llama"


def _run(cli, monkeypatch, stream: bool, model: Path, out: Path, *args: str):
    monkeypatch.setattr(streaming, "STREAM_FROM", 0 if stream else 1 << 60)
    result = cli(args[0], model, *args[1:], "-o", out, "--quiet")
    assert result.code == 0, result.stderr
    return json.loads(Path(f"{out}.json").read_text())


def _contents(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["modelzip"])


def _same_file_contents(a: Path, b: Path) -> None:
    (ta, ma), (tb, mb) = _contents(a), _contents(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ma.pop("tool_version"), mb.pop("tool_version")
    assert ma == mb


CASES = [
    (MNIST1D_TRANSFORMER, ("quantize", "--method", "weight-only", "--bits", "4", "--group-size", "32")),
    (DIGITS_TEACHER, ("quantize", "--method", "weight-only", "--bits", "8", "--group-size", "0")),
    (DIGITS_TEACHER, ("prune", "--ratio", "0.5")),
    (DIGITS_TEACHER, ("prune", "--ratio", "0.3", "--scope", "layer")),
    pytest.param(TINY_LLAMA, ("quantize", "--method", "weight-only", "--bits", "4"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("model", "args"), CASES, ids=lambda c: c.name if isinstance(c, Path) else "-".join(c))
def test_streamed_equals_whole_model(cli, monkeypatch, tmp_path, model, args):
    whole = _run(cli, monkeypatch, False, model, tmp_path / "whole.safetensors", *args)
    streamed = _run(cli, monkeypatch, True, model, tmp_path / "streamed.safetensors", *args)
    assert not whole["steps"][0]["notes"][0].startswith("streamed")
    assert streamed["steps"][0]["notes"][0].startswith("streamed")
    _same_file_contents(tmp_path / "whole.safetensors", tmp_path / "streamed.safetensors")
    for key in ("parameters", "bytes"):
        assert streamed["steps"][0]["after"][key] == whole["steps"][0]["after"][key]
        assert streamed["steps"][0]["before"][key] == whole["steps"][0]["before"][key]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_global_threshold_exact_with_ties_in_half_precision(cli, monkeypatch, tmp_path, dtype):
    """bf16 skips the second counting pass, fp16 needs it; weights rounded to a few values make many ties, which
    both paths break in storage order."""
    model = load_model(MNIST1D_TRANSFORMER)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 8).round() / 8)
    half = tmp_path / "half.safetensors"
    save_model(model.to(dtype), half)
    args = ("prune", "--ratio", "0.6")
    _run(cli, monkeypatch, False, half, tmp_path / "whole.safetensors", *args)
    _run(cli, monkeypatch, True, half, tmp_path / "streamed.safetensors", *args)
    _same_file_contents(tmp_path / "whole.safetensors", tmp_path / "streamed.safetensors")


@pytest.mark.parametrize("ratio", [0.0001, 0.37, 0.5, 0.999])
def test_global_threshold_is_the_exact_kth_magnitude(ratio):
    """Read from disk as it goes, the threshold is the k-th smallest |w| found by a full sort, ties counted."""
    src = streaming.open_source(DIGITS_TEACHER)
    keys = [k for k in src.files.keys() if k.endswith("weight")]
    values = torch.cat([src.files.get(k).float().abs().flatten() for k in keys])
    values = (values * 64).round() / 64  # many ties
    k = round(ratio * values.numel())
    threshold = float(torch.sort(values).values[k - 1])
    tensors = list(torch.split(values, [src.files.get(k).numel() for k in keys]))
    assert kth_magnitude(tensors, k) == (threshold, k - int((values < threshold).sum()))
    assert streaming.global_threshold(src, keys, k) == kth_magnitude([src.files.get(k) for k in keys], k)


def test_sharded_output_reloads_and_inspects(cli, tmp_path):
    src = streaming.open_source(MNIST1D_TRANSFORMER)
    out = tmp_path / "m.safetensors"
    with Outputs() as staged:
        result = streaming.run_streamed(src, MagnitudeConfig(ratio=0.5), out, staged, shard_bytes=40_000)
        staged.commit()
    index = tmp_path / "m.safetensors.index.json"
    assert result.path == index and not out.exists()
    shard_files = sorted(tmp_path.glob("m-*-of-*.safetensors"))
    assert len(shard_files) > 2
    assert result.bytes == index.stat().st_size + sum(f.stat().st_size for f in shard_files)
    whole = tmp_path / "whole.safetensors"
    assert cli("prune", MNIST1D_TRANSFORMER, "--ratio", "0.5", "-o", whole, "-q").code == 0
    a, b = load_model(index).state_dict(), load_model(whole).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(out).state_dict().keys() == a.keys()  # the name written resolves to its index
    shown = cli("inspect", out, "--json")
    assert shown.code == 0 and "shards" in shown.json["model"]["format"]
    assert shown.json["input"]["bytes"] == result.bytes
    # a streamed step can read a sharded input too
    again = tmp_path / "again.safetensors"
    with Outputs() as staged:
        streaming.run_streamed(streaming.open_source(index), WeightOnlyConfig(bits=8), again, staged)
        staged.commit()
    assert load_model(again) is not None


@pytest.mark.parametrize("stream", [False, True])
def test_max_memory_below_estimate_writes_nothing(cli, monkeypatch, tmp_path, stream):
    monkeypatch.setattr(streaming, "STREAM_FROM", 0 if stream else 1 << 60)
    out = tmp_path / "out.safetensors"
    result = cli("prune", DIGITS_TEACHER, "--ratio", "0.5", "-o", out, "--max-memory", "100KB")
    assert result.code == 2
    assert "--max-memory" in one_line_error(result)
    assert list(tmp_path.iterdir()) == []
    assert cli("prune", DIGITS_TEACHER, "--ratio", "0.5", "-o", out, "--max-memory", "8GB", "-q").code == 0
    assert out.exists()


def test_max_memory_not_a_size(cli, tmp_path):
    result = cli("quantize", DIGITS_TEACHER, "--method", "weight-only", "-o", tmp_path / "o.safetensors",
                 "--max-memory", "lots")
    assert result.code == 2 and "--max-memory" in one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_streamed_nan_writes_nothing(cli, monkeypatch, tmp_path):
    model = load_model(DIGITS_TEACHER)
    bad = tmp_path / "bad.safetensors"
    save_model(model, bad)
    tensors, _ = _contents(bad)
    from safetensors.torch import save_file

    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name][0] = float("nan")
    with safe_open(str(bad), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(bad), metadata=meta)
    monkeypatch.setattr(streaming, "STREAM_FROM", 0)
    out = tmp_path / "out.safetensors"
    result = cli("prune", bad, "--ratio", "0.5", "-o", out, "-q")
    assert result.code == 2 and "non-finite" in one_line_error(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_max_memory_estimate_leaves_out_offloaded_activations(tmp_path):
    """--offload-activations keeps the block boundaries on disk: the estimate counts the model alone."""
    from safetensors.torch import save_file

    from modelzip_cli.checkpoint import memory
    from tests.conftest import SAMPLES

    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": torch.zeros(512, 256, dtype=torch.int64)}, str(calib))
    decoder = SAMPLES / "tiny_llama"
    held = memory.whole_model(decoder, calib)
    offloaded = memory.whole_model(decoder, calib, offloaded=True)
    assert held.bytes - offloaded.bytes == 16 * 512 * 256 * memory.hidden_size(decoder)
    assert offloaded.bytes == memory.whole_model(decoder).bytes
