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


@pytest.mark.slow
def test_gptq_int4_cuts_round_to_nearests_perplexity_increase_and_reloads(cli, tmp_path, windows):
    gptq, rtn = tmp_path / "gptq.safetensors", tmp_path / "rtn.safetensors"
    r = cli("quantize", DECODER, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-data",
            windows["calib"], "--calib-batches", "6", "-o", gptq, "--json")
    assert r.code == 0, r.stderr
    notes = r.json["steps"][0]["notes"]
    assert any("layer by layer over the 4 blocks" in n for n in notes) and any("model.lm_head" in n for n in notes)
    r = cli("quantize", DECODER, "--method", "weight-only", "--bits", "4", "--group-size", "32",
            "--exclude", "model.lm_head", "-o", rtn)
    assert r.code == 0, r.stderr
    base, p_gptq, p_rtn = (_perplexity(p, windows["heldout"]) for p in (DECODER, gptq, rtn))
    assert p_rtn > base and p_gptq - base < (p_rtn - base) / 2, (base, p_gptq, p_rtn)
    # a fresh process rebuilds the same model
    code = ("import sys, torch\nfrom modelzip_cli import load_model\nm = load_model(sys.argv[1])\n"
            "x = torch.arange(64).reshape(2, 32)\nwith torch.inference_mode():\n"
            "    torch.save(m(input_ids=x).logits, sys.argv[2])")
    proc = run_fresh(code, str(gptq), str(tmp_path / "fresh.pt"))
    assert proc.returncode == 0, proc.stderr
    from modelzip_cli import load_model

    with torch.inference_mode():
        here = load_model(gptq)(input_ids=torch.arange(64).reshape(2, 32)).logits
    assert torch.equal(torch.load(tmp_path / "fresh.pt", weights_only=True), here)


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


@pytest.mark.slow
def test_sparsegpt_half_the_weights_keeps_perplexity_closer_than_magnitude(cli, tmp_path, windows):
    outs = {}
    for method in ("magnitude", "sparsegpt"):
        outs[method] = tmp_path / f"{method}.safetensors"
        extra = ["--calib-data", windows["calib"], "--calib-batches", "6"] if method != "magnitude" else []
        r = cli("prune", DECODER, "--method", method, "--ratio", "0.5", "--scope", "layer", *extra,
                "--exclude", "model.lm_head", "--exclude", "model.model.embed_tokens", "-o", outs[method],
                "--json") if method == "magnitude" else cli(
                "prune", DECODER, "--method", method, "--ratio", "0.5", *extra, "-o", outs[method], "--json")
        assert r.code == 0, r.stderr
        assert abs(r.json["steps"][0]["after"]["selected_sparsity"] - 0.5) < 0.01
    base = _perplexity(DECODER, windows["heldout"], n=64)
    p_mag, p_sgpt = (_perplexity(outs[m], windows["heldout"], n=64) for m in ("magnitude", "sparsegpt"))
    # measured: 89.95 → magnitude 96.66, sparsegpt 93.80 (on this 1 M-parameter model the gap is smaller than
    # on billion-parameter LMs with activation outliers)
    assert p_sgpt - base < 0.75 * (p_mag - base), (base, p_mag, p_sgpt)
