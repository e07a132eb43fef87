"""The plain-int8 guarantees: no legacy quantization call in modelzip_cli/, torch.ao confined to one optional
module, the quantize and first-wave tests passing with torch.ao blocked, and quiet loading."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import BLOCK_TORCH_AO, DIGITS_TEACHER, DIGITS_TRAIN, ROOT, run_fresh

PACKAGE = ROOT / "modelzip_cli"
BLOCKED_SUBSET = ["tests/test_quantize.py", "tests/test_int8.py", "tests/test_legacy.py", "tests/test_no_torch_ao.py"]


def test_no_legacy_quantization_call_anywhere_in_the_package():
    pattern = re.compile(r"torch\.(quantize_per_tensor|quantize_per_channel|_make_per_)")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_torch_ao_is_imported_by_one_module_only():
    pattern = re.compile(r"^\s*(import|from)\s+(torch\.ao|torch\.quantization|torchao)\b|from torch import ao\b")
    importers = {p.name for p in PACKAGE.rglob("*.py") if any(pattern.search(line)
                                                               for line in p.read_text().splitlines())}
    assert importers == {"torch_ao.py"}


def test_the_switch_blocks_torch_ao_and_quantized_dtypes():
    if os.environ.get(BLOCK_TORCH_AO) != "1":
        pytest.skip(f"runs inside the blocked subset ({BLOCK_TORCH_AO}=1)")
    import torch

    from modelzip_cli.kernels import torch_ao as quant_backend

    with pytest.raises(ImportError):
        import torch.ao.quantization  # noqa: F401
    with pytest.raises(ImportError):
        from torch.ao.nn.quantized import dynamic  # noqa: F401
    with pytest.raises(RuntimeError):
        torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    assert not quant_backend.available()


@pytest.mark.slow
def test_quantize_and_first_wave_tests_pass_with_torch_ao_blocked():
    if os.environ.get(BLOCK_TORCH_AO) == "1":
        pytest.skip("already inside the blocked run")
    # the subset without its slow and transformer cases, which run the same code paths on bigger models (make
    # test runs them unblocked): the digits, first-wave fixtures and int8 runtime cases are the guarantee
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                           "-k", "not transformer and not deprecation", *BLOCKED_SUBSET],
                          cwd=ROOT, env={**os.environ, BLOCK_TORCH_AO: "1"}, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


LOAD_AND_RUN = """
import sys, torch
from modelzip_cli import load_model
model = load_model(sys.argv[1])
with torch.inference_mode():
    for batch in (1, 256):
        model(torch.rand(batch, 64))
"""


@pytest.mark.parametrize("method", ["dynamic", "static", "v1 static", "v1 dynamic"])
def test_loading_and_running_a_quantized_file_prints_nothing(cli, tmp_path, method):
    if method.startswith("v1"):
        path = ROOT / "tests" / "fixtures" / "v1" / f"digits_{method.split()[1]}.safetensors"
    else:
        path = tmp_path / f"{method}.safetensors"
        extra = ["--calib-data", DIGITS_TRAIN] if method == "static" else []
        assert cli("quantize", DIGITS_TEACHER, "--method", method, *extra, "-o", path, "-q").code == 0
    proc = run_fresh(LOAD_AND_RUN, str(path))
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr
