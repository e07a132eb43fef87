"""`analyze` and its plans, and quantization that keeps fidelity: smoothing and --min-fidelity.

Small random BERT (test_hf.py's style) with activation outliers planted in one FFN, and the digits teacher."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra is not installed")

from modelzip_cli.checkpoint.io import load_checkpoint  # noqa: E402
from modelzip_cli.measure.metrics import fidelity  # noqa: E402
from modelzip_cli.nn import int8  # noqa: E402
from modelzip_cli.pipeline.data import load_data  # noqa: E402
from modelzip_cli.pipeline.run import predict  # noqa: E402

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, one_line_error  # noqa: E402

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=200,
              max_position_embeddings=64)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A 2-layer BERT whose first FFN output projection sees activation outliers (a few channels × 30), as
    pretrained encoders' do, plus disjoint calibration, analysis and held-out token sets."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model("bert", **CONFIG))
    with torch.no_grad():
        ffn_in = model.encoder.layer[0].intermediate.dense
        ffn_in.weight[:4] *= 30  # four intermediate channels: large activations into output.dense
        ffn_in.bias[:4] += 8
        model.encoder.layer[0].output.dense.weight[:, :4] /= 30  # the float model barely changes
    model.save_pretrained(root / "bert")
    for name, n in (("calib", 48), ("data", 48), ("heldout", 48)):
        ids = torch.randint(1, 200, (n, 16))
        mask = torch.ones_like(ids)
        mask[::3, 12:] = 0
        save_file({"inputs": ids, "attention_mask": mask}, str(root / f"{name}.safetensors"))
    return root


def _cosine(reference_dir, out, data) -> float:
    x = load_data(data, require_targets=False).inputs
    ref = predict(load_checkpoint(reference_dir).model, x)
    return fidelity(ref, predict(load_checkpoint(out).model, x, batch_size=32))["cosine_mean"]


# ---------------------------------------------------------------------------------------------------
# Quantization that keeps fidelity


def test_smoothing_recorded_replayed_and_no_worse(cli, bert):
    plain, smooth = bert / "plain.safetensors", bert / "smooth.safetensors"
    base = ["quantize", bert / "bert", "--method", "dynamic", "--backend", "torch-ao", "--force", "-q"]
    assert cli(*base, "--smoothing", "off", "-o", plain).code == 0
    r = cli(*base, "--calib-data", bert / "calib.safetensors", "-o", smooth, "--json")
    assert r.code == 0, r.stderr
    step = r.json["steps"][0]
    alphas = {row["name"]: row["smoothing_alpha"] for row in step["layers"] if "smoothing_alpha" in row}
    assert alphas and all(a in (0.0, 0.5, 0.65, 0.8, 0.9) for a in alphas.values())
    loaded = load_checkpoint(smooth)
    edit = loaded.manifest.edits[-1]
    assert edit["kind"] == "quantize_dynamic"
    smoothed = [n for n, a in alphas.items() if a > 0]
    assert sorted(edit.get("smoothed", [])) == sorted(smoothed)
    if smoothed:  # the replayed module holds its scales as a plain tensor
        m = loaded.model.get_submodule(smoothed[0])
        assert isinstance(m, int8.DynamicInt8Linear) and m.smoothed and m.input_smooth.dtype == torch.float32
    with int8.use_backend("torch-ao"):
        c_plain = _cosine(bert / "bert", plain, bert / "heldout.safetensors")
        c_smooth = _cosine(bert / "bert", smooth, bert / "heldout.safetensors")
    assert c_smooth >= c_plain - 1e-3, (c_smooth, c_plain)


def test_min_fidelity_leaves_costly_layers_float_and_meets_the_gate(cli, bert):
    out = bert / "gated.safetensors"
    float_model = load_checkpoint(bert / "bert").model
    names = [n for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear)]
    x = load_data(bert / "heldout.safetensors", require_targets=False).inputs
    with int8.use_backend("torch-ao"):
        ref = predict(float_model, x)
        cos = fidelity(ref, predict(int8.quantize_dynamic(float_model, names), x))["cosine_mean"]
    gate = round(1 - (1 - cos) / 3, 6)  # a gate the all-int8 model misses
    r = cli("quantize", bert / "bert", "--method", "dynamic", "--backend", "torch-ao", "--smoothing", "off",
            "--eval-data", bert / "heldout.safetensors", "--min-fidelity", str(gate), "-o", out, "--force", "--json")
    assert r.code == 0, r.stderr
    kept = r.json["steps"][0]["after"]["kept_float"]
    assert kept["layers"], kept
    assert r.json["metrics"]["output"]["fidelity"]["cosine_mean"] >= gate
    assert any("left in float" in n for n in r.json["steps"][0]["notes"])
    edit = load_checkpoint(out).manifest.edits[-1]
    floated = {row["name"] for row in kept["layers"]}
    assert floated.isdisjoint(edit["modules"])
    model = load_checkpoint(out).model
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in floated)


def test_forged_smoothed_layer_is_refused(bert, tmp_path):
    from modelzip_cli.checkpoint.edits import validated_edits
    from modelzip_cli.checkpoint.format import Manifest
    from modelzip_cli.errors import InputError

    m = Manifest(arch="x", edits=[{"kind": "quantize_dynamic", "modules": ["a"], "activations": "per-token",
                                   "smoothed": ["b"]}])
    with pytest.raises(InputError, match="smoothed"):
        validated_edits(m)


# ---------------------------------------------------------------------------------------------------
# analyze and plans


def test_analyze_table_json_and_plan_meet_budget_on_heldout(cli, bert):
    plan = bert / "plan.toml"
    r = cli("analyze", bert / "bert", "--data", bert / "data.safetensors", "--techniques", "int8,int4",
            "--budget-fidelity", "0.99", "--plan-out", plan, "--force", "--json")
    assert r.code == 0, r.stderr
    step = r.json["steps"][0]
    assert r.json["command"] == "analyze" and step["op"] == "analyze"
    names = {row["name"] for row in step["layers"]}
    assert len(step["layers"]) == 2 * len(names) and len(names) >= 12
    for row in step["layers"]:
        assert {"loss", "bytes_saved", "latency_delta_ms", "candidate"} <= set(row)
        if row["candidate"] == "int4":
            assert row["bytes_saved"] > 0
    tables = {row["name"] for row in step["layers"] if row["scheme"].endswith("weight-only (table)")}
    assert tables == {f"model.embeddings.{t}_embeddings" for t in ("word", "position", "token_type")}
    assert "loss of each layer alone" in r.stderr  # the rich table
    meta = step["after"]["plan"]
    assert meta["layers"] > 0 and meta["measured_loss"] <= 0.01
    text = plan.read_text()
    assert "[plan]" in text and "[[steps]]" in text
    out = bert / "planned.safetensors"
    c = cli("chain", bert / "bert", "--recipe", plan, "--data", bert / "calib.safetensors", "--eval-data",
            bert / "heldout.safetensors", "--min-fidelity", "0.99", "-o", out, "--force", "-q", "--json")
    assert c.code == 0, c.stderr
    assert c.json["output"]["bytes"] < 0.8 * c.json["input"]["bytes"]
    assert c.json["metrics"]["output"]["fidelity"]["cosine_mean"] >= 0.99


def test_digits_plan_within_accuracy_budget(cli, tmp_path):
    plan = tmp_path / "digits.toml"
    r = cli("analyze", DIGITS_TEACHER, "--data", DIGITS_TRAIN, "--samples", "300", "--budget-accuracy-drop", "0.5",
            "--plan-out", plan, "--plot", tmp_path / "heat.png", "-q", "--json")
    assert r.code == 0, r.stderr
    assert (tmp_path / "heat.png").stat().st_size > 1000
    c = cli("chain", DIGITS_TEACHER, "--recipe", plan, "--data", DIGITS_TRAIN, "--eval-data", DIGITS_TEST,
            "--max-accuracy-drop", "1.0", "-o", tmp_path / "d.safetensors", "-q", "--json")
    assert c.code == 0, c.stderr
    assert c.json["summary"]["compression_ratio"] > 3


@pytest.mark.parametrize("edit, message", [
    ('[plan]\nbudget_fidelity = 2.0\nmeasured_loss = 0.0\nunit = "1 - cosine"\nmeasured_on = "x"\n'
     'bytes_saved_estimate = 0\nlayers = 0\n', "budget_fidelity"),
    ('[plan]\nsurprise = 1\n', "plan"),
    ('plan = 3\n', "[plan] must be a table"),
    ('[[steps]]\nop = "quantize"\nmethod = "weight-only"\nbits = 3\n', "bits"),
    ('[[steps]]\nop = "exec"\n', "unknown op"),
])
def test_bad_plans_exit_2_with_nothing_written(cli, tmp_path, edit, message):
    plan = tmp_path / "bad.toml"
    plan.write_text(edit + ('\n[[steps]]\nop = "quantize"\nmethod = "dynamic"\n' if "steps" not in edit else ""))
    out = tmp_path / "o.safetensors"
    r = cli("chain", DIGITS_TEACHER, "--recipe", plan, "--data", DIGITS_TRAIN, "-o", out)
    assert r.code == 2
    assert message in one_line_error(r)
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--techniques", "int3"], "not a candidate"),
    (["--techniques", "prune:1.5"], "ratio"),
    (["--plan-out", "p.toml"], "needs a budget"),
    (["--budget-fidelity", "0.9", "--budget-accuracy-drop", "1"], "one of"),
])
def test_bad_analyze_options_exit_2(cli, tmp_path, args, message):
    r = cli("analyze", DIGITS_TEACHER, "--data", DIGITS_TEST, *[str(tmp_path / a) if a.endswith(".toml") else a
                                                             for a in args])
    assert r.code == 2
    assert message in one_line_error(r)
    assert not (tmp_path / "p.toml").exists()


def test_plan_json_is_a_valid_recipe_too(tmp_path):
    from modelzip_cli.commands.chain import parse_recipe

    p = tmp_path / "p.json"
    p.write_text(json.dumps({"steps": [{"op": "quantize", "method": "dynamic", "include": ["layers.0"]},
                                       {"op": "quantize", "method": "weight-only", "bits": 4,
                                        "include": ["layers.3"]}]}))
    assert [s.op for s in parse_recipe(p)] == ["quantize", "quantize"]


def test_quantize_prune_lowrank_take_a_plan(cli, tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text('[[steps]]\nop = "lowrank"\nrank-ratio = 0.25\nfinetune-epochs = 0\ninclude = ["layers.3"]\n\n'
                    '[[steps]]\nop = "quantize"\nmethod = "weight-only"\nbits = 4\ninclude = ["layers.0"]\n')
    out = tmp_path / "q.safetensors"
    r = cli("quantize", DIGITS_TEACHER, "--plan", plan, "-o", out, "-q", "--json")
    assert r.code == 0, r.stderr
    assert r.json["command"] == "quantize" and [s["op"] for s in r.json["steps"]] == ["quantize"]
    edits = load_checkpoint(out).manifest.edits
    assert [(e["kind"], e["modules"]) for e in edits] == [("quantize_weight_only", ["layers.0"])]
    r = cli("lowrank", DIGITS_TEACHER, "--plan", plan, "-q", "-o", tmp_path / "l.safetensors")
    assert r.code == 0, r.stderr
    assert list(load_checkpoint(tmp_path / "l.safetensors").manifest.edits[0]["ranks"]) == ["layers.3"]
    r = cli("prune", DIGITS_TEACHER, "--plan", plan, "-o", tmp_path / "p.safetensors")
    assert r.code == 2 and "has no prune step" in one_line_error(r)
    r = cli("quantize", DIGITS_TEACHER, "--plan", plan, "--bits", "8", "-o", tmp_path / "b.safetensors")
    assert r.code == 2 and "--plan sets" in one_line_error(r)
    assert not (tmp_path / "p.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_weight_only_embeddings_shrink_the_file_and_replay(cli, bert):
    plain, emb = bert / "wo4.safetensors", bert / "wo4e.safetensors"
    base = ["quantize", bert / "bert", "--method", "weight-only", "--bits", "4", "--group-size", "32", "-q", "--force"]
    assert cli(*base, "-o", plain).code == 0
    r = cli(*base, "--embeddings", "-o", emb)
    assert r.code == 0, r.stderr
    assert emb.stat().st_size < 0.6 * plain.stat().st_size  # the vocabulary table dominates this small model
    loaded = load_checkpoint(emb)
    assert "model.embeddings.word_embeddings" in loaded.manifest.edits[-1]["modules"]
    x = load_data(bert / "heldout.safetensors", require_targets=False).inputs
    ref = predict(load_checkpoint(bert / "bert").model, x)
    assert fidelity(ref, predict(loaded.model, x))["cosine_mean"] > 0.95
