"""SmoothQuant folded into norms and Linears (techniques/smoothing.py): exact in float, refused where a
writer is shared, W8A8 and static int8 of the sample decoder that reload and keep perplexity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelzip_cli.techniques import smoothing

from ..conftest import SAMPLES, run_fresh

DECODER = SAMPLES / "tiny_llama"


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    pytest.importorskip("transformers")
    from sample_models import decoder

    return decoder.write_windows(tmp_path_factory.mktemp("windows"))


@pytest.fixture(scope="module")
def held(windows, tmp_path_factory):
    """16 held-out windows: enough for a perplexity, quick to run twice."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("held") / "held16.safetensors"
    save_file({k: v[:16].contiguous() for k, v in load_file(str(windows["heldout"])).items()}, str(path))
    return path


def _calib(windows, n: int = 8) -> list[torch.Tensor]:
    from modelzip_cli.pipeline.data import load_data

    x = load_data(windows["calib"], require_targets=False).inputs[:n]
    return list(x.split(4))


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def test_folding_into_norms_and_up_projections_is_exact_in_float(windows):
    from modelzip_cli.checkpoint.io import load_checkpoint

    model = load_checkpoint(DECODER).model
    original = copy.deepcopy(model)
    batches = _calib(windows)
    groups = smoothing.find_groups(model, _linears(model), batches, lambda m, x: m(x))
    producers = {g.linears[0]: g.producer for g in groups}
    assert producers["model.model.layers.0.self_attn.q_proj"] == "model.model.layers.0.input_layernorm"
    assert producers["model.model.layers.0.mlp.gate_proj"] == "model.model.layers.0.post_attention_layernorm"
    assert producers["model.model.layers.0.mlp.down_proj"] == "model.model.layers.0.mlp.up_proj"
    assert producers["model.model.layers.0.self_attn.o_proj"] is None
    qkv = next(g for g in groups if "model.model.layers.1.self_attn.k_proj" in g.linears)
    assert len(qkv.linears) == 3  # q, k and v read one tensor: one scale for all three
    for group in groups:  # strong scales everywhere a writer can take them
        if group.producer:
            weights = [model.get_submodule(n).weight for n in group.linears]
            smoothing.fold(model, group, smoothing.scales(group.absmax, weights, 0.9))
    norm = model.get_submodule("model.model.layers.0.input_layernorm").weight
    assert not torch.allclose(norm, original.get_submodule("model.model.layers.0.input_layernorm").weight)
    x = batches[0]
    with torch.inference_mode():
        before, after = original(x), model(x)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


class _Residual(nn.Module):
    """A norm whose output is read by a Linear and by the residual stream: its scale cannot fold."""

    def __init__(self):
        super().__init__()
        self.norm, self.a, self.b = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.norm(x)
        return self.b(self.a(h) + h)


class _Twice(nn.Module):
    """One norm module run twice per forward, and a Linear tied to another."""

    def __init__(self):
        super().__init__()
        self.norm, self.a, self.b, self.c = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.b(self.norm(self.a(self.norm(x))))


def _outliers(n: int = 64) -> torch.Tensor:
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    x[:, 3] *= 50  # one outlier channel: smoothing has something to move
    return x


def test_a_norm_read_by_the_residual_stream_is_left_unfolded():
    torch.manual_seed(0)
    model = _Residual().eval()
    with torch.no_grad():
        model.norm.weight.copy_(torch.rand(16) + 0.5)
        model.norm.weight[3] = 30.0
    original = copy.deepcopy(model)
    x = _outliers()
    groups = smoothing.find_groups(model, ["a"], [x], lambda m, b: m(b))
    assert groups[0].producer == "norm"  # a norm writes it; only the float check can tell the residual reads it
    folded, notes = smoothing.fold_groups(model, groups, x, smoothing.dynamic_output("per-token"))
    assert folded == [] and groups[0].producer is None
    assert any("smoothing not folded" in n and "norm" in n for n in notes)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))  # the undone fold left every tensor as it was


def test_a_shared_norm_and_a_tied_weight_are_never_folded_into():
    model = _Twice().eval()
    groups = smoothing.find_groups(model, ["a", "b"], [_outliers()], lambda m, b: m(b))
    by_layer = {g.linears[0]: g for g in groups}
    assert by_layer["a"].producer is None and "tied" in by_layer["a"].why_not
    assert by_layer["b"].producer is None and "more than once" in by_layer["b"].why_not


def test_a_norm_that_computes_with_one_plus_its_weight_is_refused():
    class OnePlus(nn.Module):  # Gemma's RMSNorm: x̂ · (1 + w); dividing w by s does not divide the output
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(16))

        def forward(self, x):
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + self.weight)

    model = nn.Sequential(OnePlus(), nn.Linear(16, 4)).eval()
    model[0].__class__.__name__ = "GemmaRMSNorm"
    groups = smoothing.find_groups(model, ["1"], [_outliers()], lambda m, b: m(b))
    assert groups[0].producer is None and "does not scale" in groups[0].why_not


def _perplexities(reference, out, held) -> tuple[float, float]:
    """Perplexity of the input and the output model on the held-out windows, side by side."""
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.measure.perplexity import lm_figures
    from modelzip_cli.pipeline.data import load_data

    x = load_data(held, require_targets=False).inputs
    before, after = lm_figures([load_checkpoint(reference).model, load_checkpoint(out).model], x)
    return before["perplexity"], after["perplexity"]


FRESH_LOGITS = ("import sys, torch\nfrom modelzip_cli import load_model\nm = load_model(sys.argv[1])\n"
                "x = torch.arange(64).reshape(2, 32)\nwith torch.inference_mode():\n"
                "    torch.save(m(input_ids=x).logits, sys.argv[2])")


def test_w8a8_folded_into_norms_reloads_with_identical_logits_and_keeps_perplexity(cli, tmp_path, windows, held):
    out = tmp_path / "w8a8.safetensors"
    r = cli("quantize", DECODER, "--method", "dynamic", "--calib-data", windows["calib"], "--calib-batches", "2",
            "--exclude", "model.lm_head", "-o", out, "--json")
    assert r.code == 0, r.stderr
    step = r.json["steps"][0]
    rows = {row["name"]: row for row in step["layers"]}
    folded = [n for n, row in rows.items() if row.get("smoothing_folded_into")]
    assert folded and any("folded into" in n for n in step["notes"])
    from modelzip_cli import load_model
    from modelzip_cli.checkpoint.io import load_checkpoint

    loaded = load_checkpoint(out)
    assert not set(folded) & set(loaded.manifest.edits[-1].get("smoothed", []))  # no tensor where a norm carries it
    layer = loaded.model.get_submodule(folded[0])
    assert type(layer).__name__ == "DynamicInt8Linear" and not layer.smoothed
    proc = run_fresh(FRESH_LOGITS, str(out), str(tmp_path / "fresh.pt"))
    assert proc.returncode == 0, proc.stderr
    with torch.inference_mode():
        here = load_model(out)(input_ids=torch.arange(64).reshape(2, 32)).logits
    assert torch.equal(torch.load(tmp_path / "fresh.pt", weights_only=True), here)
    before, after = _perplexities(DECODER, out, held)
    assert after <= 1.02 * before, (before, after)


def test_static_int8_of_the_decoder_keeps_perplexity_within_ten_percent(cli, tmp_path, windows, held):
    out = tmp_path / "s.safetensors"
    r = cli("quantize", DECODER, "--method", "static", "--calib-data", windows["calib"], "--calib-batches", "2",
            "--calib-batch-size", "16", "-o", out, "--json")
    assert r.code == 0, r.stderr
    before, after = _perplexities(DECODER, out, held)
    assert after <= 1.10 * before, (before, after)


OUTLIER = 60.0  # how much larger two channels of every norm's output are made (real decoders show 10–1000×)


@pytest.fixture(scope="module")
def outlier_decoder(tmp_path_factory):
    """The sample decoder with the outlier channels real LLMs have: two channels of every norm's weight
    multiplied by OUTLIER and the columns of the Linears reading them divided by it. The float model is the
    same function; per-tensor int8 ranges of its norms' outputs are not."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("outliers") / "tiny_llama"
    shutil.copytree(DECODER, out)
    sd = load_file(str(out / "model.safetensors"))
    channels = [7, 50]
    for i in range(4):
        p = f"model.layers.{i}."
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            sd[p + norm + ".weight"][channels] *= OUTLIER
            for r in readers:
                sd[p + r + ".weight"][:, channels] /= OUTLIER
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_static_int8_with_outlier_channels_folds_them_away_and_a_doubled_perplexity_is_named(
        cli, tmp_path, windows, held, outlier_decoder):
    base = ["quantize", outlier_decoder, "--method", "static", "--calib-data", windows["calib"], "--calib-batches",
            "2", "--calib-batch-size", "16", "--json"]
    r = cli(*base, "--smoothing", "off", "--eval-data", held, "-o", tmp_path / "plain.safetensors")
    assert r.code == 0, r.stderr
    m = r.json["metrics"]
    assert m["output"]["perplexity"] > 2 * m["input"]["perplexity"]  # what per-tensor ranges do to outliers
    assert any(w.startswith("perplexity more than doubled") and f"{m['output']['perplexity']:.2f}" in w
               for w in r.json["warnings"])
    out = tmp_path / "smooth.safetensors"
    r = cli(*base, "-o", out)
    assert r.code == 0, r.stderr
    rows = {row["name"]: row for row in r.json["steps"][0]["layers"]}
    assert rows["model.model.layers.0.self_attn.q_proj"]["smoothing_folded_into"] == \
        "model.model.layers.0.input_layernorm"
    before, after = _perplexities(outlier_decoder, out, held)
    assert after <= 1.10 * before, (before, after)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # outlier channels: smoothing has something to move
            layer.input_layernorm.weight[3] = 20.0
            layer.post_attention_layernorm.weight[5] = 20.0
    return model


def test_smoothing_block_by_block_equals_the_whole_model_pass():
    """The layer-by-layer path (statistics, folds and per-layer scales one block at a time) gives the
    whole-model path's smoothed model within float tolerance."""
    from modelzip_cli.techniques import quantize

    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    models, chosen = [], []
    for blocks in (False, True):
        model = _tiny_llama()
        names = _linears(model)
        per_layer: dict[str, float] = {}
        groups, notes, how = smoothing.by_block(
            model, names, batches, lambda m, x: m(input_ids=x).logits, torch.Generator().manual_seed(0),
            smoothing.dynamic_output("per-token"), fold=True, blocks=blocks,
            unfolded=lambda n, layer, g, d=per_layer: d.__setitem__(
                n, quantize.best_smoothing(layer, g.absmax, g.rows, "per-token")[0]))
        assert ("block by block over the 3 blocks" in how) == blocks
        if blocks:  # a block's sampled rows are freed once it is done (memory holds one block's statistics)
            assert all(g.rows.untyped_storage().nbytes() == 0 for g in groups)
        models.append(model)
        chosen.append(({n: g.figures.get("smoothing_alpha") for g in groups for n in g.linears}, per_layer))
    assert chosen[0] == chosen[1]
    assert any(chosen[0][0].values()) and set(chosen[0][1]) == {f"model.layers.{i}.self_attn.o_proj" for i in range(3)}
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
