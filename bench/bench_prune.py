"""Pruning benchmarks.

1. Structured 0.5 on the digits MLP: latency at batch 256 of the pruned model against the input, same run.
2. Global magnitude pruning of a generated ≥ 1 GB MLP: modelzip against the seed's way
   (`torch.nn.utils.prune.global_unstructured` + `prune.remove`), time and peak memory, each in a fresh
   process on the same file.
"""

from __future__ import annotations

from bench.common import ROOT, WORK, in_child, median_of

REPEATS = 2
KWARGS = {"input_size": 4096, "hidden_sizes": [8192] * 5, "num_classes": 10, "dropout": 0.0}  # 302 M, 1.21 GB

LATENCY = """
import json, sys, torch
from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.pipeline.context import Context
from modelzip_cli.pipeline.data import load_data
from modelzip_cli.measure.metrics import batch_of, latency_ms
from modelzip_cli.techniques.prune import StructuredConfig, apply
loaded = load_checkpoint(sys.argv[2])
x = batch_of(load_data(sys.argv[3]).inputs, 256)
dense = load_checkpoint(sys.argv[2]).model
pruned = apply(loaded.model, StructuredConfig(ratio=0.5), Context(example_input=loaded.manifest.example_input()),
               loaded.manifest).model
rows = []
for _ in range(5):  # interleaved, so machine noise hits both alike
    rows.append((latency_ms(dense, x, threads=1, min_seconds=0.5), latency_ms(pruned, x, threads=1, min_seconds=0.5)))
print("LAT " + json.dumps(rows))
"""

MAKE = """
import sys, torch
from modelzip_cli.checkpoint.io import build_arch, save_model
torch.manual_seed(0)
with torch.no_grad():
    save_model(build_arch("zoo:mlp", KWARGS), sys.argv[2])
"""
MODELZIP = """
import sys, torch
from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.techniques.prune import magnitude_prune
from modelzip_cli.techniques.select import select_modules
model = load_checkpoint(sys.argv[2]).model
import time; t0 = time.perf_counter()
with torch.no_grad():
    weights = {n: m.weight for n, m in select_modules(model)}
    magnitude_prune(weights, 0.5, "global")
print("PRUNE_S", time.perf_counter() - t0)
"""
SEED = """
import sys, torch
from torch.nn.utils import prune
from modelzip_cli.checkpoint.io import load_checkpoint
model = load_checkpoint(sys.argv[2]).model
import time; t0 = time.perf_counter()
params = [(m, "weight") for m in model.modules() if isinstance(m, torch.nn.Linear)]
prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
for m, name in params:
    prune.remove(m, name)
print("PRUNE_S", time.perf_counter() - t0)
"""
LOAD_ONLY = """
import sys
from modelzip_cli.checkpoint.io import load_checkpoint
model = load_checkpoint(sys.argv[2]).model
"""


def run() -> dict:
    import json
    import statistics
    import subprocess
    import sys

    from bench.common import CHILD

    teacher = ROOT / "sample_models" / "digits_teacher.safetensors"
    test = ROOT / "sample_models" / "digits_test.safetensors"
    proc = subprocess.run([sys.executable, "-c", LATENCY, "", str(teacher), str(test)], capture_output=True,
                          text=True, check=True)
    rows = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("LAT ")).removeprefix("LAT "))
    dense_ms, pruned_ms = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)

    path = WORK / "big_mlp.safetensors"
    if not path.exists():
        in_child(MAKE.replace("KWARGS", repr(KWARGS)), str(path))

    def prune_run(code: str) -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, code, str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            return {"failed": out.stderr.strip().splitlines()[-1][:300]}
        res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_RESULT "))[13:])
        res["prune_s"] = float(next(ln for ln in out.stdout.splitlines() if ln.startswith("PRUNE_S")).split()[1])
        return res

    load = [in_child(LOAD_ONLY, str(path)) for _ in range(REPEATS)]
    ours = [prune_run(MODELZIP) for _ in range(REPEATS)]
    seed = [prune_run(SEED) for _ in range(REPEATS)]
    return {
        "mlp_structured_0.5": {"dense_ms_b256": dense_ms, "pruned_ms_b256": pruned_ms,
                               "speedup": dense_ms / pruned_ms, "threads": 1, "runs": len(rows)},
        "global_magnitude_1gb": {
            "file_bytes": path.stat().st_size, "repeats": REPEATS,
            "load_only_peak_rss_mb": median_of(load, "peak_rss_mb"),
            "modelzip_prune_s": median_of(ours, "prune_s"), "modelzip_peak_rss_mb": median_of(ours, "peak_rss_mb"),
            "torch_prune_s": median_of(seed, "prune_s") if "failed" not in seed[0] else None,
            "torch_peak_rss_mb": median_of(seed, "peak_rss_mb") if "failed" not in seed[0] else None,
            "torch_failed": seed[0].get("failed"),
        },
    }


def summary(r: dict) -> str:
    s = r["mlp_structured_0.5"]
    g = r["global_magnitude_1gb"]
    lines = [
        "Structured 0.5 on the digits MLP, batch 256, 1 thread, median of interleaved runs:", "",
        "| model | ms |", "|---|---|",
        f"| input (dense) | {s['dense_ms_b256']:.3f} |", f"| structured 0.5 | {s['pruned_ms_b256']:.3f} |", "",
        f"Speed-up: **{s['speedup']:.2f}×**.", "",
        f"Global magnitude 0.5 on a {g['file_bytes'] / 1e9:.2f} GB MLP (peak RSS includes the loaded model; "
        f"loading alone peaks at {g['load_only_peak_rss_mb']:.0f} MB):", "",
        "| way | prune s | peak RSS MB |", "|---|---|---|",
        f"| modelzip (histogram k-th, in place) | {g['modelzip_prune_s']:.2f} | {g['modelzip_peak_rss_mb']:.0f} |",
    ]
    if g["torch_prune_s"] is not None:
        lines.append(f"| torch.nn.utils.prune.global_unstructured + remove | {g['torch_prune_s']:.2f} | "
                     f"{g['torch_peak_rss_mb']:.0f} |")
    else:
        lines.append(f"| torch.nn.utils.prune.global_unstructured + remove | failed: {g['torch_failed']} | - |")
    return "\n".join(lines)
