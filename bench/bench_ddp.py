"""Distillation throughput under torchrun: 1 process against 2 (DDP over gloo) on this machine's cores.

The same `modelzip distill` command line (MNIST-1D CNN teacher → zoo:cnn1d student with 8 channels, global
batch 64) run as one plain process (all cores as intra-op threads), as one process with one thread, and as
two torchrun processes (one thread each, torchrun's default); and, to show what a step costs at the 32
samples each of two ranks computes, as one process with one thread at --batch-size 32.

Each setup runs at FEW and at MANY epochs; the difference of the distill step's durations (from the
report) is the cost of MANY − FEW epochs of training alone: interpreter start-up, imports, the teacher's
cached outputs and DDP's set-up fall out. Samples/s and ms/step come from that difference; accuracy is the
written student's (MANY epochs) on the test set. The setups run interleaved, round by round, so that a
change in the (shared) machine's load falls on all of them alike.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT

FEW, MANY = 2, 6
ROUNDS = 3
SAMPLES = ROOT / "sample_models"
ARGS = ["distill", SAMPLES / "mnist1d_teacher.safetensors", "--student", "zoo:cnn1d",
        "--student-kwargs", '{"channels": [8, 8, 8]}', "--data", SAMPLES / "mnist1d_train.safetensors", "--json", "-q"]
ONE = [sys.executable, "-m", "modelzip_cli"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "modelzip_cli"]
BASE = "1 process, 1 thread"
# label → (launcher prefix, extra environment, global batch size)
SETUPS = {
    "1 process, all threads": (ONE, {}, 64),
    BASE: (ONE, {"OMP_NUM_THREADS": "1"}, 64),
    "2 processes (torchrun), 1 thread each": (TWO, {}, 64),
    "1 process, 1 thread, batch 32 (one rank's share)": (ONE, {"OMP_NUM_THREADS": "1"}, 32),
}


def step_seconds(prefix: list[str], env: dict, batch: int, epochs: int, out: Path) -> tuple[float, dict]:
    """The distill step's duration from the report, and the report's runtime block."""
    cmd = [*prefix, *map(str, ARGS), "--epochs", str(epochs), "--batch-size", str(batch), "-o", str(out), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    if proc.returncode != 0:
        raise RuntimeError(f"bench run failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    return report["steps"][0]["duration_s"], report["runtime"]


def accuracy_of(checkpoint: Path) -> float:
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.pipeline.data import load_data
    from modelzip_cli.pipeline.run import evaluate

    return evaluate(load_checkpoint(checkpoint).model, load_data(SAMPLES / "mnist1d_test.safetensors"))["accuracy"]


def run() -> dict:
    from modelzip_cli.pipeline.data import load_data

    n = len(load_data(SAMPLES / "mnist1d_train.safetensors"))
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    extra: dict[str, list[float]] = {label: [] for label in SETUPS}  # seconds of MANY − FEW epochs
    runtime: dict[str, dict] = {}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "student.safetensors"
        for _ in range(ROUNDS):  # interleaved: a change in the machine's load falls on every setup alike
            for label, (prefix, env, batch) in SETUPS.items():
                few, _ = step_seconds(prefix, env, batch, FEW, out)
                many, runtime[label] = step_seconds(prefix, env, batch, MANY, out)
                extra[label].append(many - few)
                accuracy[label] = accuracy_of(out)
    cases = {}
    for label, seconds in extra.items():
        s = statistics.median(seconds)
        batch = SETUPS[label][2]
        steps = (MANY - FEW) * -(-n // batch)
        cases[label] = {"runtime": runtime[label], "batch_size": batch, "epoch_s": s / (MANY - FEW),
                        "samples_per_s": (MANY - FEW) * n / s, "ms_per_step": 1000 * s / steps,
                        "test_accuracy": accuracy[label]}
    for c in cases.values():
        c["vs_one_process_one_thread"] = c["samples_per_s"] / cases[BASE]["samples_per_s"]
    return {"epochs": [FEW, MANY], "train_samples": n, "rounds": ROUNDS, "cpus": len(os.sched_getaffinity(0)),
            "load_average_1min": [load_before, os.getloadavg()[0]], "cases": cases}


def summary(r: dict) -> str:
    few, many = r["epochs"]
    lines = [f"MNIST-1D distillation, zoo:cnn1d [8, 8, 8] student, {r['train_samples']} training samples, "
             f"{r['cpus']} CPUs (1-minute load average {r['load_average_1min'][0]:.1f} before, "
             f"{r['load_average_1min'][1]:.1f} after). Training alone: the distill step at {many} epochs minus "
             f"at {few}, median of {r['rounds']} interleaved rounds.", "",
             "| setup | device / world size / backend | batch | s/epoch | ms/step | samples/s | "
             "vs 1 process, 1 thread | test accuracy |", "|---|---|---|---|---|---|---|---|"]
    for label, c in r["cases"].items():
        rt = c["runtime"]
        lines.append(f"| {label} | {rt['device']} / {rt['world_size']} / {rt['backend'] or '-'} | {c['batch_size']} | "
                     f"{c['epoch_s']:.3f} | {c['ms_per_step']:.2f} | {c['samples_per_s']:,.0f} | "
                     f"{c['vs_one_process_one_thread']:.2f}× | {c['test_accuracy']:.4f} |")
    return "\n".join(lines)
