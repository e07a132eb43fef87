"""One config class per method: validated on construction, options foreign to a method refused by name,
the same object from CLI flags, recipes and reports; the layer order enforced; QAT's late freeze."""

from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import torch

from modelzip_cli.techniques import OPS, make_config

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, ROOT, one_line_error


@pytest.mark.parametrize("args,option,method", [
    (["quantize", "--method", "dynamic", "--group-size", "64"], "--group-size", "dynamic"),
    (["quantize", "--method", "static", "--bits", "4"], "--bits", "static"),
    (["quantize", "--method", "weight-only", "--calib-batches", "3"], "--calib-batches", "weight-only"),
    (["prune", "--ratio", "0.3", "--method", "magnitude", "--steps", "3"], "--steps", "magnitude"),
    (["prune", "--ratio", "0.3", "--method", "structured", "--scope", "layer"], "--scope", "structured"),
])
def test_an_option_foreign_to_the_method_is_exit_2_naming_both(cli, tmp_path, args, option, method):
    out = tmp_path / "o.safetensors"
    r = cli(args[0], DIGITS_TEACHER, *args[1:], "-o", out)
    assert r.code == 2, r.stderr
    line = one_line_error(r)
    assert option in line and method in line and "does not apply" in line, line
    assert not list(tmp_path.iterdir())


def test_a_recipe_option_foreign_to_its_method_is_exit_2_before_loading(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nop = "prune"\nratio = 0.3\n\n[[steps]]\nop = "quantize"\nmethod = "dynamic"\n'
                      'group-size = 64\n')
    r = cli("chain", tmp_path / "never-read.safetensors", "--recipe", recipe, "--dry-run")
    assert r.code == 2
    line = one_line_error(r)
    assert "step 2 (quantize)" in line and "--group-size" in line and "dynamic" in line, line


@pytest.mark.parametrize("text,word", [
    ('op = "prune"\nratio = 0.3\ninclude = [1]\n', "wrong type"),  # list element types are checked
    ('op = "prune"\nratio = 0.3\nsteps = 2.5\n', "does not apply"),
    ('op = "prune"\nmethod = "gradual"\nratio = 0.3\nsteps = 2.5\n', "wrong type"),
    ('op = "lowrank"\nenergy = 0.9\nrank-ratio = 0.5\n', "exactly one"),
    ('op = "distill"\nstudent = "zoo:mlp"\nbaseline = 1\n', "wrong type"),
    ('op = "quantize"\nmethod = 8\n', "wrong type"),
])
def test_recipe_values_are_type_checked(cli, tmp_path, text, word):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[[steps]]\n" + text)
    r = cli("chain", tmp_path / "never-read.safetensors", "--recipe", recipe, "--data", DIGITS_TRAIN)
    assert r.code == 2
    assert word in one_line_error(r)


def test_every_config_round_trips_through_its_report_form():
    examples = {("prune", "magnitude"): {"ratio": 0.3, "scope": "layer"},
                ("prune", "structured"): {"ratio": 0.3, "finetune_epochs": 1},
                ("prune", "gradual"): {"ratio": 0.3, "steps": 2, "granularity": "structured"},
                ("quantize", "dynamic"): {"include": ["layers.*"]},
                ("quantize", "static"): {"calib_batches": 3},
                ("quantize", "qat"): {"epochs": 2, "freeze_epochs": 1},
                ("quantize", "weight-only"): {"bits": 4, "group_size": 32},
                ("quantize", "gptq"): {"bits": 8, "group_size": 64, "act_order": True, "damp": 0.05},
                ("quantize", "awq"): {"group_size": 32, "calib_batches": 4},
                ("prune", "wanda"): {"ratio": 0.5, "calib_batches": 2},
                ("prune", "sparsegpt"): {"ratio": 0.5, "damp": 0.02, "recover": True},
                ("prune", "layers"): {"blocks": 2},
                ("lowrank", ""): {"energy": 0.9, "recover": True, "recover_loss": "cosine", "hidden_weight": 0.5,
                                  "max_samples": 100},
                ("distill", ""): {"student": "zoo:mlp", "student_kwargs": {"hidden_sizes": [8]}, "loss": "cosine"}}
    assert set(examples) == {(op, m) for op, entry in OPS.items() for m in entry.configs}
    for (op, method), values in examples.items():
        cfg = make_config(op, method or None, values)
        report_form = cfg.to_dict()
        again = make_config(op, report_form.pop("method", None), report_form)
        assert again == cfg and type(again) is type(cfg)


def test_layer_order_is_enforced_by_import_linter():
    linter = shutil.which("lint-imports", path=str(ROOT / ".venv" / "bin")) or shutil.which("lint-imports")
    if linter is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([linter, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "modelzip layers KEPT" in proc.stdout


def test_qat_freezes_observers_and_batchnorm_in_its_last_epochs():
    from modelzip_cli.checkpoint.io import build_arch
    from modelzip_cli.nn import int8
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import Dataset, load_data
    from modelzip_cli.pipeline.train import TrainConfig, train

    full = load_data(DIGITS_TRAIN)
    data = Dataset(full.inputs[:256], full.targets[:256], full.path)
    torch.manual_seed(0)
    model = build_arch("zoo:cnn2d", {}).train()  # Conv + BatchNorm
    names = [n for n, m in model.named_modules() if isinstance(m, int8.QUANTIZABLE)]
    prepared = int8.prepare_qat(model, names)

    def statistics() -> dict:
        return {k: v.clone() for k, v in prepared.state_dict().items()
                if any(s in k for s in ("running_mean", "running_var", "min_val", "max_val"))}

    at_start: list[dict] = []

    def on_epoch(epoch: int) -> None:
        if epoch >= 1:
            int8.freeze_observers(prepared)
        at_start.append(statistics())

    train(prepared, data, TrainConfig(epochs=2, lr=1e-3, batch_size=32), ctx=Context(), on_epoch=on_epoch)
    at_end = statistics()
    assert any(k for k in at_start[0] if "running_mean" in k) and any(k for k in at_start[0] if "min_val" in k)
    moved = [k for k in at_start[0] if not torch.equal(at_start[0][k], at_start[1][k])]
    assert moved, "nothing was updated in the first (unfrozen) epoch"
    changed = [k for k in at_end if not torch.equal(at_end[k], at_start[1][k])]
    assert not changed, f"updated while frozen: {changed}"


def test_qat_default_freezes_the_last_third(cli, tmp_path):
    r = cli("quantize", DIGITS_TEACHER, "--method", "qat", "--data", DIGITS_TRAIN, "--epochs", "3",
            "-o", tmp_path / "q.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    history = r.json["steps"][0]["after"]["qat_history"]
    assert [row["observers_frozen"] for row in history] == [False, False, True]


def test_compare_agreement_is_measured_against_the_first_model(cli, tmp_path):
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.pipeline.data import load_data

    pruned = tmp_path / "p.safetensors"
    assert cli("prune", DIGITS_TEACHER, "--ratio", "0.9", "--scope", "layer", "-o", pruned, "-q").code == 0
    r = cli("compare", DIGITS_TEACHER, pruned, "--data", DIGITS_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    x = load_data(DIGITS_TEST).inputs
    with torch.inference_mode():
        ref, out = load_checkpoint(DIGITS_TEACHER).model(x), load_checkpoint(pruned).model(x)
    agreement = float((ref.argmax(1) == out.argmax(1)).float().mean())
    row = r.json["metrics"][str(pruned)]
    assert row["top1_agreement"] == pytest.approx(agreement) and agreement < 1.0
    assert row["max_abs_logit_diff"] == pytest.approx(float((ref - out).abs().max()), rel=1e-5)
    assert row["max_abs_logit_diff"] > 0


def test_configs_are_independent_objects():
    a = make_config("prune", "gradual", {"ratio": 0.5, "include": ["layers.*"]})
    b = copy.deepcopy(a)
    b.include.append("x")
    assert a.include == ["layers.*"]
    with pytest.raises(Exception):  # noqa: B017  (assignment is validated too)
        a.ratio = 2.0
