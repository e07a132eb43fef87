"""distill: a small student from the sample teachers, the baseline, determinism, bad inputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.pipeline.context import Context
from modelzip_cli.pipeline.data import load_data
from modelzip_cli.techniques.distill import DistillConfig, apply

from .conftest import (
    DIGITS_TEACHER,
    DIGITS_TEST,
    DIGITS_TRAIN,
    fresh_outputs,
    one_line_error,
    same_process_outputs,
)

STUDENT = ["--student", "zoo:mlp", "--student-kwargs", '{"hidden_sizes": [64, 32]}']


def test_digits_student_reaches_95_with_25x_fewer_parameters(cli, tmp_path):
    out = tmp_path / "student.safetensors"
    r = cli("distill", DIGITS_TEACHER, *STUDENT, "--data", DIGITS_TRAIN, "--eval-data", DIGITS_TEST, "--baseline",
            "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    after = r.json["steps"][0]["after"]
    assert r.json["metrics"]["output"]["accuracy"] >= 0.95
    assert after["compression_ratio"] >= 25
    assert "distillation_gain" in after and "baseline_accuracy" in after
    assert after["distillation_gain"] == pytest.approx((after["student_accuracy"] - after["baseline_accuracy"]) * 100)
    assert len(after["history"]) == 20 and {"soft_loss", "hard_loss"} <= set(after["history"][0])
    student = load_checkpoint(out)
    assert student.manifest.arch == "zoo:mlp" and student.manifest.arch_kwargs == {"hidden_sizes": [64, 32]}
    assert torch.equal(fresh_outputs(out, DIGITS_TEST, tmp_path), same_process_outputs(student.model, DIGITS_TEST))


def test_same_seed_same_loss_history():
    teacher = load_checkpoint(DIGITS_TEACHER)
    data = load_data(DIGITS_TRAIN)
    cfg = DistillConfig(student="zoo:mlp", student_kwargs={"hidden_sizes": [32]}, epochs=3)
    runs = [apply(teacher.model, cfg, Context(seed=7, data=data), teacher.manifest).after["history"]
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = apply(teacher.model, cfg, Context(seed=8, data=data), teacher.manifest).after["history"]
    assert other != runs[0]


def test_student_from_checkpoint_and_early_stopping(cli, tmp_path):
    start = tmp_path / "start.safetensors"
    assert cli("distill", DIGITS_TEACHER, *STUDENT, "--data", DIGITS_TRAIN, "--epochs", "1", "-o", start,
               "-q").code == 0
    out = tmp_path / "s2.safetensors"
    r = cli("distill", DIGITS_TEACHER, "--student", start, "--data", DIGITS_TRAIN, "--val-data", DIGITS_TEST,
            "--epochs", "30", "--patience", "2", "--lr", "0.05", "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    after = r.json["steps"][0]["after"]
    history = after["history"]
    assert after["epochs_run"] == len(history) < 30, "early stopping never stopped"
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    assert best == len(history) - 1 - 2, "it stops `patience` epochs after the best one"
    # the best epoch's weights are what was written, not the last epoch's
    e = cli("eval", out, "--data", DIGITS_TEST, "--json", "-q")
    assert e.code == 0
    assert e.json["metrics"][str(out)]["loss"] == pytest.approx(history[best]["val_loss"], abs=1e-6)
    assert history[-1]["val_loss"] > history[best]["val_loss"]


def test_plot_writes_a_png(cli, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    r = cli("distill", DIGITS_TEACHER, *STUDENT, "--data", DIGITS_TRAIN, "--epochs", "2", "--baseline", "--plot", png,
            "-o", tmp_path / "s.safetensors", "-q")
    assert r.code == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distill_bad_inputs_exit_2_and_write_nothing(cli, tmp_path):
    no_targets = tmp_path / "nt.safetensors"
    save_file({"inputs": load_data(DIGITS_TRAIN).inputs}, str(no_targets))
    cases = {
        "output size differs": ["--student", "zoo:mlp", "--student-kwargs", '{"num_classes": 5}',
                                "--data", DIGITS_TRAIN],
        "data without targets, alpha < 1": [*STUDENT, "--data", no_targets],
        "temperature 0": [*STUDENT, "--data", DIGITS_TRAIN, "--temperature", "0"],
        "alpha above 1": [*STUDENT, "--data", DIGITS_TRAIN, "--alpha", "1.5"],
        "alpha below 0": [*STUDENT, "--data", DIGITS_TRAIN, "--alpha", "-0.1"],
        "inputs do not match": ["--student", "zoo:cnn1d", "--data", DIGITS_TRAIN],
        "student kwargs not JSON": ["--student", "zoo:mlp", "--student-kwargs", "{", "--data", DIGITS_TRAIN],
        "unknown student": ["--student", "zoo:resnet", "--data", DIGITS_TRAIN],
    }
    before = set(tmp_path.iterdir())
    for what, args in cases.items():
        r = cli("distill", DIGITS_TEACHER, *args, "-o", tmp_path / "out.safetensors")
        assert r.code == 2, f"{what}: {r.code} {r.stderr}"
        one_line_error(r)
    assert set(tmp_path.iterdir()) == before


def test_alpha_one_needs_no_targets(cli, tmp_path):
    no_targets = tmp_path / "nt.safetensors"
    save_file({"inputs": load_data(DIGITS_TRAIN).inputs}, str(no_targets))
    r = cli("distill", DIGITS_TEACHER, *STUDENT, "--data", no_targets, "--alpha", "1", "--epochs", "3",
            "--eval-data", DIGITS_TEST, "-o", tmp_path / "s.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    assert r.json["metrics"]["output"]["accuracy"] > 0.5  # learned from the teacher's logits alone
