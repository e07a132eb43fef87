"""The README's new-user path (a user's own module, a state dict, prune → quantize → export → load in
Python), run as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def _new_user_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- new-user-path -->\n```sh\n(.*?)```", text, re.S)
    assert match, "README lost its new-user path"
    return match.group(1)


@pytest.mark.slow
def test_readme_new_user_path_runs_as_written(tmp_path):
    pytest.importorskip("onnxruntime")
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models",
                    ignore=shutil.ignore_patterns("mobilenet_v2_digits", "tiny_llama", "*.py", "__pycache__"))
    bin_dir = Path(sys.executable).parent  # the venv's `modelzip` and `python`
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MODELZIP_TRUSTED_MODULES", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _new_user_block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(re.search(r"int8 accuracy ([\d.]+)%", proc.stdout).group(1))
    assert accuracy > 85, proc.stdout
    for name in ("mynet.pruned.safetensors", "mynet.int8.safetensors", "mynet.onnx", "mynet.int8.safetensors.json"):
        assert (tmp_path / name).is_file(), name
    assert "report: mynet.int8.safetensors.json" in proc.stderr
