"""Decoder language models of five families (random small configs built here) × the LLM techniques: each
run exits 0 with a checkpoint that reloads in a fresh process with identical logits, or exits 2 with one
line and nothing written; never 3, and no step takes a minute."""

from __future__ import annotations

import json
import time

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra is not installed")

from .conftest import DIGITS_TEACHER, FRESH_OUTPUTS_MANY, one_line_error, run_fresh  # noqa: E402

pytestmark = pytest.mark.slow  # one pytest-xdist worker runs it: conftest.ONE_WORKER

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
             max_position_embeddings=64)
FAMILIES = {  # name: (model_type, config)
    "llama": ("llama", {**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True}),  # GQA, tied
    "qwen2": ("qwen2", {**SMALL, "num_key_value_heads": 2}),
    "mistral": ("mistral", {**SMALL, "num_key_value_heads": 2}),
    "phi3": ("phi3", {**SMALL, "num_key_value_heads": 2, "pad_token_id": 0}),  # fused qkv and gate/up
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0,
                          eos_token_id=0)),  # Conv1D layers
}
TECHNIQUES = {
    "gptq": ["quantize", "--method", "gptq", "--calib-data", "{data}"],
    "awq": ["quantize", "--method", "awq", "--calib-data", "{data}"],
    "w8a8": ["quantize", "--method", "dynamic"],
    "wanda": ["prune", "--method", "wanda", "--ratio", "0.5", "--calib-data", "{data}"],
    "sparsegpt": ["prune", "--method", "sparsegpt", "--ratio", "0.5", "--calib-data", "{data}"],
    "structured": ["prune", "--method", "structured", "--ratio", "0.5", "--calib-data", "{data}"],
    "layers": ["prune", "--method", "layers", "--blocks", "1", "--calib-data", "{data}"],
    "weight-only-4": ["quantize", "--method", "weight-only", "--bits", "4"],
}
STEP_LIMIT_S = 60  # the bound on these tiny models; generous, so a slow shared machine does not fail it


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds contention (as in tests/cli_worker.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("decoders")
    torch.manual_seed(0)
    ids = torch.randint(1, 96, (16, 16))
    mask = torch.ones_like(ids)
    mask[::2, 12:] = 0  # half the windows padded
    save_file({"inputs": ids, "attention_mask": mask}, str(root / "tokens.safetensors"))
    for name, (model_type, config) in FAMILIES.items():
        config = transformers.AutoConfig.for_model(model_type, **config)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
    return root


RESULTS: dict[str, tuple[str, torch.Tensor]] = {}  # output file → (data file, logits in this process)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_llm_technique_exits_0_or_2_within_a_minute(cli, root, family):
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.pipeline.data import load_data

    data = root / "tokens.safetensors"
    x = load_data(data, require_targets=False).inputs[:8]
    ran = []
    for technique, template in TECHNIQUES.items():
        args = [a.format(data=data) for a in template]
        out = root / f"{family}-{technique}.safetensors"
        start = time.monotonic()
        r = cli(args[0], root / family, *args[1:], "-o", out, "--force", "-q")
        took = time.monotonic() - start
        assert r.code in (0, 2), f"{family} {technique}: exit {r.code}: {r.stderr}"
        assert took < STEP_LIMIT_S, f"{family} {technique} took {took:.0f} s"
        if r.code == 2:
            assert not out.exists(), one_line_error(r)
            continue
        with torch.inference_mode():
            RESULTS[str(out)] = (str(data), load_checkpoint(out).model(x))
        ran.append(technique)
    assert ran == list(TECHNIQUES), f"{family}: only {ran} ran"  # every one applies to these five families


def test_every_output_reloads_in_a_fresh_process_with_identical_logits(root):
    assert RESULTS, "the matrix wrote nothing"
    dest = root / "fresh.pt"
    proc = run_fresh(FRESH_OUTPUTS_MANY, json.dumps({k: v[0] for k, v in RESULTS.items()}), str(dest))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = torch.load(dest, weights_only=True)
    for path, (_, logits) in RESULTS.items():
        assert torch.equal(fresh[path], logits), path


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_structured_pruning_removes_whole_kv_groups_and_channels(cli, root, family):
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.nn.decoders import decoder_blocks, hf_config

    out = root / f"{family}-kv.safetensors"
    r = cli("prune", root / family, "--method", "structured", "--ratio", "0.5", "-o", out, "--force", "-q")
    assert r.code == 0, r.stderr
    model = load_checkpoint(out).model
    for block in decoder_blocks(model)[1]:
        a = block.attention
        assert a.heads == 2 and a.kv_heads == (1 if family != "gpt2" else 2), block.name
        assert block.mlp.width == (32 if family != "gpt2" else 64), block.name
    config = hf_config(model)
    if family != "gpt2":  # GPT-2's config cannot say fewer heads of the same size
        assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 32)


def test_layers_removes_the_blocks_that_change_their_input_least(cli, root):
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.nn.decoders import hf_config

    out = root / "llama-layers.safetensors"
    r = cli("prune", root / "llama", "--method", "layers", "--blocks", "1", "--calib-data",
            root / "tokens.safetensors", "-o", out, "--force", "--json")
    assert r.code == 0, r.stderr
    edit = r.json["steps"][0]
    loaded = load_checkpoint(out)
    (record,) = [e for e in loaded.manifest.edits if e["kind"] == "remove_blocks"]
    influence = record["influence"]
    assert record["removed"] == [min(range(len(influence)), key=influence.__getitem__)]
    assert hf_config(loaded.model).num_hidden_layers == 1 and edit["op"] == "prune"
    r = cli("prune", root / "llama", "--method", "layers", "--ratio", "0.1", "--calib-data",
            root / "tokens.safetensors", "-o", root / "none.safetensors")
    assert r.code == 2 and "rounds to none" in one_line_error(r)
    assert not (root / "none.safetensors").exists()


def test_gpt2_conv1d_becomes_linear_and_every_linear_technique_reaches_it(cli, root):
    from modelzip_cli.checkpoint.io import load_checkpoint

    loaded = load_checkpoint(root / "gpt2")
    assert not [m for m in loaded.model.modules() if type(m).__name__ == "Conv1D"]
    assert loaded.manifest.edits[0]["kind"] == "conv1d_to_linear"
    out = root / "gpt2-wo.safetensors"
    assert cli("quantize", root / "gpt2", "--method", "weight-only", "--bits", "4", "-o", out, "--force",
               "-q").code == 0
    kinds = {type(load_checkpoint(out).model.get_submodule(f"model.transformer.h.0.{n}")).__name__
             for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert kinds == {"WeightOnlyLinear"}


def test_structured_pruning_of_a_decoder_then_recovery_reloads(cli, root):
    from modelzip_cli.checkpoint.io import load_checkpoint

    data = root / "tokens.safetensors"
    out = root / "llama-recovered.safetensors"
    r = cli("prune", root / "llama", "--method", "structured", "--ratio", "0.5", "--calib-data", data, "--recover",
            "--data", data, "--finetune-epochs", "1", "-o", out, "--force", "--json")
    assert r.code == 0, r.stderr
    step = r.json["steps"][0]
    assert any("KV groups removed" in n for n in step["notes"]), step["notes"]
    assert any(e["kind"] == "prune_decoder" and e["importance"] == "activations"
               for e in load_checkpoint(out).manifest.edits)


def test_a_dependency_graph_search_past_its_bound_is_one_line(cli, tmp_path, monkeypatch):
    from modelzip_cli.techniques import prune

    monkeypatch.setattr(prune, "GRAPH_SECONDS", -1)
    out = tmp_path / "o.safetensors"
    r = cli("prune", DIGITS_TEACHER, "--method", "structured", "--ratio", "0.3", "-o", out, "-q")
    assert r.code == 2 and "dependency groups" in one_line_error(r)
    assert not out.exists()
