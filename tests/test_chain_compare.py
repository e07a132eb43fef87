"""chain and compare: recipes validated up front, one process, same tensors as the single commands."""

from __future__ import annotations

import json

import pytest
import torch

from modelzip_cli.checkpoint.io import load_checkpoint

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, SAMPLES, fresh_outputs, one_line_error

RECIPE = SAMPLES / "recipe.toml"


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.slow
def test_demo_recipe_50x_smaller_within_2_points_and_reloads(cli, tmp_path):
    out = tmp_path / "demo.safetensors"
    r = cli("chain", DIGITS_TEACHER, "--recipe", RECIPE, "--data", DIGITS_TRAIN, "--eval-data", DIGITS_TEST,
            "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    rep = r.json
    assert DIGITS_TEACHER.stat().st_size / out.stat().st_size >= 50
    assert rep["summary"]["accuracy_drop"] <= 2.0
    assert [s["op"] for s in rep["steps"]] == ["distill", "prune", "quantize"]
    assert all("metrics" in s["after"] and "accuracy" in s["after"]["metrics"] for s in rep["steps"])
    edits = [e["kind"] for e in load_checkpoint(out).manifest.edits]
    assert edits == ["prune_structured", "quantize_static"]
    # reloaded in a fresh process: the same accuracy
    logits = fresh_outputs(out, DIGITS_TEST, tmp_path)
    from modelzip_cli.pipeline.data import load_data

    targets = load_data(DIGITS_TEST).targets[:64]
    in_process = load_checkpoint(out).model(load_data(DIGITS_TEST).inputs[:64])
    assert torch.equal(logits, in_process)
    r2 = cli("eval", out, "--data", DIGITS_TEST, "--json", "-q")
    assert r2.json["metrics"][str(out)]["accuracy"] == rep["metrics"]["output"]["accuracy"]
    assert (logits.argmax(1) == targets).float().mean() > 0.9

    # compare the teacher against the demo's output
    c = cli("compare", DIGITS_TEACHER, out, "--data", DIGITS_TEST, "--json")
    assert c.code == 0, c.stderr
    m = c.json["metrics"]
    assert m[str(DIGITS_TEACHER)]["top1_agreement"] == 1.0 and m[str(DIGITS_TEACHER)]["max_abs_logit_diff"] == 0
    assert 0.9 < m[str(out)]["top1_agreement"] <= 1.0
    assert "top-1 agree" in c.stderr


def test_chain_equals_steps_one_by_one(cli, tmp_path):
    recipe = _write(tmp_path, "r.toml", """
[[steps]]
op = "distill"
student = "zoo:mlp"
student-kwargs = { hidden_sizes = [32, 16] }
epochs = 3

[[steps]]
op = "prune"
method = "gradual"
ratio = 0.5
steps = 2
finetune-epochs = 1

[[steps]]
op = "lowrank"
rank-ratio = 0.5
finetune-epochs = 1

[[steps]]
op = "quantize"
method = "static"
""")
    chained = tmp_path / "chained.safetensors"
    assert cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--data", DIGITS_TRAIN, "-o", chained, "--seed", "3",
               "-q").code == 0
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    c = tmp_path / "c.safetensors"
    d = tmp_path / "d.safetensors"
    seed = ["--seed", "3", "-q"]
    assert cli("distill", DIGITS_TEACHER, "--student", "zoo:mlp", "--student-kwargs", '{"hidden_sizes": [32, 16]}',
               "--data", DIGITS_TRAIN, "--epochs", "3", "-o", a, *seed).code == 0
    assert cli("prune", a, "--method", "gradual", "--ratio", "0.5", "--steps", "2", "--finetune-epochs", "1",
               "--data", DIGITS_TRAIN, "-o", b, *seed).code == 0
    assert cli("lowrank", b, "--rank-ratio", "0.5", "--finetune-epochs", "1", "--data", DIGITS_TRAIN, "-o", c,
               *seed).code == 0
    assert cli("quantize", c, "--method", "static", "--calib-data", DIGITS_TRAIN, "-o", d, *seed).code == 0
    from safetensors.torch import load_file

    t_chain, t_single = load_file(str(chained)), load_file(str(d))
    assert t_chain.keys() == t_single.keys()
    for k in t_chain:
        assert torch.equal(t_chain[k], t_single[k]), k


def test_recipe_errors_name_the_step_before_loading(cli, tmp_path):
    cases = {
        "unknown op": ('[[steps]]\nop = "sparsify"\n', "step 1", "unknown op"),
        "unknown key": ('[[steps]]\nop = "prune"\nratio = 0.3\n\n[[steps]]\nop = "prune"\nratoi = 0.3\n',
                        "step 2 (prune)", "unknown key"),
        "bad value": ('[[steps]]\nop = "prune"\nratio = 1.5\n', "step 1 (prune)", "--ratio"),
        "wrong type": ('[[steps]]\nop = "prune"\nratio = "half"\n', "step 1 (prune)", "wrong type"),
        "distill without data": ('[[steps]]\nop = "distill"\nstudent = "zoo:mlp"\n', "step 1 (distill)", "data"),
        "static without data": ('[[steps]]\nop = "quantize"\nmethod = "static"\n', "step 1 (quantize)", "calib"),
        "float step after quantize": ('[[steps]]\nop = "quantize"\nmethod = "dynamic"\n\n'
                                      '[[steps]]\nop = "lowrank"\nenergy = 0.9\n', "step 2 (lowrank)", "step 1"),
        "not toml": ("steps = [[", "", "TOML"),
    }
    missing_model = tmp_path / "never-read.safetensors"  # loading it would fail: errors must come first
    for what, (text, step, word) in cases.items():
        recipe = _write(tmp_path, "r.toml", text)
        r = cli("chain", missing_model, "--recipe", recipe, "-o", tmp_path / "o.safetensors")
        assert r.code == 2, f"{what}: {r.code} {r.stderr}"
        line = one_line_error(r)
        assert step in line and word in line, f"{what}: {line}"
        assert "no such file" not in line, f"{what}: the model was touched before the recipe was checked"
    assert not (tmp_path / "o.safetensors").exists()


def test_json_recipe_dry_run_and_keep_intermediate(cli, tmp_path):
    recipe = _write(tmp_path, "r.json", json.dumps({"steps": [
        {"op": "prune", "ratio": 0.5, "exclude": ["layers.9"]},
        {"op": "quantize", "method": "dynamic"}]}))
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--dry-run", "--json", "-q")
    assert r.code == 0, r.stderr
    first = r.json["steps"][0]["layers"]
    assert [x["name"] for x in first if x["selected"]] == ["layers.0", "layers.3", "layers.6"]
    assert [x["name"] for x in first if not x["selected"]] == ["layers.9"]
    assert r.json["summary"]["dry_run"] is True
    assert not list(tmp_path.glob("*.safetensors"))
    keep = tmp_path / "steps"
    out = tmp_path / "o.pt"
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--keep-intermediate", keep, "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in keep.iterdir()) == ["step1_prune.safetensors", "step2_quantize.safetensors"]
    assert [e["kind"] for e in load_checkpoint(out).manifest.edits] == ["prune_magnitude", "quantize_dynamic"]


def test_chain_quality_gate(cli, tmp_path):
    recipe = _write(tmp_path, "r.toml", '[[steps]]\nop = "prune"\nratio = 0.97\n')
    out = tmp_path / "o.safetensors"
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--eval-data", DIGITS_TEST, "--max-accuracy-drop", "1",
            "-o", out, "--json", "-q")
    assert r.code == 1 and out.exists() and r.json["gate"]["passed"] is False
    assert any("quality gate failed" in w for w in r.json["warnings"])


def test_compare_needs_two_models(cli):
    r = cli("compare", DIGITS_TEACHER, "--data", DIGITS_TEST)
    assert r.code == 2
    one_line_error(r)
