"""Bench helpers: run a task in a fresh child process and measure its wall time and peak memory."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"  # generated large files (git-ignored)

CHILD = """
import json, sys, time
t0 = time.perf_counter()
exec(compile(sys.argv[1], "<bench>", "exec"))
elapsed = time.perf_counter() - t0
# VmHWM: this process image's own peak RSS (ru_maxrss would include the parent's, inherited over fork)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("BENCH_RESULT " + json.dumps({"seconds": elapsed, "peak_rss_mb": hwm / 1024}))
"""


def in_child(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python; return its own wall time (after start-up) and peak RSS in MB."""
    proc = subprocess.run([sys.executable, "-c", CHILD, code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT "))
    return json.loads(line.removeprefix("BENCH_RESULT "))


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def interleaved_medians(timers: dict, rounds: int) -> dict[str, float]:
    """name → median of what `timers[name]()` returns, over `rounds` rounds that each call every timer once, in
    order: a change in the machine's load falls on every entry alike."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: statistics.median(t) for name, t in times.items()}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    return time.perf_counter() - t0
