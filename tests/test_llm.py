"""Decoder LMs end to end on the sample decoder (sample_models/tiny_llama): language-model windows,
perplexity, GPTQ, tied embeddings."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from .conftest import SAMPLES, run_fresh  # noqa: E402

DECODER = SAMPLES / "tiny_llama"


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    from sample_models import decoder

    return decoder.write_windows(tmp_path_factory.mktemp("windows"))


def _perplexity(path, data, n: int = 96) -> float:
    from modelzip_cli.checkpoint import load_checkpoint
    from modelzip_cli.data import load_data
    from modelzip_cli.lm import lm_figures

    model = load_checkpoint(path).model
    x = load_data(data, require_targets=False).inputs[:n]
    return lm_figures([model], x)[0]["perplexity"]


def test_pack_cuts_documents_into_windows_and_splits_by_document(cli, tmp_path):
    from modelzip_cli.data import load_data
    from modelzip_cli.datamake import load_tokenizer

    docs = [f"Document number {i} says {'hello ' * (i + 3)}." for i in range(10)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = cli("data", "text", corpus, "--tokenizer", DECODER, "--pack", "--max-length", "16",
            "-o", tmp_path / "w.safetensors", "--split", "0.7")
    assert r.code == 0, r.stderr
    tok = load_tokenizer(DECODER)
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]  # + EOS each
    train, test = (load_data(tmp_path / f"w.{p}.safetensors", require_targets=False) for p in ("train", "test"))
    assert train.inputs.shape[-1] == 16
    real = [int(d.inputs[:, 1].sum()) if d.inputs.ndim == 3 else d.inputs.numel() for d in (train, test)]
    assert sum(real) == sum(lengths)  # every token once, padding masked out
    eos = tok.eos_token_id
    ends = [int(((d.inputs[:, 0] if d.inputs.ndim == 3 else d.inputs) == eos).sum()) for d in (train, test)]
    assert ends[0] >= 7 and ends[1] >= 3  # 7 documents / 3 documents, each ended by EOS (the pad is EOS too)


def test_perplexity_of_the_sample_decoder_on_held_out_windows(windows):
    ppl = _perplexity(DECODER, windows["heldout"], n=64)
    assert 20 < ppl < 200  # a trained model: far below the 2,048 of a uniform guess


def test_gptq_writes_weight_only_layers_that_reload_identically(cli, tmp_path, windows):
    """GPTQ's quality is asserted on layers in test_gptq.py and on perplexity by `make bench` (case llm)."""
    gptq = tmp_path / "gptq.safetensors"
    r = cli("quantize", DECODER, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-data",
            windows["calib"], "--calib-batches", "2", "-o", gptq, "--json")
    assert r.code == 0, r.stderr
    notes = r.json["steps"][0]["notes"]
    assert any("layer by layer over the 4 blocks" in n for n in notes) and any("model.lm_head" in n for n in notes)
    rows = {row["name"]: row for row in r.json["steps"][0]["layers"]}
    assert rows["model.model.layers.3.mlp.down_proj"]["gptq_loss"] > 0
    code = ("import sys, torch\nfrom modelzip_cli import load_model\nm = load_model(sys.argv[1])\n"
            "x = torch.arange(64).reshape(2, 32)\nwith torch.inference_mode():\n"
            "    torch.save(m(input_ids=x).logits, sys.argv[2])")
    proc = run_fresh(code, str(gptq), str(tmp_path / "fresh.pt"))
    assert proc.returncode == 0, proc.stderr
    from modelzip_cli import load_model

    model = load_model(gptq)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "WeightOnlyLinear"
    assert type(model.lm_head).__name__ == "Linear"
    with torch.inference_mode():
        here = model(input_ids=torch.arange(64).reshape(2, 32)).logits
    assert torch.equal(torch.load(tmp_path / "fresh.pt", weights_only=True), here)


def test_awq_folds_scales_into_norms_and_up_projections(cli, tmp_path, windows):
    awq = tmp_path / "awq.safetensors"
    r = cli("quantize", DECODER, "--method", "awq", "--group-size", "32", "--calib-data", windows["calib"],
            "--calib-batches", "2", "-o", awq, "--json")
    assert r.code == 0, r.stderr
    rows = {row["name"]: row for row in r.json["steps"][0]["layers"]}
    assert rows["model.model.layers.0.self_attn.q_proj"]["awq_folded_into"] == "model.model.layers.0.input_layernorm"
    assert rows["model.model.layers.0.mlp.down_proj"]["awq_folded_into"] == "model.model.layers.0.mlp.up_proj"
    assert rows["model.model.layers.0.self_attn.o_proj"]["awq_folded_into"] is None


def test_tied_embeddings_stay_tied_and_are_stored_once(cli, tmp_path):
    from safetensors import safe_open

    from modelzip_cli import load_model

    out = tmp_path / "p.safetensors"
    r = cli("prune", DECODER, "--ratio", "0.3", "-o", out)
    assert r.code == 0, r.stderr
    with safe_open(str(out), "pt") as f:
        stored = set(f.keys())
    assert any(k.startswith("model.model.embed_tokens.weight") for k in stored)
    assert not any(k.startswith("model.lm_head.weight") for k in stored)
    m = load_model(out)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert out.stat().st_size < (DECODER / "model.safetensors").stat().st_size


def test_wanda_and_sparsegpt_prune_half_of_each_selected_layer(cli, tmp_path, windows):
    for method in ("wanda", "sparsegpt"):
        out = tmp_path / f"{method}.safetensors"
        r = cli("prune", DECODER, "--method", method, "--ratio", "0.5", "--calib-data", windows["calib"],
                "--calib-batches", "2", "-o", out, "--json")
        assert r.code == 0, r.stderr
        step = r.json["steps"][0]
        assert abs(step["after"]["selected_sparsity"] - 0.5) < 0.01
        assert any("model.lm_head" in n for n in step["notes"])
        layers = {row["name"]: row for row in step["layers"]}
        assert layers["model.model.layers.0.mlp.up_proj"]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert layers["model.model.embed_tokens"]["sparsity"] == 0
