"""The output-path policy (issue 26 items 1, 3, 4, 10, 12, 13; issue 25 items 4 and 6): every file a run
writes is checked against every input (files, and files inside input folders) before any work, a file
never chooses where modelzip writes, reports are named after their output, and conditions of the
machine (a full disk, a name too long) are one line and exit 2 with nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import DIGITS_TEACHER, DIGITS_TEST, ROOT, one_line_error
from .mutate import snapshot


def refused(result, *words: str) -> str:
    """Exit 2, one line with the `modelzip: error:` prefix that names each of `words` (case-insensitive)."""
    assert result.code == 2, f"exit {result.code}: {result.stderr}"
    line = one_line_error(result)
    assert line.startswith("modelzip: error:"), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in: {line}"
    return line


def env_with_root() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------------------------------------------
# Item 1: a recipe's export step never chooses where modelzip writes


@pytest.fixture
def chain_dirs(tmp_path) -> tuple[Path, Path, Path]:
    """(recipes folder, the folder the user writes to, a folder outside both)."""
    folders = [tmp_path / name for name in ("recipes", "out", "outside")]
    for folder in folders:
        folder.mkdir()
    return tuple(folders)


def _export_recipe(folder: Path, output: str) -> Path:
    recipe = folder / "r.toml"
    recipe.write_text(f'[[steps]]\nop = "prune"\nratio = 0.3\n\n[[steps]]\nop = "export"\nformat = "pt2"\n'
                      f'output = {json.dumps(output)}\n')
    return recipe


@pytest.mark.parametrize("where", ["absolute", "dot-dot", "symlink out"])
@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_recipe_export_output_never_leaves_the_output_folder(cli, tmp_path, chain_dirs, where, force):
    recipes, out, outside = chain_dirs
    victim = outside / "x.pt2"
    victim.write_bytes(b"precious")
    (out / "link").symlink_to(outside)
    name = {"absolute": str(victim), "dot-dot": "../outside/x.pt2", "symlink out": "link/x.pt2"}[where]
    recipe = _export_recipe(recipes, name)
    before = snapshot(tmp_path)
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "-o", out / "c.safetensors", "-q",
            *(["--force"] if force else []))
    refused(r, "step 2", "output folder")
    assert victim.read_bytes() == b"precious"
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# Item 3: every file `analyze` writes (--report, --plan-out, --plot) is checked against its inputs


@pytest.fixture
def analyze_inputs(tmp_path) -> tuple[Path, Path]:
    return (shutil.copy(DIGITS_TEACHER, tmp_path / "teacher.safetensors"),
            shutil.copy(DIGITS_TEST, tmp_path / "test.safetensors"))


@pytest.mark.parametrize("flag,target", [("--report", "model"), ("--report", "data"), ("--plan-out", "existing"),
                                         ("--plot", "data"), ("--report", "existing"), ("--plot", "plan")])
def test_analyze_outputs_never_overwrite_an_input_or_each_other(cli, tmp_path, analyze_inputs, flag, target):
    model, data = analyze_inputs
    existing = tmp_path / {"--report": "old.json", "--plan-out": "old.toml"}.get(flag, "old.png")
    existing.write_text("{}")
    plan = tmp_path / "p.toml"
    victim = {"model": model, "data": data, "existing": existing, "plan": plan}[target]
    force = [] if target == "existing" else ["--force"]  # an input stays an input, even with --force
    args = ["--budget-fidelity", "0.9", *(["--plan-out", plan] if flag != "--plan-out" else [])]
    before = snapshot(tmp_path)
    r = cli("analyze", model, "--data", data, "--techniques", "int8", "--samples", "8", *args, flag, victim,
            "-q", *force)
    refused(r, "already exists" if target == "existing" else ("same file" if target == "plan" else "input"))
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# Item 12: a plan is valid TOML whatever the paths it names, and is never left on disk invalid


def test_plan_with_a_newline_in_the_model_path_and_an_emoji_data_name(cli, tmp_path):
    import tomllib

    folder = tmp_path / "a\n[[steps]]\nop = \"prune\"\nratio = 0.9\n#"
    folder.mkdir()
    model = shutil.copy(DIGITS_TEACHER, folder / "teacher.safetensors")
    data = shutil.copy(DIGITS_TEST, tmp_path / "digits 😀.safetensors")
    plan = tmp_path / "plan.toml"
    r = cli("analyze", model, "--data", data, "--techniques", "int8", "--samples", "8", "--budget-fidelity", "0.5",
            "--plan-out", plan, "-q")
    assert r.code == 0, r.stderr
    parsed = tomllib.loads(plan.read_text(encoding="utf-8"))
    assert [s["op"] for s in parsed["steps"]] == ["quantize"], parsed["steps"]  # nothing injected
    assert "😀" in parsed["plan"]["measured_on"]
