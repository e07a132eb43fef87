"""GGUF: the sample decoder and random Qwen2 / Mistral / GPT-2 configs written as F16, Q8_0, Q4_0 and Q4_1, read back by
the gguf reader and transformers' GGUF loader, and compared with modelzip's model on held-out windows; the
direct maps of weight-only integers into GGUF blocks; .gguf files as inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="the gguf extra is not installed")

from modelzip_cli.checkpoint.io import load_checkpoint  # noqa: E402
from modelzip_cli.export import gguf as gguf_export  # noqa: E402
from modelzip_cli.measure.perplexity import lm_figures  # noqa: E402
from modelzip_cli.pipeline.data import load_data  # noqa: E402

from .conftest import SAMPLES  # noqa: E402

DECODER = SAMPLES / "tiny_llama"


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """16 held-out windows of the sample decoder (documents it never saw)."""
    from safetensors.torch import load_file, save_file

    from sample_models import decoder

    root = tmp_path_factory.mktemp("gguf_windows")
    windows = decoder.write_windows(root)
    path = root / "held16.safetensors"
    save_file({k: v[:16].contiguous() for k, v in load_file(str(windows["heldout"])).items()}, str(path))
    return load_data(path, require_targets=False).inputs


@pytest.fixture(scope="module")
def int4_g32(tmp_path_factory):
    """The sample decoder weight-only int4 with groups of 32 (asymmetric: a zero point per group)."""
    from modelzip_cli.cli.app import run

    out = tmp_path_factory.mktemp("gguf_int4") / "d4.safetensors"
    assert run(["quantize", str(DECODER), "--method", "weight-only", "--bits", "4", "--group-size", "32",
                "-o", str(out), "-q"]) == 0
    return out


def gguf_of(path, gguf_type, tmp_path):
    loaded = load_checkpoint(path)
    out = tmp_path / f"m.{gguf_type}.gguf"
    plan = gguf_export.write_gguf(loaded.model, loaded.manifest.arch_kwargs["config"], gguf_type, DECODER, out, "m")
    return loaded, out, plan


def perplexities(a, b, x) -> tuple[float, float]:
    fa, fb = lm_figures([a, b], x)
    return fa["perplexity"], fb["perplexity"]


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_sample_decoder_gguf_reads_back_within_one_percent(gguf_type, held, tmp_path):
    """Q8_0 of the float decoder, and Q4_0 of a model whose int4 groups are Q4_0's own (symmetric, zero point 8,
    groups of 32: mapped without rounding again), so that both sides hold the same integers."""
    loaded = load_checkpoint(DECODER)
    if gguf_type == "q4_0":  # a modelzip int4 model on Q4_0's grid: quantized here, stored as weight-only layers
        from modelzip_cli.nn.surgery import replace_module
        from modelzip_cli.nn.weight_only import WeightOnlyLinear

        hf = loaded.model.model
        for name, m in list(hf.named_modules()):
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                q = WeightOnlyLinear.from_float(m, 4, 32)
                w = m.weight.detach().float().reshape(m.out_features, -1, 32)  # (N, groups, 32)
                scale = w.abs().amax(-1) / 7.5  # Q4_0's grid: (q − 8)·d, q in 0..15
                ints = (torch.round(w / scale[..., None]) + 8).clamp(0, 15).reshape(m.out_features, -1)
                q.qweight.copy_((ints[:, 0::2] + 16 * ints[:, 1::2]).to(torch.uint8))
                q.scales.copy_(scale)
                q.zero_points.fill_(8)
                replace_module(hf, name, q)
    out = tmp_path / f"m.{gguf_type}.gguf"
    plan = gguf_export.write_gguf(loaded.model, loaded.manifest.arch_kwargs["config"], gguf_type, DECODER, out, "m")
    if gguf_type == "q4_0":
        assert all(h.endswith("direct") for n, h in plan.how.items() if n.startswith("blk.") and "norm" not in n)
    back = gguf_export.read_back(out, plan)
    assert back["architecture"] == "llama" and back["types"][gguf_type.upper()] >= 28
    model, _ = gguf_export.load_gguf(out)
    ours, theirs = perplexities(loaded.model, model, held)
    assert abs(theirs / ours - 1) <= 0.01, (ours, theirs)
    # the gguf reader's own dequantization of a query projection is modelzip's weight in llama.cpp's row order
    reader = gguf.GGUFReader(str(out))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type)).reshape(128, 128)
    q_proj = loaded.model.model.model.layers[0].self_attn.q_proj
    ref = (q_proj.dequantized_weight() if hasattr(q_proj, "dequantized_weight") else q_proj.weight).detach()
    ref = ref[gguf_export._rotary_rows(128, 4)]
    assert (w - ref).abs().max() <= 0.01 * ref.abs().max()


@pytest.mark.slow
def test_int4_model_maps_directly_onto_q4_1(int4_g32, held, tmp_path):
    loaded, out, plan = gguf_of(int4_g32, "q4_1", tmp_path)
    direct = [n for n, h in plan.how.items() if h == "Q4_1 direct"]
    assert len(direct) == 28 and any("mapped directly" in n for n in plan.notes)
    model, _ = gguf_export.load_gguf(out)
    ours, theirs = perplexities(loaded.model, model, held)
    assert abs(theirs / ours - 1) <= 0.002, (ours, theirs)  # only the float16 scales differ
    # an int4 model into Q4_0 is requantized (its zero points are not all 8), and says so
    plan0 = gguf_export.write_gguf(loaded.model, loaded.manifest.arch_kwargs["config"], "q4_0", DECODER,
                                   tmp_path / "r.gguf", "m")
    assert any("requantized" in n for n in plan0.notes)


@pytest.mark.slow
def test_export_command_checks_the_gguf_and_it_is_an_input(cli, int4_g32, tmp_path):
    from safetensors.torch import save_file

    x = torch.randint(1, 2048, (4, 48), generator=torch.Generator().manual_seed(0))
    save_file({"inputs": x}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "d4.gguf"
    r = cli("export", int4_g32, "--format", "gguf", "--tokenizer", DECODER, "-o", out, "--eval-data",
            tmp_path / "w.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    step = r.json["steps"][0]
    assert step["after"]["gguf_type"] == "q4_1"  # auto: int4 → q4_1
    assert step["after"]["checks"][1]["tokenizer"]["same_ids"] is True
    gate = r.json["gate"]["export_agreement"]
    assert gate["criterion"] == "perplexity" and gate["passed"] and abs(gate["ppl_change_pct"]) <= 1
    # a modelzip checkpoint without --tokenizer: exit 2, nothing written
    r = cli("export", int4_g32, "--format", "gguf", "-o", tmp_path / "none.gguf")
    assert r.code == 2 and "--tokenizer" in r.stderr and not (tmp_path / "none.gguf").exists()
    # the .gguf as an input: inspect its header, quantize it further
    r = cli("inspect", out, "--json")
    assert r.code == 0 and r.json["model"]["format"] == "gguf"
    assert {row["scheme"] for row in r.json["model"]["layers"]} >= {"Q4_1", "F32"}
    q = tmp_path / "again.safetensors"
    r = cli("quantize", out, "--method", "weight-only", "--bits", "8", "-o", q, "--json", "-q")
    assert r.code == 0, r.stderr
    assert any("dequantized to float32" in w for w in r.json["warnings"])
    assert load_checkpoint(q).manifest.arch == "hf:causal-lm"


def _random_folder(config, folder):
    """A random model of `config` saved as transformers saves it, the sample decoder's tokenizer beside it,
    loaded as modelzip loads it."""
    import transformers

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DECODER / name, folder / name)
    return load_checkpoint(folder)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_random_qwen2_and_mistral_configs(family, tmp_path):
    """Tiny random models of the other families (the sample decoder's tokenizer beside them)."""
    import transformers

    common = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = (transformers.Qwen2Config(**common) if family == "qwen2" else transformers.MistralConfig(**common))
    folder = tmp_path / family
    loaded = _random_folder(config, folder)
    out = tmp_path / f"{family}.gguf"
    config = loaded.manifest.arch_kwargs["config"]
    plan = gguf_export.write_gguf(loaded.model, config, "f16", folder, out, f"tiny-{family}")
    assert gguf_export.read_back(out, plan)["architecture"] == ("qwen2" if family == "qwen2" else "llama")
    back, _ = gguf_export.load_gguf(out)
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = loaded.model(ids), back(ids)
    assert float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()) >= 0.999
    if family == "mistral":  # (transformers rebuilds a qwen2 file's tokenizer with Qwen2's splitting, whatever
        # the file's pre-tokenizer says; this borrowed GPT-2-style tokenizer is not Qwen2's)
        assert gguf_export.check_tokenizer(out, folder)["same_ids"]


def test_random_gpt2_config_q8_0(tmp_path):
    """GPT-2 (learned positions, LayerNorms, fused qkv, Conv1D weights stored as the Linears they compute): Q8_0
    read back by the gguf reader and transformers' GGUF loader, perplexity within 1% of modelzip's model."""
    import transformers

    config = transformers.GPT2Config(vocab_size=2048, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "gpt2"
    loaded = _random_folder(config, folder)
    out = tmp_path / "gpt2.gguf"
    plan = gguf_export.write_gguf(loaded.model, loaded.manifest.arch_kwargs["config"], "q8_0", folder, out, "g")
    back = gguf_export.read_back(out, plan)
    assert back["architecture"] == "gpt2" and back["types"] == {"Q8_0": 9, "F32": 19}  # positions stay float
    assert "output.weight" not in plan.how  # tied to token_embd, which llama.cpp reads in its place
    # the reader's own dequantization of the fused qkv is modelzip's (out, in) weight, not Conv1D's transpose
    reader = gguf.GGUFReader(str(out))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type)).reshape(192, 64)
    ref = loaded.model.model.transformer.h[0].attn.c_attn.weight.detach()
    assert (w - ref).abs().max() <= 0.01 * ref.abs().max()
    model, back_config = gguf_export.load_gguf(out)  # n_positions and n_inner carried over from the metadata
    assert (back_config["n_positions"], back_config["n_inner"]) == (64, 96)
    ids = torch.randint(0, 2048, (8, 48), generator=torch.Generator().manual_seed(1))
    ours, theirs = perplexities(loaded.model, model, ids)
    assert abs(theirs / ours - 1) <= 0.01, (ours, theirs)
    with torch.inference_mode():
        a, b = loaded.model(ids), model(ids)
    assert float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()) >= 0.999
    assert gguf_export.check_tokenizer(out, folder)["same_ids"]


def test_gguf_export_refuses_other_models(cli, tmp_path):
    from .conftest import DIGITS_TEACHER, one_line_error

    r = cli("export", DIGITS_TEACHER, "--format", "gguf", "-o", tmp_path / "d.gguf")
    assert r.code == 2 and "Llama, Mistral, Qwen2 and GPT-2" in one_line_error(r)
    assert not (tmp_path / "d.gguf").exists()
    r = cli("export", DECODER, "--format", "onnx", "--gguf-type", "q8_0", "-o", tmp_path / "d.onnx")
    assert r.code == 2 and "--gguf-type does not apply to --format onnx" in one_line_error(r)
    r = cli("export", DECODER, "--format", "gguf", "--gguf-type", "Q6_K", "-o", tmp_path / "d.gguf")
    assert r.code == 2 and "'q4_1' or 'q4_k', got 'q6_k'" in one_line_error(r)  # the types it writes, in one line
    r = cli("export", DECODER, "--format", "gguf", "--int8", "qdq", "-o", tmp_path / "d.gguf")
    assert r.code == 2 and "--int8 does not apply" in one_line_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_q4_k_blocks_round_trip_through_the_gguf_dequantizer():
    """export/q4_k.py writes what gguf.quants.dequantize reads: weights on a Q4_K grid come back exactly, and
    Gaussian weights keep Q4_1's signal-to-noise ratio (both 4-bit min-max, Q4_K's ranges on a 6-bit grid)."""
    from modelzip_cli.export import q4_k

    rng = np.random.default_rng(0)
    n, q4k = 16, gguf.GGMLQuantizationType.Q4_K
    d = rng.uniform(1e-3, 1e-2, n).astype(np.float16)
    dmin = rng.uniform(1e-3, 1e-2, n).astype(np.float16)
    sc, m, q = rng.integers(1, 64, (n, 8)), rng.integers(0, 64, (n, 8)), rng.integers(0, 16, (n, 8, 32))
    sc[:, 3], m[:, 5], q[..., 0], q[..., 1] = 63, 63, 0, 15  # each range and the super-block's reach their ends
    x = (d.astype(np.float32)[:, None, None] * sc[..., None] * q
         - dmin.astype(np.float32)[:, None, None] * m[..., None]).reshape(2, -1).astype(np.float32)  # (2, 2048)
    blocks = q4_k.quantize(x)
    assert blocks.shape == (2, 8 * 144) and blocks.dtype == np.uint8
    assert np.array_equal(gguf.quants.dequantize(blocks, q4k), x)
    w = rng.standard_normal((64, 512)).astype(np.float32)

    def sqnr(qtype, data) -> float:
        back = gguf.quants.dequantize(data, qtype)
        return float(10 * np.log10((w ** 2).sum() / ((w - back) ** 2).sum()))

    q4_1 = gguf.GGMLQuantizationType.Q4_1
    assert sqnr(q4k, q4_k.quantize(w)) >= sqnr(q4_1, gguf.quants.quantize(w, q4_1)) - 0.2 >= 21
    zero = q4_k.quantize(np.zeros((1, 256), np.float32))  # no range: no division by zero, zeros come back
    assert np.array_equal(zero, np.zeros((1, 144), np.uint8)) and not gguf.quants.dequantize(zero, q4k).any()


def test_q4_k_export_reads_back(tmp_path):
    """A random Llama config wide enough for Q4_K's 256-weight rows (the MLP's 320-wide down projection falls
    back to Q5_0): the reader sees the types, transformers' loader runs it close to modelzip's model."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=320, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path / "llama"
    loaded = _random_folder(config, folder)
    out = tmp_path / "q4k.gguf"
    plan = gguf_export.write_gguf(loaded.model, loaded.manifest.arch_kwargs["config"], "q4_k", folder, out, "k")
    assert gguf_export.read_back(out, plan)["types"] == {"Q4_K": 6, "Q5_0": 1, "Q8_0": 2, "F32": 3}
    assert plan.how["blk.0.ffn_down.weight"] == "Q5_0 float" and any("Q5_0" in n for n in plan.notes)
    model, _ = gguf_export.load_gguf(out)
    ids = torch.randint(0, 2048, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = loaded.model(ids), model(ids)
    assert float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()) >= 0.99
