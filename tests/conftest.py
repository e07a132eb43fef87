"""Shared fixtures: sample files, an in-process CLI runner that validates every report it sees."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

BLOCK_TORCH_AO = "MODELZIP_BLOCK_TORCH_AO"


def _block_torch_ao() -> None:
    """MODELZIP_BLOCK_TORCH_AO=1: run as on a torch whose legacy quantization is gone. torch.ao.quantization,
    torch.ao's quantized modules (and their torch.quantization / torch.nn.quantized aliases) and torchao
    cannot be imported; the functions that make quantized-dtype tensors and torch.ops.quantized raise."""
    import importlib.abc

    import torch

    blocked = ("torch.ao.quantization", "torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
               "torch.ao.nn.quantizable", "torch.ao.nn.sparse.quantized", "torch.quantization", "torch.nn.quantized",
               "torchao")

    def is_blocked(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in blocked)

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if is_blocked(name):
                raise ImportError(f"{name} is blocked ({BLOCK_TORCH_AO}=1)")
            return None

    def refuse(*args, **kwargs):
        raise RuntimeError(f"quantized dtypes are blocked ({BLOCK_TORCH_AO}=1)")

    class NoOps:
        def __getattr__(self, name):
            raise RuntimeError(f"torch.ops.quantized is blocked ({BLOCK_TORCH_AO}=1)")

    sys.meta_path.insert(0, Blocker())
    for name in [m for m in sys.modules if is_blocked(m)]:  # `import torch` imported some of them already
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and getattr(sys.modules[parent], child, None) is sys.modules[name]:
            delattr(sys.modules[parent], child)
        del sys.modules[name]
    for fn in ("quantize_per_tensor", "quantize_per_channel", "quantize_per_tensor_dynamic",
               "_make_per_tensor_quantized_tensor", "_make_per_channel_quantized_tensor"):
        setattr(torch, fn, refuse)
    torch.ops.__dict__["quantized"] = NoOps()


if os.environ.get(BLOCK_TORCH_AO) == "1":
    _block_torch_ao()

# Under pytest-xdist (`make test` runs a worker a core) a worker and every process it starts compute on one
# thread: two workers of two threads each on this 2-core machine fought for the cores (12.5 minutes, against
# 8.5 on one thread each), and a fresh process must use the thread count of the process whose outputs it
# reproduces bit for bit (a float sum's order follows the threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

# Weight-only kernel measurements (wo_kernels.py) go to a folder of this test run, which the fresh processes
# it starts inherit, never to the user's ~/.cache; removed at exit.
if "MODELZIP_CACHE_DIR" not in os.environ:
    os.environ["MODELZIP_CACHE_DIR"] = tempfile.mkdtemp(prefix="modelzip-cache-")
    atexit.register(shutil.rmtree, os.environ["MODELZIP_CACHE_DIR"], ignore_errors=True)

# Weight-only layers run on the reference kernel (dequantize, then matmul) in every test but the kernels' own
# (test_weight_only_kernels.py lifts this and checks each kernel against that reference). A layer picks its
# kernel by timing, and part of the key is whether all live weights fit in the cache: a test process holding
# other tests' models and a fresh process holding one model can pick different kernels (bf16 vs float, 4e-3
# apart), which broke the bit-for-bit reload comparisons now and then.
os.environ["MODELZIP_WO_KERNEL"] = "float"

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
    from modelzip_cli.measure.report import schema

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
        except (ValueError, UnicodeDecodeError, RecursionError):  # not a report (hostile inputs are JSON too)
            continue
        if isinstance(d, dict) and "schema_version" in d:
            out.append(p)
    return out


@pytest.fixture
def cli(capsys, tmp_path):
    """cli("prune", str(path), ...) → Result. Validates the --json report and every report file in tmp_path."""
    from modelzip_cli.cli.app import run

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


def _blocked_too(code: str) -> str:
    """Under MODELZIP_BLOCK_TORCH_AO=1, child interpreters are blocked as this one is."""
    if os.environ.get(BLOCK_TORCH_AO) != "1":
        return code
    return (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.conftest import _block_torch_ao; "
            f"_block_torch_ao()\n{code}")


def run_fresh(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (a new process: nothing cached from this one)."""
    return subprocess.run([sys.executable, "-c", _blocked_too(code), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def run_modelzip(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "modelzip_cli"]
    if os.environ.get(BLOCK_TORCH_AO) == "1":
        command = [sys.executable, "-c", _blocked_too("import runpy; sys.argv[0] = 'modelzip'; "
                                                       "runpy.run_module('modelzip_cli', run_name='__main__')")]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


FRESH_OUTPUTS = """
import sys, torch
from modelzip_cli import load_model
from modelzip_cli.pipeline.data import load_data
model = load_model(sys.argv[1])
x = load_data(sys.argv[2]).inputs[:64]
with torch.inference_mode():
    torch.save(model(x), sys.argv[3])
"""


# {checkpoint: data} as JSON in argv[1] → each model's outputs on the first 8 samples, saved to argv[2]
FRESH_OUTPUTS_MANY = """
import json, sys, torch
from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.pipeline.data import load_data
out = {}
for path, data in json.loads(sys.argv[1]).items():
    with torch.inference_mode():
        out[path] = load_checkpoint(path).model(load_data(data, require_targets=False).inputs[:8])
torch.save(out, sys.argv[2])
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

    from modelzip_cli.pipeline.data import load_data

    with torch.inference_mode():
        return model.eval()(load_data(data).inputs[:64])


def one_line_error(result: Result) -> str:
    """The error output is exactly one line, with no traceback."""
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# Test files whose later tests read what their earlier tests made in the same process (a fresh-process check of
# every output the matrix wrote): pytest-xdist runs each on one worker. Its own `xdist_group` mark cannot say
# this with pytest 9 (xdist 3.8 tags the group onto `item._nodeid`, which pytest 9 no longer reads: the groups
# were split across workers), so the scheduler is given the grouping itself.
ONE_WORKER = {"tests/test_hf.py", "tests/test_decoder_matrix.py"}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FilesTogether(LoadScopeScheduling):
        """Each test on its own, as `--dist load`, but a file of ONE_WORKER as one unit."""

        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return file if file in ONE_WORKER else nodeid

    return FilesTogether(config, log)

