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
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.measure.perplexity import lm_figures
    from modelzip_cli.pipeline.data import load_data

    model = load_checkpoint(path).model
    x = load_data(data, require_targets=False).inputs[:n]
    return lm_figures([model], x)[0]["perplexity"]


def test_pack_cuts_documents_into_windows_and_splits_by_document(cli, tmp_path):
    from modelzip_cli.commands.data import load_tokenizer
    from modelzip_cli.pipeline.data import load_data

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


@pytest.fixture(scope="module")
def held_small(windows, tmp_path_factory):
    """24 held-out windows: enough for a perplexity, quick to run twice."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("held") / "held24.safetensors"
    save_file({k: v[:24].contiguous() for k, v in load_file(str(windows["heldout"])).items()}, str(path))
    return path


def test_eval_prints_perplexity_of_a_causal_lm(cli, held_small):
    r = cli("eval", DECODER, "--data", held_small, "--json")
    assert r.code == 0, r.stderr
    m = next(iter(r.json["metrics"].values()))
    assert 20 < m["perplexity"] < 200 and m["tokens"] == 24 * 127
    r = cli("eval", DECODER, "--data", held_small)
    assert "perplexity" in r.stderr and f"{m['perplexity']:.3f}" in r.stderr


def test_max_ppl_increase_gate_exits_1_and_keeps_the_output(cli, tmp_path, held_small):
    out = tmp_path / "q.safetensors"
    r = cli("quantize", DECODER, "--method", "weight-only", "--bits", "4", "--eval-data", held_small,
            "--max-ppl-increase", "0.001", "-o", out, "--json")
    assert r.code == 1, r.stderr
    gate = r.json["gate"]
    assert not gate["passed"] and gate["ppl_increase"] > 0.001 and gate["max_ppl_increase"] == 0.001
    assert out.exists() and "perplexity rose" in r.stderr
    m = r.json["metrics"]
    assert m["output"]["perplexity"] > m["input"]["perplexity"] and 0.5 < m["output"]["next_token_agreement"] < 1
    assert m["output"]["fidelity"]["cosine_mean"] > 0.9
    r = cli("quantize", DECODER, "--method", "weight-only", "--bits", "8", "--eval-data", held_small,
            "--max-ppl-increase", "5", "-o", tmp_path / "q8.safetensors")
    assert r.code == 0, r.stderr


def test_max_ppl_increase_needs_a_language_model(cli, tmp_path):
    from .conftest import DIGITS_TEACHER, DIGITS_TEST

    out = tmp_path / "d.safetensors"
    r = cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "--eval-data", DIGITS_TEST, "--max-ppl-increase", "5",
            "-o", out)
    assert r.code == 2 and "causal language model" in r.stderr and not out.exists()


def test_perplexity_more_than_doubled_is_never_silent(cli, tmp_path, held_small):
    r = cli("prune", DECODER, "--ratio", "0.9", "--eval-data", held_small, "-o", tmp_path / "p.safetensors",
            "--json")
    assert r.code == 0, r.stderr
    m = r.json["metrics"]
    assert m["output"]["perplexity"] > 2 * m["input"]["perplexity"]
    assert any(w.startswith("perplexity more than doubled") and f"{m['output']['perplexity']:.2f}" in w
               for w in r.json["warnings"])


def test_compare_language_models_side_by_side(cli, tmp_path, held_small):
    q = tmp_path / "q8.safetensors"
    assert cli("quantize", DECODER, "--method", "weight-only", "-o", q).code == 0
    r = cli("compare", DECODER, q, "--data", held_small, "--json")
    assert r.code == 0, r.stderr
    first, second = r.json["metrics"].values()
    assert first["next_token_agreement"] == 1.0 and 0.9 < second["next_token_agreement"] <= 1.0
    assert abs(second["perplexity"] / first["perplexity"] - 1) < 0.01  # int8 weight-only: near lossless
    assert second["fidelity"]["cosine_min"] > 0.99


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("step", [("quantize", "--method", "gptq"), ("quantize", "--method", "awq"),
                                  ("prune", "--method", "wanda", "--ratio", "0.5"),
                                  ("prune", "--method", "sparsegpt", "--ratio", "0.5"),
                                  ("prune", "--method", "structured", "--ratio", "0.25", "--recover")])
def test_device_cuda_without_cuda_is_one_line_and_exit_2(cli, tmp_path, windows, step):
    out = tmp_path / "out.safetensors"
    extra = ["--data", windows["calib"]] if "--recover" in step else []
    r = cli(step[0], DECODER, *step[1:], "--calib-data", windows["calib"], *extra, "--device", "cuda", "-o", out)
    assert r.code == 2 and "--device cuda" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr  # the line and its hint
    assert not out.exists() and not list(tmp_path.glob("*.json"))
