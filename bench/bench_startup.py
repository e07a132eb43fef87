"""Start-up time of `modelzip --help` (must not import torch; target: median under 0.3 s)."""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

from bench.common import wall

REPEATS = 15


def run() -> dict:
    exe = shutil.which("modelzip") or str(Path(sys.executable).parent / "modelzip")
    wall([exe, "--help"])  # warm the page cache
    help_times = [wall([exe, "--help"]) for _ in range(REPEATS)]
    python_times = [wall([sys.executable, "-c", "pass"]) for _ in range(REPEATS)]
    torch_times = [wall([sys.executable, "-c", "import torch"]) for _ in range(5)]
    return {"repeats": REPEATS, "help_median_s": statistics.median(help_times),
            "bare_python_median_s": statistics.median(python_times),
            "import_torch_median_s": statistics.median(torch_times), "target_s": 0.3}


def summary(r: dict) -> str:
    ok = "meets" if r["help_median_s"] < r["target_s"] else "MISSES"
    return (f"| what | median s |\n|---|---|\n| `modelzip --help` | {r['help_median_s']:.3f} |\n"
            f"| `python -c pass` | {r['bare_python_median_s']:.3f} |\n"
            f"| `python -c 'import torch'` (what --help avoids) | {r['import_torch_median_s']:.3f} |\n\n"
            f"`--help` {ok} the {r['target_s']} s target ({r['repeats']} runs).")
