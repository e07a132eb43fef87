"""Gates and budgets judged on data that tuned nothing (issue 25, item 2)."""

from __future__ import annotations

import tomllib

import torch

from tests.conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN


def test_the_split_is_seeded_disjoint_and_whole():
    from modelzip_cli.commands.transform import split_held_out
    from modelzip_cli.pipeline.data import Dataset

    data = Dataset(inputs=torch.arange(11).float().unsqueeze(1), targets=torch.arange(11), path=DIGITS_TEST)
    tune, held = split_held_out(data, seed=3)
    assert sorted(tune.targets.tolist() + held.targets.tolist()) == list(range(11))
    assert (tune.inputs.squeeze(1).long() == tune.targets).all()  # rows stay with their labels
    again, _ = split_held_out(data, seed=3)
    assert torch.equal(again.targets, tune.targets)
    assert not torch.equal(split_held_out(data, seed=4)[0].targets, tune.targets)


def test_min_fidelity_without_calib_data_tunes_on_one_half_and_is_judged_on_the_other(cli, tmp_path):
    r = cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "--min-fidelity", "0.9999", "--eval-data", DIGITS_TEST,
            "-o", tmp_path / "q.safetensors", "--json", "-q")
    assert r.code in (0, 1), r.stderr
    report = r.json
    split = report["summary"]["data_split"]
    assert split["tuning"].startswith("180 of 360") and split["held_out"].startswith("the other 180 of 360")
    assert report["metrics"]["output"]["samples"] == report["metrics"]["input"]["samples"] == 180
    assert report["metrics"]["output"]["fidelity"]["samples"] == 180
    assert report["steps"][0]["after"]["kept_float"]["measured_on"].startswith("180 samples")
    assert report["gate"]["judged_on"] == split["held_out"]


def test_calibrating_on_the_eval_file_splits_it(cli, tmp_path):
    r = cli("quantize", DIGITS_TEACHER, "--method", "static", "--calib-data", DIGITS_TEST, "--eval-data", DIGITS_TEST,
            "--max-accuracy-drop", "5", "-o", tmp_path / "q.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    assert "--calib-data is the --eval-data file" in r.json["summary"]["data_split"]["why"]
    assert r.json["metrics"]["output"]["samples"] == 180


def test_separate_calib_and_eval_files_are_not_split(cli, tmp_path):
    r = cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "--calib-data", DIGITS_TRAIN, "--min-fidelity", "0.99",
            "--eval-data", DIGITS_TEST, "-o", tmp_path / "q.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    assert "data_split" not in r.json["summary"]
    assert r.json["metrics"]["output"]["samples"] == 360
    assert r.json["gate"]["judged_on"] == f"360 samples of {DIGITS_TEST}"


def test_an_analyze_budget_is_judged_on_held_out_data(cli, tmp_path):
    plan = tmp_path / "plan.toml"
    r = cli("analyze", DIGITS_TEACHER, "--data", DIGITS_TEST, "--budget-fidelity", "0.999", "--techniques", "int8,int4",
            "--plan-out", plan, "--json", "-q")
    assert r.code == 0, r.stderr
    meta = tomllib.loads(plan.read_text())["plan"]
    assert meta["measured_on"] == "180 held-out samples of digits_test.safetensors"
    assert meta["tuned_on"] == "180 samples of digits_test.safetensors (tuning part)"
    assert meta["measured_loss"] != meta["tuning_loss"]  # two measurements, on two halves
    assert any(n.startswith("--data split (seed 0)") for n in r.json["steps"][0]["notes"])


def test_analyze_takes_eval_data_for_its_budget(cli, tmp_path):
    plan = tmp_path / "plan.toml"
    r = cli("analyze", DIGITS_TEACHER, "--data", DIGITS_TRAIN, "--eval-data", DIGITS_TEST, "--budget-fidelity",
            "0.999", "--techniques", "int8", "--plan-out", plan, "--json", "-q")
    assert r.code == 0, r.stderr
    meta = tomllib.loads(plan.read_text())["plan"]
    assert meta["measured_on"] == "256 held-out samples of digits_test.safetensors"
    assert meta["tuned_on"] == "256 samples of digits_train.safetensors"


def test_eval_and_compare_say_which_data_their_figures_are_on(cli):
    r = cli("eval", DIGITS_TEACHER, "--data", DIGITS_TEST, "--json", "-q")
    assert r.json["metrics"][str(DIGITS_TEACHER)]["measured_on"] == f"360 samples of {DIGITS_TEST}"
    c = cli("compare", DIGITS_TEACHER, DIGITS_TEACHER, "--data", DIGITS_TEST, "--json", "-q", "--batch-size", "8")
    assert {m["measured_on"] for m in c.json["metrics"].values()} == {f"360 samples of {DIGITS_TEST}"}
