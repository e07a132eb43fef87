"""inspect, eval, exit codes and one-line errors; `--help` without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from modelzip_cli.checkpoint.io import load_checkpoint

from .conftest import (
    DIGITS_TEACHER,
    DIGITS_TEST,
    MNIST1D_TEACHER,
    MNIST1D_TEST,
    MNIST1D_TRANSFORMER,
    one_line_error,
    run_modelzip,
)


def test_help_does_not_import_torch():
    code = ("import sys; sys.argv = ['modelzip', '--help']\nfrom modelzip_cli.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('NO_TORCH')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "NO_TORCH" in proc.stdout
    # the command names as listed in the Commands panel (the app's own help text must not count)
    listed = {line.strip("│ ").split()[0] for line in proc.stdout.split("Commands")[1].splitlines()
              if line.startswith("│ ") and not line.startswith("│  ")}
    assert listed == {"inspect", "eval", "prune", "quantize", "lowrank", "distill", "chain", "compare", "export",
                      "analyze", "data"}, listed


def test_inspect_gives_exact_parameters_bytes_and_every_layer(cli):
    r = cli("inspect", DIGITS_TEACHER, "--json")
    assert r.code == 0, r.stderr
    model = load_checkpoint(DIGITS_TEACHER).model
    report = r.json
    assert report["model"]["parameters"] == sum(p.numel() for p in model.parameters()) == 198_794
    assert report["input"]["bytes"] == DIGITS_TEACHER.stat().st_size
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [row["name"] for row in report["model"]["layers"]] == linear_names
    assert report["model"]["arch"] == "zoo:mlp"
    assert all(row["sparsity"] == 0 for row in report["model"]["layers"])


@pytest.mark.parametrize("model,data,minimum", [
    (DIGITS_TEACHER, DIGITS_TEST, 0.97),
    (MNIST1D_TEACHER, MNIST1D_TEST, 0.92),
    (MNIST1D_TRANSFORMER, MNIST1D_TEST, 0.88),
])
def test_eval_reports_sample_model_accuracy(cli, model, data, minimum):
    r = cli("eval", model, "--data", data, "--json", "--quiet")
    assert r.code == 0, r.stderr
    m = r.json["metrics"][str(model)]
    assert m["accuracy"] >= minimum
    assert m["latency_ms"]["threads"] >= 1 and m["latency_ms"]["batch_1"] > 0 and m["latency_ms"]["n"] == 256
    assert r.stderr == ""


def test_eval_summary_goes_to_stderr_only(cli):
    r = cli("eval", DIGITS_TEACHER, "--data", DIGITS_TEST)
    assert r.code == 0 and r.stdout == "" and "accuracy" in r.stderr


def _data(tmp_path, name, **tensors):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_bad_inputs_exit_2_with_one_line(cli, tmp_path):
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(DIGITS_TEACHER.read_bytes()[:5000])
    garbage_pt = tmp_path / "garbage.pt"
    garbage_pt.write_bytes(b"not a zip archive at all" * 10)
    torch.save(load_checkpoint(DIGITS_TEACHER).model.state_dict(), tmp_path / "raw.pt")
    trunc_pt = tmp_path / "trunc.pt"
    trunc_pt.write_bytes((tmp_path / "raw.pt").read_bytes()[:3000])
    no_targets = _data(tmp_path, "nt.safetensors", inputs=torch.rand(5, 64))
    no_inputs = _data(tmp_path, "ni.safetensors", targets=torch.zeros(5, dtype=torch.long))
    mismatch = _data(tmp_path, "mm.safetensors", inputs=torch.rand(5, 64), targets=torch.zeros(4, dtype=torch.long))
    wrong_size = _data(tmp_path, "ws.safetensors", inputs=torch.rand(5, 40), targets=torch.zeros(5, dtype=torch.long))
    cases = {
        "missing file": ["inspect", tmp_path / "nope.safetensors"],
        "a directory": ["inspect", tmp_path],
        "truncated safetensors": ["eval", truncated, "--data", DIGITS_TEST],
        "truncated safetensors inspect": ["inspect", truncated],
        "corrupt pt": ["eval", garbage_pt, "--data", DIGITS_TEST],
        "truncated pt": ["eval", trunc_pt, "--arch", "zoo:mlp", "--data", DIGITS_TEST],
        "unknown arch": ["eval", tmp_path / "raw.pt", "--arch", "zoo:nope", "--data", DIGITS_TEST],
        "arch kwargs not json": ["eval", tmp_path / "raw.pt", "--arch", "zoo:mlp", "--arch-kwargs", "{bad",
                                 "--data", DIGITS_TEST],
        "arch kwargs unknown key": ["eval", tmp_path / "raw.pt", "--arch", "zoo:mlp", "--arch-kwargs",
                                    '{"depth": 3}', "--data", DIGITS_TEST],
        "arch kwargs wrong shape": ["eval", tmp_path / "raw.pt", "--arch", "zoo:mlp", "--arch-kwargs",
                                    '{"hidden_sizes": [5]}', "--data", DIGITS_TEST],
        "data without targets": ["eval", DIGITS_TEACHER, "--data", no_targets],
        "data without inputs": ["eval", DIGITS_TEACHER, "--data", no_inputs],
        "mismatched lengths": ["eval", DIGITS_TEACHER, "--data", mismatch],
        "wrong feature size": ["eval", DIGITS_TEACHER, "--data", wrong_size],
        "missing data": ["eval", DIGITS_TEACHER, "--data", tmp_path / "none.safetensors"],
    }
    before = set(tmp_path.iterdir())
    for what, args in cases.items():
        r = cli(*args)
        assert r.code == 2, f"{what}: exit {r.code}\n{r.stderr}"
        line = one_line_error(r)
        assert line.startswith("modelzip: error:"), f"{what}: {line}"
    assert set(tmp_path.iterdir()) == before, "a failed command wrote something"


def test_no_traceback_unless_debug(tmp_path):
    r = run_modelzip("inspect", tmp_path / "missing.pt")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_modelzip("inspect", tmp_path / "missing.pt", env={"MODELZIP_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_inspect_json_pipes_cleanly(cli, tmp_path):
    r = cli("inspect", DIGITS_TEACHER, "--json", "--quiet")
    assert r.code == 0
    json.loads(r.stdout)
    assert r.stderr == ""


def test_a_bug_is_exit_3_with_one_line(cli, monkeypatch, tmp_path):
    import modelzip_cli.commands.evaluate as evaluate

    def boom(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(evaluate, "model_metrics", boom)
    r = cli("eval", DIGITS_TEACHER, "--data", DIGITS_TEST)
    assert r.code == 3
    line = one_line_error(r)
    assert "internal error" in line and "MODELZIP_DEBUG=1" in line
