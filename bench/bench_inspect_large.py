"""`inspect` of a generated ≥ 1 GB safetensors checkpoint against loading it fully."""

from __future__ import annotations

from bench.common import WORK, in_child, median_of

REPEATS = 3
# zoo:mlp 4096 → 8192×4 → 10: 235 M parameters, 0.94 GB... with a fifth hidden layer 302 M, 1.21 GB.
KWARGS = {"input_size": 4096, "hidden_sizes": [8192] * 5, "num_classes": 10, "dropout": 0.0}

MAKE = """
import sys, torch
from modelzip_cli.checkpoint.io import build_arch, save_model
torch.manual_seed(0)
with torch.no_grad():
    save_model(build_arch("zoo:mlp", KWARGS), sys.argv[2])
"""
INSPECT = """
import sys
from modelzip_cli.cli.app import run
rc = run(["inspect", sys.argv[2], "--json", "--quiet"])
assert rc == 0
"""
FULL_LOAD = """
import sys
from modelzip_cli import load_model
model = load_model(sys.argv[2])
"""


def run() -> dict:
    path = WORK / "big_mlp.safetensors"
    if not path.exists():
        in_child(MAKE.replace("KWARGS", repr(KWARGS)), str(path))
    size = path.stat().st_size
    inspect_runs = [in_child(INSPECT, str(path)) for _ in range(REPEATS)]
    load_runs = [in_child(FULL_LOAD, str(path)) for _ in range(REPEATS)]
    return {
        "file_bytes": size, "repeats": REPEATS,
        "inspect_s": median_of(inspect_runs, "seconds"), "inspect_peak_rss_mb": median_of(inspect_runs, "peak_rss_mb"),
        "load_s": median_of(load_runs, "seconds"), "load_peak_rss_mb": median_of(load_runs, "peak_rss_mb"),
    }


def summary(r: dict) -> str:
    return (f"File: {r['file_bytes'] / 1e9:.2f} GB.\n\n| what | median s | peak RSS MB |\n|---|---|---|\n"
            f"| `modelzip inspect` | {r['inspect_s']:.3f} | {r['inspect_peak_rss_mb']:.0f} |\n"
            f"| full `load_model` | {r['load_s']:.3f} | {r['load_peak_rss_mb']:.0f} |\n\n"
            f"inspect is {r['load_s'] / r['inspect_s']:.0f}× faster and uses "
            f"{r['load_peak_rss_mb'] / r['inspect_peak_rss_mb']:.1f}× less memory than a full load.")
