"""Distillation throughput under torchrun: 1 process against 2 (DDP over gloo) on this machine's cores.

The same `modelzip distill` command line (MNIST-1D CNN teacher → zoo:cnn1d student with 8 channels), run
as one plain process (all cores as intra-op threads), as one process with one thread, and as two
torchrun processes (one thread each, torchrun's default). Samples/s is epochs × training samples over
the distill step's own duration from the report (student set-up, cached teacher outputs and the training
epochs; interpreter start-up excluded); accuracy is the written student's on the test set.
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

EPOCHS = 10
ROUNDS = 3
SAMPLES = ROOT / "sample_models"
ARGS = ["distill", SAMPLES / "mnist1d_teacher.safetensors", "--student", "zoo:cnn1d",
        "--student-kwargs", '{"channels": [8, 8, 8]}', "--data", SAMPLES / "mnist1d_train.safetensors",
        "--epochs", str(EPOCHS), "--json", "-q"]
# label → (launcher prefix, extra environment)
SETUPS = {
    "1 process, all threads": ([sys.executable, "-m", "modelzip_cli"], {}),
    "1 process, 1 thread": ([sys.executable, "-m", "modelzip_cli"], {"OMP_NUM_THREADS": "1"}),
    "2 processes (torchrun), 1 thread each": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node", "2", "-m", "modelzip_cli"], {}),
}


def one_run(prefix: list[str], env: dict, out: Path) -> dict:
    proc = subprocess.run([*prefix, *map(str, ARGS), "-o", str(out), "--force"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    if proc.returncode != 0:
        raise RuntimeError(f"bench run failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    return {"seconds": report["steps"][0]["duration_s"], "runtime": report["runtime"]}


def accuracy_of(checkpoint: Path) -> float:
    from modelzip_cli.checkpoint import load_checkpoint
    from modelzip_cli.data import load_data
    from modelzip_cli.measure import evaluate

    return evaluate(load_checkpoint(checkpoint).model, load_data(SAMPLES / "mnist1d_test.safetensors"))["accuracy"]


def run() -> dict:
    from modelzip_cli.data import load_data

    n = len(load_data(SAMPLES / "mnist1d_train.safetensors"))
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (prefix, env) in SETUPS.items():
            out = Path(tmp) / "student.safetensors"
            runs = [one_run(prefix, env, out) for _ in range(ROUNDS)]
            seconds = statistics.median(r["seconds"] for r in runs)
            cases[label] = {"runtime": runs[0]["runtime"], "step_s": seconds, "samples_per_s": EPOCHS * n / seconds,
                            "test_accuracy": accuracy_of(out)}
    base = cases["1 process, all threads"]["samples_per_s"]
    for c in cases.values():
        c["vs_one_process"] = c["samples_per_s"] / base
    return {"epochs": EPOCHS, "train_samples": n, "rounds": ROUNDS, "cpus": len(os.sched_getaffinity(0)),
            "load_average_1min": [load_before, os.getloadavg()[0]], "cases": cases}


def summary(r: dict) -> str:
    lines = [f"MNIST-1D distillation, zoo:cnn1d [8, 8, 8] student, {r['epochs']} epochs of {r['train_samples']} "
             f"samples, global batch 64, {r['cpus']} CPUs (1-minute load average {r['load_average_1min'][0]:.1f} "
             f"before, {r['load_average_1min'][1]:.1f} after); median of {r['rounds']} runs of the distill step.", "",
             "| setup | device / world size / backend | step s | samples/s | vs 1 process | test accuracy |",
             "|---|---|---|---|---|---|"]
    for label, c in r["cases"].items():
        rt = c["runtime"]
        lines.append(f"| {label} | {rt['device']} / {rt['world_size']} / {rt['backend'] or '-'} | {c['step_s']:.2f} | "
                     f"{c['samples_per_s']:,.0f} | {c['vs_one_process']:.2f}× | {c['test_accuracy']:.4f} |")
    return "\n".join(lines)
