"""Shared fixtures: sample files, an in-process CLI runner that validates every report it sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DIGITS_TEACHER = SAMPLES / "digits_teacher.safetensors"
DIGITS_TRAIN = SAMPLES / "digits_train.safetensors"
DIGITS_TEST = SAMPLES / "digits_test.safetensors"
MNIST1D_TEACHER = SAMPLES / "mnist1d_teacher.safetensors"
MNIST1D_TRANSFORMER = SAMPLES / "mnist1d_transformer.safetensors"
MNIST1D_TRAIN = SAMPLES / "mnist1d_train.safetensors"
MNIST1D_TEST = SAMPLES / "mnist1d_test.safetensors"


def validate_report(report: dict) -> None:
    from modelzip_cli.report import schema

    jsonschema.validate(report, schema())


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)


def _reports_under(folder: Path) -> list[Path]:
    out = []
    for p in folder.rglob("*.json"):
        try:
            d = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(d, dict) and "schema_version" in d:
            out.append(p)
    return out


@pytest.fixture
def cli(capsys, tmp_path):
    """cli("prune", str(path), ...) → Result. Validates the --json report and every report file in tmp_path."""
    from modelzip_cli.cli import run

    def invoke(*args: str) -> Result:
        capsys.readouterr()
        code = run([str(a) for a in args])
        out, err = capsys.readouterr()
        result = Result(code, out, err)
        if "--json" in args and code in (0, 1):
            validate_report(result.json)
        for p in _reports_under(tmp_path):
            validate_report(json.loads(p.read_text()))
        return result

    return invoke


def run_fresh(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (a new process: nothing cached from this one)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def run_modelzip(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelzip_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


FRESH_OUTPUTS = """
import sys, torch
from modelzip_cli import load_model
from modelzip_cli.data import load_data
model = load_model(sys.argv[1])
x = load_data(sys.argv[2]).inputs[:64]
with torch.inference_mode():
    torch.save(model(x), sys.argv[3])
"""


def fresh_outputs(checkpoint: Path, data: Path, tmp_path: Path):
    """The model's outputs on the first 64 samples of `data`, computed in a fresh process."""
    import torch

    out = tmp_path / f"outputs-{checkpoint.stem}.pt"
    proc = run_fresh(FRESH_OUTPUTS, str(checkpoint), str(data), str(out))
    assert proc.returncode == 0, proc.stderr
    return torch.load(out, weights_only=True)


def same_process_outputs(model, data: Path):
    import torch

    from modelzip_cli.data import load_data

    with torch.inference_mode():
        return model.eval()(load_data(data).inputs[:64])


def one_line_error(result: Result) -> str:
    """The error output is exactly one line, with no traceback."""
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
