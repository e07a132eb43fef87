"""Training under torchrun: 2 local processes (gloo) against 1, one rank failing or killed, --device.

Each torchrun launch costs a few seconds of start-up (two interpreters importing torch), so the launches
are few and each checks several things."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.measure.metrics import cpu_only
from modelzip_cli.pipeline import distributed
from modelzip_cli.pipeline.data import Dataset, load_data
from modelzip_cli.pipeline.run import evaluate
from modelzip_cli.pipeline.train import _rank_batches

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, ROOT, one_line_error, validate_report

pytestmark = pytest.mark.slow

# A user architecture (named on the command line, so trusted) that misbehaves on purpose under torchrun:
# at its 5th training step it writes its PID to $PROBE_MARKER.<rank>, and raises there on rank $PROBE_FAIL_RANK.
# It has a parameter its output does not use, which DDP must be told of (or step 2 fails).
PROBE = '''
import os

import torch.distributed as dist
from torch import nn


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.unused = nn.Linear(4, 4)  # like a Hugging Face pooler the compared output does not use
        self.steps = 0

    def forward(self, x):
        if self.training and dist.is_initialized():
            self.steps += 1
            if self.steps == 5:
                rank = dist.get_rank()
                with open(f"{os.environ['PROBE_MARKER']}.{rank}", "w") as f:
                    f.write(str(os.getpid()))
                if os.environ.get("PROBE_FAIL_RANK") == str(rank):
                    raise ValueError("the probe failed on purpose")
        return self.net(x.flatten(1))


def student():
    return Probe()
'''


def torchrun_cmd(*args) -> list[str]:
    # --standalone: a rendezvous on a free local port, so concurrent test runs do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "modelzip_cli", *map(str, args)]


def torchrun_env(tmp_path: Path, **extra: str) -> dict:
    (tmp_path / "probe_pkg").mkdir(exist_ok=True)
    (tmp_path / "probe_pkg" / "ddp_probe.py").write_text(PROBE)
    path = os.pathsep.join([str(ROOT), str(tmp_path / "probe_pkg"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PROBE_MARKER": str(tmp_path / "marker"), **extra}


def torchrun(tmp_path: Path, *args, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(*args), capture_output=True, text=True, env=torchrun_env(tmp_path, **extra),
                          timeout=300)


def modelzip_lines(stderr: str) -> list[str]:
    """What modelzip itself said on stderr (torchrun adds its own banner and failure summary)."""
    return [ln for ln in stderr.splitlines() if ln.startswith(("modelzip:", "[rank "))]


def accuracy(checkpoint: Path) -> float:
    """Test accuracy of a checkpoint reloaded from disk."""
    return evaluate(load_checkpoint(checkpoint).model, load_data(DIGITS_TEST))["accuracy"]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------------
# The batch split: what --batch-size and --lr mean at any world size (in-process, no launch)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_parts_make_up_each_global_batch_and_its_mean_gradient(monkeypatch, world):
    n, batch = 10, 4  # global batches of 4, 4, 2: with 3 ranks the last leaves one rank a stand-in row
    data = Dataset(torch.randn(n, 5, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 3, Path("x"))
    model = nn.Linear(5, 3)

    def grads(x, y, weight=1.0):
        model.zero_grad()
        (F.cross_entropy(model(x), y) * weight).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    whole = list(_rank_batches(data, batch, torch.Generator().manual_seed(3)))
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    per_rank = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        per_rank.append(list(_rank_batches(data, batch, torch.Generator().manual_seed(3))))
    assert all(len(parts) == len(whole) for parts in per_rank)  # every rank joins every all-reduce
    for k, (x, y, idx, weight) in enumerate(whole):
        assert weight == 1
        parts = [p[k] for p in per_rank]
        real = [p for p in parts if p[3] > 0]
        assert torch.equal(torch.cat([p[2] for p in real]), idx)  # the ranks' rows are the global batch's
        assert torch.equal(torch.cat([p[0] for p in real]), x)
        assert sum(p[3] for p in parts) == pytest.approx(world)
        ddp_mean = sum(grads(px, py, w) for px, py, _, w in parts) / world  # what DDP's all-reduce makes
        assert torch.allclose(ddp_mean, grads(x, y), atol=1e-6)
    assert any(p[3] == 0 for parts in per_rank for p in parts) == (world == 3)


# --------------------------------------------------------------------------------------------------
# 2 processes against 1


RECIPE = """
[[steps]]
op = "distill"
student = "zoo:mlp"
student-kwargs = {{ hidden_sizes = [64, 32], dropout = 0.0 }}
epochs = 8
val-data = "{val}"
patience = 2

[[steps]]
op = "prune"
method = "gradual"
granularity = "structured"
ratio = 0.3
steps = 2
finetune-epochs = 2
"""


def test_two_processes_distill_then_prune_like_one(cli, tmp_path):
    # Distillation with early stopping on validation data, then gradual structured pruning with fine-tuning
    # between steps (a fresh DDP on a model that shrank; every rank cuts the same units). No dropout: the
    # same batches and the same global-batch gradients, so the same losses up to float reduction order.
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(val=DIGITS_TEST))
    args = [DIGITS_TEACHER, "--recipe", recipe, "--data", DIGITS_TRAIN, "--json", "-q"]
    one = cli("chain", *args, "-o", tmp_path / "one.safetensors")
    assert one.code == 0, one.stderr
    out = tmp_path / "two"
    out.mkdir()
    proc = torchrun(tmp_path, "chain", *args, "-o", out / "small.safetensors", "--keep-intermediate", out / "steps")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)  # one report on stdout: rank 1 printed nothing
    validate_report(two)
    assert two["runtime"] == {"device": "cpu", "world_size": 2, "backend": "gloo"}
    assert one.json["runtime"] == {"device": "cpu", "world_size": 1, "backend": None}
    for key, (s1, s2) in zip(["history", "finetune_history"], zip(one.json["steps"], two["steps"], strict=True),
                             strict=True):
        h1, h2 = s1["after"][key], s2["after"][key]
        assert len(h1) == len(h2)  # the same early-stopping decision
        for name in ("loss", "val_loss") if key == "history" else ("loss",):
            assert [r[name] for r in h2] == pytest.approx([r[name] for r in h1], rel=1e-4)
    assert two["output"]["parameters"] == one.json["output"]["parameters"]
    assert abs(accuracy(tmp_path / "one.safetensors") - accuracy(out / "small.safetensors")) * 100 <= 0.5
    assert files_in(out) == ["small.safetensors", "small.safetensors.json", "steps"]  # rank 0 alone wrote
    assert files_in(out / "steps") == ["step1_distill.safetensors", "step2_prune.safetensors"]
    assert accuracy(out / "steps" / "step1_distill.safetensors") >= 0.9


# --------------------------------------------------------------------------------------------------
# Failures


PROBE_ARGS = ["--student", "ddp_probe:student", "--data", DIGITS_TRAIN, "--epochs", "3"]


def test_a_failure_on_one_rank_stops_the_run_with_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(tmp_path, "distill", DIGITS_TEACHER, *PROBE_ARGS, "-o", out / "s.safetensors",
                    PROBE_FAIL_RANK="1")
    assert proc.returncode != 0
    lines = modelzip_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("[rank 1 of 2] modelzip: internal error: ValueError: the probe failed on purpose")
    assert files_in(out) == []


def test_an_error_every_rank_meets_is_said_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(tmp_path, "distill", DIGITS_TEACHER, "--student", "zoo:mlp", "--data", tmp_path / "missing.pt",
                    "-o", out / "s.safetensors")
    assert proc.returncode != 0
    assert modelzip_lines(proc.stderr) == [f"modelzip: error: data file {tmp_path / 'missing.pt'}: no such file "
                                           "(check the path)"], proc.stderr[-3000:]
    assert files_in(out) == []


def test_a_rank_killed_mid_run_fails_the_run_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "marker.1"
    proc = subprocess.Popen(torchrun_cmd("distill", DIGITS_TEACHER, *PROBE_ARGS[:-1], "1000",
                                         "-o", out / "s.safetensors"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=torchrun_env(tmp_path),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text().strip()):  # rank 1 is at its 5th training step
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "rank 1 never started training"
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert files_in(out) == []  # no checkpoint, no report, no temporary
    assert len(modelzip_lines(stderr)) <= 1, stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# --device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_exit_2_naming_what_is_missing(cli, tmp_path):
    for device in ("cuda", "cuda:1"):
        r = cli("prune", DIGITS_TEACHER, "--ratio", "0.5", "--device", device, "-o", tmp_path / "p.safetensors")
        assert r.code == 2
        line = one_line_error(r)
        assert f"--device {device}" in line and "CUDA" in line and "--device cpu" in line
    r = cli("eval", DIGITS_TEACHER, "--data", DIGITS_TEST, "--device", "tpu")
    assert r.code == 2 and "cpu, cuda, cuda:N or auto" in one_line_error(r)
    assert files_in(tmp_path) == []


def test_device_auto_and_the_report_record_where_it_ran(cli):
    r = cli("eval", DIGITS_TEACHER, "--data", DIGITS_TEST, "--device", "auto", "--json", "-q")
    assert r.code == 0, r.stderr
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert r.json["runtime"] == {"device": expected, "world_size": 1, "backend": None}
    assert next(iter(r.json["metrics"].values()))["latency_ms"]["device"] == expected


def test_int8_models_are_measured_on_cpu_whatever_the_device(cli, tmp_path):
    out = tmp_path / "q.safetensors"
    assert cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "-o", out, "-q").code == 0
    assert cpu_only(load_checkpoint(out).model)
    assert not cpu_only(load_checkpoint(DIGITS_TEACHER).model)
