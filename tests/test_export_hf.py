"""`export --format hf | compressed-tensors`, and compressed-tensors directories as inputs: what the written
directory computes in a fresh process through transformers' own loader, against the modelzip model."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from .conftest import SAMPLES, run_fresh  # noqa: E402

DECODER = SAMPLES / "tiny_llama"
MLP = ["--include", "*mlp*"]  # structured pruning of the MLPs only (SwiGLU channels: gate, up and down together)
IDS = torch.arange(1, 65).reshape(2, 32) % 250  # token ids every model here has

FRESH_LOGITS = """
import sys, torch, transformers
out = {}
for folder in sys.argv[2:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.inference_mode():
        out[folder] = model(input_ids=torch.load(sys.argv[1])).logits
torch.save(out, sys.argv[1] + ".out")
"""


def _config(family: str):
    common = dict(vocab_size=256, num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=4, **common)
    return transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Random tiny Llama, Qwen2 and GPT-2 directories, and the sample decoder."""
    root = tmp_path_factory.mktemp("families")
    out = {"sample": DECODER}
    for family in ("llama", "qwen2", "gpt2"):
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(_config(family)).save_pretrained(root / family)
        out[family] = root / family
    return out


def _logits(model) -> torch.Tensor:
    """modelzip's logits on the format's own numerics: weight-only layers on their dequantized weights (the
    packed bf16 kernels a machine may choose round activations, ~3e-3 relative: wo_kernels.py)."""
    from modelzip_cli.kernels import weight_only as wo_kernels

    with torch.inference_mode(), wo_kernels.use_kernel("float"):
        return model(IDS).float()


def _modelzip_logits(path) -> torch.Tensor:
    from modelzip_cli.checkpoint.io import load_checkpoint

    return _logits(load_checkpoint(path).model)


def _fresh_logits(tmp_path, folders) -> dict:
    ids = tmp_path / "ids.pt"
    torch.save(IDS, ids)
    proc = run_fresh(FRESH_LOGITS, str(ids), *map(str, folders))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(str(ids) + ".out", weights_only=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _no_modelzip_key(folder) -> None:
    text = (folder / "config.json").read_text()
    assert "modelzip" not in text.lower()


def _weight_only(source, bits: int, group: int):
    """What `quantize --method weight-only` makes (every Linear but the LM head), without its measurements."""
    from modelzip_cli.checkpoint.edits import WeightOnlyEdit
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.nn.surgery import replace_module
    from modelzip_cli.nn.weight_only import WeightOnlyLinear

    loaded = load_checkpoint(source)
    names = [n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    for n in names:
        replace_module(loaded.model, n, WeightOnlyLinear.from_float(loaded.model.get_submodule(n), bits, group))
    loaded.manifest.edits.append(WeightOnlyEdit(modules=names, bits=bits, group_size=group).to_dict())
    return loaded


def _write(loaded, fmt: str, folder):
    """export_hf's writer on its own (the CLI's export adds the check and the measurements)."""
    from modelzip_cli.export import hf as export_hf

    dense = export_hf.dense_model(loaded, keep_quantized=fmt == "compressed-tensors")
    folder.mkdir()
    export_hf.write_dir(dense, fmt, folder, loaded.path if loaded.path and loaded.path.is_dir() else None)
    return folder


@pytest.mark.slow
def test_int4_int8_and_pruned_exports_load_in_transformers_with_the_same_logits(cli, tmp_path, families):
    """Llama, Qwen2 and the sample decoder, each int4 and int8 weight-only → compressed-tensors and structured
    pruned → hf, loaded by AutoModelForCausalLM in a fresh process: logits within 1e-3 of modelzip's."""
    from modelzip_cli.checkpoint.io import load_checkpoint

    expected = {}
    for family in ("llama", "qwen2", "sample"):
        source = families[family]
        for bits in (4, 8):
            loaded = _weight_only(source, bits, 32)
            folder = _write(loaded, "compressed-tensors", tmp_path / f"{family}-int{bits}")
            expected[folder] = _logits(loaded.model)
        pruned = tmp_path / f"{family}-pruned.safetensors"
        r = cli("prune", source, "--method", "structured", "--ratio", "0.25", *MLP, "-o", pruned, "-q")
        assert r.code == 0, r.stderr
        loaded = load_checkpoint(pruned)
        expected[_write(loaded, "hf", tmp_path / f"{family}-pruned-hf")] = _logits(loaded.model)
    loaded = load_checkpoint(DECODER)  # a float directory: its tokenizer and generation config travel along
    expected[_write(loaded, "hf", tmp_path / "sample-hf")] = _logits(loaded.model)
    fresh = _fresh_logits(tmp_path, expected)
    for folder, logits in expected.items():
        assert _relative(fresh[str(folder)], logits) <= 1e-3, folder
        _no_modelzip_key(folder)
    config = json.loads((tmp_path / "llama-int4" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and weights["num_bits"] == 4 and weights["group_size"] == 32
    assert not weights["symmetric"] and config["ignore"] == ["lm_head"]  # modelzip's int4 has zero points
    for family in ("llama", "qwen2", "sample"):
        pruned = json.loads((tmp_path / f"{family}-pruned-hf" / "config.json").read_text())
        original = json.loads((families[family] / "config.json").read_text())
        assert pruned["intermediate_size"] < original["intermediate_size"]
    assert all((tmp_path / "sample-hf" / n).is_file() for n in ("tokenizer.json", "generation_config.json"))


@pytest.mark.slow
def test_export_command_checks_the_written_directory(cli, tmp_path, families):
    """The CLI: the check's figures in the report's gate, the default output name, tokenizer copied."""
    ckpt = tmp_path / "q4.safetensors"
    assert cli("quantize", families["llama"], "--method", "weight-only", "--bits", "4", "--group-size", "32", "-o",
               ckpt, "-q").code == 0
    r = cli("export", ckpt, "--format", "compressed-tensors", "--batch-size", "2", "--json")
    assert r.code == 0, r.stderr
    folder = tmp_path / "q4-compressed-tensors"
    assert r.json["output"]["path"] == str(folder) and (folder / "config.json").is_file()
    assert r.json["gate"]["passed"] and r.json["gate"]["export_check"]["relative"] <= 1e-3
    assert r.json["output"]["bytes"] < 0.6 * (families["llama"] / "model.safetensors").stat().st_size
    r = cli("export", ckpt, "--format", "compressed-tensors")
    assert r.code == 2 and "already exists" in r.stderr


@pytest.mark.slow
def test_gpt2_float_export_and_uneven_widths_refused(cli, tmp_path, families):
    folder = tmp_path / "gpt2-hf"
    r = cli("export", families["gpt2"], "--format", "hf", "-o", folder, "--batch-size", "2", "--json")
    assert r.code == 0, r.stderr
    assert r.json["gate"]["export_check"]["relative"] <= 1e-3
    from modelzip_cli.export.hf import new_widths

    model = transformers.AutoModelForCausalLM.from_config(_config("llama"))
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    with pytest.raises(Exception, match="layers differ in width"):
        new_widths(model, _config("llama").to_dict())


def test_prune_uniform_gives_a_standard_config(cli, tmp_path, families):
    """A Llama whose first block's MLP was pruned alone has uneven widths: `export --format hf` says so in one line
    (exit 2, nothing written). `prune --uniform` cuts every block to the narrowest block's share (units still
    ranked within each block), and the directory loads in transformers with modelzip's logits."""
    from modelzip_cli.checkpoint.io import load_checkpoint

    from .conftest import one_line_error

    uneven, even = tmp_path / "uneven.safetensors", tmp_path / "even.safetensors"
    r = cli("prune", families["llama"], "--method", "structured", "--ratio", "0.25", "--include", "*layers.0.mlp*",
            "-o", uneven, "-q")
    assert r.code == 0, r.stderr
    r = cli("export", uneven, "--format", "hf", "-o", tmp_path / "uneven-hf")
    assert r.code == 2 and "layers differ in width (intermediate_size: 96 in" in one_line_error(r)
    assert not (tmp_path / "uneven-hf").exists()
    # --uniform with a selection that leaves some blocks' MLPs out: refused before any work
    r = cli("prune", families["llama"], "--method", "structured", "--ratio", "0.5", "--uniform", "--include",
            "*layers.0.mlp*", "-o", even)
    assert r.code == 2 and "--uniform: the selection prunes the MLP of 1 of 2 blocks" in one_line_error(r)
    r = cli("prune", uneven, "--method", "structured", "--ratio", "0.5", "--uniform", "-o", even, "--json", "-q")
    assert r.code == 0, r.stderr
    assert any("config updated: head_dim=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48"
               in n for n in r.json["steps"][0]["notes"])  # 96 → 48 and 128 → 48, not 64: one width
    loaded = load_checkpoint(even)
    folder = _write(loaded, "hf", tmp_path / "even-hf")
    config = json.loads((folder / "config.json").read_text())
    assert (config["intermediate_size"], config["num_key_value_heads"], config["num_attention_heads"]) == (48, 1, 2)
    _no_modelzip_key(folder)
    back = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.inference_mode():  # (in this process: the tests above load directories in a fresh one)
        assert _relative(back(input_ids=IDS).logits, _logits(loaded.model)) <= 1e-3


@pytest.mark.slow
def test_w8a8_and_refusals(cli, tmp_path, families):
    d8 = tmp_path / "d8.safetensors"
    assert cli("quantize", families["llama"], "--method", "dynamic", "-o", d8, "-q").code == 0
    r = cli("export", d8, "--format", "compressed-tensors", "-o", tmp_path / "d8-ct", "--batch-size", "2", "--json")
    assert r.code == 0, r.stderr
    check = r.json["gate"]["export_check"]
    assert check["cosine_min"] >= 0.999
    config = json.loads((tmp_path / "d8-ct" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == "int-quantized" and group["input_activations"]["strategy"] == "token"
    # a quantized model has no dense HF form; a float one no compressed-tensors form: exit 2, nothing written
    r = cli("export", d8, "--format", "hf", "-o", tmp_path / "no-hf")
    assert r.code == 2 and "compressed-tensors" in r.stderr and not (tmp_path / "no-hf").exists()
    r = cli("export", families["llama"], "--format", "compressed-tensors", "-o", tmp_path / "no-ct")
    assert r.code == 2 and not (tmp_path / "no-ct").exists()


@pytest.mark.slow
def test_lowrank_is_multiplied_back(cli, tmp_path, families):
    lr = tmp_path / "lr.safetensors"
    assert cli("lowrank", families["llama"], "--rank-ratio", "0.5", "--include", "*mlp*", "-o", lr, "-q").code == 0
    r = cli("export", lr, "--format", "hf", "-o", tmp_path / "lr-hf", "--batch-size", "2", "--json")
    assert r.code == 0, r.stderr
    assert any("multiplied back" in n for n in r.json["steps"][0]["notes"])
    assert r.json["gate"]["export_check"]["relative"] <= 1e-3


MAKE_CT = """
import sys, torch, transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
scheme = preset_name_to_scheme("W4A16", ["Linear"])
scheme.weights.group_size = 32
apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
for m in model.modules():
    if hasattr(m, "weight_scale"):  # llm-compressor's min-max weight observer, per group of 32
        g = m.weight.detach().reshape(m.weight.shape[0], -1, 32)
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
compressor = ModelCompressor.from_pretrained_model(model)
compressor.compress_model(model)
model.save_pretrained(sys.argv[2])
compressor.update_config(sys.argv[2])
"""


@pytest.mark.slow
def test_compressed_tensors_round_trip(cli, tmp_path, families):
    """A directory written by compressed-tensors itself → eval → prune → quantize → export → transformers."""
    src = tmp_path / "lib-ct"
    proc = run_fresh(MAKE_CT, str(families["llama"]), str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import save_file

    windows = tmp_path / "w.safetensors"
    save_file({"inputs": torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))}, windows)
    r = cli("eval", src, "--data", windows, "--json")
    assert r.code == 0, r.stderr
    assert any("read into modelzip's weight-only format exactly (int4 group 32)" in w for w in r.json["warnings"])
    fresh = _fresh_logits(tmp_path, [src])[str(src)]
    assert _relative(_modelzip_logits(src), fresh) <= 1e-5  # symmetric int4 is z = 8 in modelzip's codec
    pruned, q4, out = tmp_path / "p.safetensors", tmp_path / "q4.safetensors", tmp_path / "out-ct"
    r = cli("prune", src, "--method", "structured", "--ratio", "0.25", *MLP, "-o", pruned, "--json")
    assert r.code == 0, r.stderr
    assert any("dequantized to float" in w for w in r.json["warnings"])
    assert cli("quantize", pruned, "--method", "weight-only", "--bits", "4", "--group-size", "32", "-o", q4,
               "-q").code == 0
    r = cli("export", q4, "--format", "compressed-tensors", "--eval-data", windows, "-o", out, "--batch-size", "2",
            "--json")
    assert r.code == 0, r.stderr
    got = _fresh_logits(tmp_path, [out])[str(out)]
    assert _relative(got, _modelzip_logits(q4)) <= 1e-3
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
