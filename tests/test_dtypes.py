"""fp16 and bf16 checkpoints through every technique (issue 11, "Must show").

The digits teacher converted to fp16 and bf16 runs every command that the fp32 teacher runs: exit 0,
the output reloads and evaluates, its accuracy is within 0.5 points (fp16) or 1 point (bf16) of the
fp32 teacher's output for the same command, and every float parameter keeps the input's dtype.
Epochs are tiny: this checks dtypes, not training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelzip_cli import load_model, save_model

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE_POINTS = {"fp16": 0.5, "bf16": 1.0}

COMMANDS = {
    "prune-magnitude": ["prune", "--ratio", "0.5"],
    "prune-structured": ["prune", "--method", "structured", "--ratio", "0.3"],
    "prune-gradual": ["prune", "--method", "gradual", "--ratio", "0.5", "--steps", "2", "--data", DIGITS_TRAIN,
                      "--finetune-epochs", "1"],
    "quantize-dynamic": ["quantize", "--method", "dynamic"],
    "quantize-static": ["quantize", "--method", "static", "--calib-data", DIGITS_TRAIN, "--calib-batches", "8"],
    "quantize-qat": ["quantize", "--method", "qat", "--data", DIGITS_TRAIN, "--epochs", "1"],
    "weight-only-8": ["quantize", "--method", "weight-only", "--bits", "8"],
    "weight-only-4": ["quantize", "--method", "weight-only", "--bits", "4", "--group-size", "32"],
    "lowrank": ["lowrank", "--rank-ratio", "0.5"],
    "distill": ["distill", "--student", "zoo:mlp", "--student-kwargs", '{"hidden_sizes": [64]}', "--data",
                DIGITS_TRAIN, "--epochs", "2"],
    "chain": ["chain", "--recipe", "RECIPE", "--data", DIGITS_TRAIN],
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dtypes")
    paths = {"fp32": DIGITS_TEACHER}
    for name in ("fp16", "bf16"):
        paths[name] = d / f"teacher-{name}.safetensors"
        save_model(load_model(DIGITS_TEACHER).to(DTYPES[name]), paths[name])
    recipe = d / "recipe.toml"
    recipe.write_text('[[steps]]\nop = "prune"\nmethod = "structured"\nratio = 0.3\nfinetune-epochs = 1\n\n'
                      '[[steps]]\nop = "lowrank"\nrank-ratio = 0.5\n\n'
                      '[[steps]]\nop = "quantize"\nmethod = "weight-only"\nbits = 8\n')
    paths["recipe"] = recipe
    return paths


def accuracy(model: torch.nn.Module) -> float:
    from modelzip_cli.pipeline.data import load_data

    floats = [t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    data = load_data(DIGITS_TEST)
    with torch.inference_mode():
        logits = model(data.inputs.to(floats[0] if floats else torch.float32))
    return float((logits.argmax(1) == data.targets).float().mean())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_half_precision_through_every_technique(cli, tmp_path, teachers, command):
    argv = [teachers["recipe"] if a == "RECIPE" else a for a in COMMANDS[command]]
    results = {}
    for name in DTYPES:
        out = tmp_path / f"{name}.safetensors"
        r = cli(argv[0], teachers[name], *argv[1:], "-o", out, "--json", "-q")
        assert r.code == 0, f"{name}: {r.stderr}"
        model = load_model(out)
        results[name] = accuracy(model)
        kept = {p.dtype for p in model.parameters() if p.is_floating_point()}
        assert kept == {DTYPES[name]}, f"{name}: parameters in {kept}"
        assert json.loads(r.stdout)["output"]["path"] == str(out)
    assert results["fp32"] >= 0.8, results
    for name, points in TOLERANCE_POINTS.items():
        assert abs(results[name] - results["fp32"]) * 100 <= points, f"{name}: {results}"
