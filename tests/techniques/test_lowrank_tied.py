"""lowrank of a decoder with tied embeddings: the tied output layer stays tied unless named, and an output
larger on disk than its input is said with both sizes."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from ..conftest import SAMPLES  # noqa: E402

DECODER = SAMPLES / "tiny_llama"


def test_tied_output_layer_is_left_tied_and_the_file_does_not_grow(cli, tmp_path):
    from modelzip_cli import load_model

    out = tmp_path / "lr.safetensors"
    r = cli("lowrank", DECODER, "--rank-ratio", "0.5", "-o", out, "--json")
    assert r.code == 0, r.stderr
    step = r.json["steps"][0]
    assert any("model.lm_head (with model.model.embed_tokens)" in n for n in step["notes"])
    m = load_model(out)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert r.json["output"]["bytes"] < r.json["input"]["bytes"]
    assert not any("larger on disk" in w for w in r.json["warnings"])


def test_a_larger_output_is_said_with_both_sizes(cli, tmp_path):
    out = tmp_path / "lr.safetensors"
    # named, the tied head is factorized: its two factors are stored beside the embedding it shared
    r = cli("lowrank", DECODER, "--include", "model.lm_head", "--rank-ratio", "0.9", "-o", out, "--json")
    assert r.code == 0, r.stderr
    before, after = r.json["input"]["bytes"], r.json["output"]["bytes"]
    assert after > before
    assert any(w.startswith("the output is larger on disk than the input") and f"{after:,}" in w and f"{before:,}" in w
               for w in r.json["warnings"])
