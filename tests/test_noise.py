"""What a new user sees around the figures: whole config lines, notes that say a thing once and at the batch
the table used, help text that keeps its brackets, dry runs that read --data, a quiet build, a demo that
says where its results are, a README whose options exist (issue 25, item 7)."""

from __future__ import annotations

import io
import re
import shlex
import tomllib
from pathlib import Path

import torch

from tests.conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, ROOT, run_modelzip


def _rendered(report) -> str:
    from rich.console import Console

    from modelzip_cli.measure.report import render

    out = io.StringIO()
    render(report, Console(file=out, width=400))
    return out.getvalue()


def test_a_step_config_is_one_whole_line():
    from modelzip_cli.measure.report import Report, Step

    names = [f"encoder.layer.{i // 6}.block.{i % 6}" for i in range(37)]
    step = Step(op="quantize", config={"method": "dynamic", "include": names, "exclude": None, "bits": 8},
                duration_s=1.25, notes=["recipe tables look like [[steps]]"])
    text = _rendered(Report(command="quantize", steps=[step]))
    assert "quantize method=dynamic include=<37 items> bits=8  (1.2s)" in text
    assert "note: recipe tables look like [[steps]]" in text  # rich markup eats no brackets


def test_the_backend_note_names_each_layer_once(cli, tmp_path):
    r = cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "-o", tmp_path / "q.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    note = next(n for n in r.json["steps"][0]["notes"] if n.startswith("backend "))
    for layer in r.json["steps"][0]["layers"]:
        if layer["scheme"].startswith("int8"):
            assert note.count(layer["name"] + ",") + note.count(layer["name"] + ";") \
                + int(note.endswith(layer["name"])) == 1, note


def test_notes_speak_of_the_batch_the_table_uses():
    """Token inputs are timed at batch 32, not 256: the kernel note says the same N."""
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import Dataset
    from modelzip_cli.techniques.quantize import measured_batch_n

    tokens = Dataset(inputs=torch.zeros(8, 16, dtype=torch.long), targets=None, path=Path("t.safetensors"))
    assert measured_batch_n(Context(eval_data=tokens)) == 32
    floats = Dataset(inputs=torch.zeros(8, 64), targets=None, path=Path("f.safetensors"))
    assert measured_batch_n(Context(calib_data=floats)) == 256


def test_chain_help_shows_the_recipe_tables(cli):
    r = cli("chain", "--help")
    assert r.code == 0
    assert "[[steps]] with op and options" in " ".join(r.stdout.replace("│", " ").split())


def test_dry_run_learns_the_example_input_from_data(tmp_path):
    (tmp_path / "mynet.py").write_text("from torch import nn\n\n\ndef build():\n"
                                       "    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    torch.save(mlp.state_dict(), tmp_path / "mynet.pt")
    (tmp_path / "r.toml").write_text('[[steps]]\nop = "prune"\nmethod = "structured"\nratio = 0.25\n')
    proc = run_modelzip("chain", tmp_path / "mynet.pt", "--arch", "mynet:build", "--recipe", tmp_path / "r.toml",
                        "--data", DIGITS_TRAIN, "--dry-run", "-q", "--json",
                        env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "touches: 0" in proc.stdout


def test_pyproject_license_is_an_spdx_string():
    """setuptools warns at every install about the table form ("project.license as a TOML table is deprecated")."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    requires = project["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d|\d{3,})(\.\d+)*", r) for r in requires), requires


def test_the_demo_says_where_its_report_is_and_how_to_load_the_result():
    script = (ROOT / "sample_models" / "demo.sh").read_text().replace("\\\n", " ")
    chain = next(line for line in script.splitlines() if line.startswith("$MZ chain"))
    words = shlex.split(chain)
    report, output = words[words.index("--report") + 1], words[words.index("-o") + 1]
    echoed = " ".join(line for line in script.splitlines() if line.startswith("echo"))
    assert report.strip('"') in echoed.replace('\\"', '"')
    assert "from modelzip_cli import load_model" in echoed and output.strip('"') in echoed


def test_readme_options_for_structured_pruning_exist(cli):
    readme = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))  # README's pages
    paragraph = readme[readme.index("Structured pruning with data"):].split("\n\n")[0]
    flags = set(re.findall(r"`(--[a-z-]+)", paragraph))
    assert flags, paragraph
    help_text = " ".join(cli("prune", "--help").stdout.split())
    for flag in flags:
        assert flag in help_text, f"README names prune {flag}, which prune does not take"


def test_structured_pruning_ranks_on_unlabelled_data_without_finetuning(cli, tmp_path):
    """What the README now says: --data with --finetune-epochs 0 only ranks, and labels are not needed."""
    from safetensors.torch import load_file, save_file

    unlabelled = tmp_path / "unlabelled.safetensors"
    save_file({"inputs": load_file(DIGITS_TRAIN)["inputs"]}, unlabelled)
    r = cli("prune", DIGITS_TEACHER, "--method", "structured", "--ratio", "0.3", "--data", unlabelled,
            "--finetune-epochs", "0", "-o", tmp_path / "p.safetensors", "--eval-data", DIGITS_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    assert r.json["output"]["parameters"] < r.json["input"]["parameters"]
