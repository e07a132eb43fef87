"""The output-path policy (issue 26 items 1, 3, 4, 10, 12, 13; issue 25 items 4 and 6): every file a run
writes is checked against every input (files, and files inside input folders) before any work, a file
never chooses where modelzip writes, reports are named after their output, and conditions of the
machine (a full disk, a name too long) are one line and exit 2 with nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import DIGITS_TEACHER, ROOT, one_line_error
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
