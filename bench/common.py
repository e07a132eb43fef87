"""Bench helpers: run a task in a fresh child process and measure its wall time and peak memory."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
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


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def in_child(code: str, *args: str, max_rss_mb: float | None = None) -> dict:
    """Run `code` in a fresh Python; return its own wall time (after start-up) and peak RSS in MB. With
    `max_rss_mb`, the child is killed as soon as its resident memory passes that (the machine is shared) and
    this raises, saying so."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, code, *args], stdout=out, stderr=err, text=True)
        over = 0.0
        try:
            while proc.poll() is None:
                if max_rss_mb is not None and (rss := _rss_mb(proc.pid)) > max_rss_mb:
                    over = rss
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # interrupted: never leave a child behind
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if over:
        raise RuntimeError(f"bench child killed at {over:.0f} MB resident (limit {max_rss_mb:.0f} MB)")
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed:\n{stderr[-3000:]}")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("BENCH_RESULT "))
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    result["stdout"] = stdout
    return result


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
