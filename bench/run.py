"""`make bench`: run every benchmark case (or those named), write JSON and a markdown summary.

Usage: python -m bench.run [CASE ...]. Each case compares side by side in one run and reports medians;
results go to bench/results/<case>.json and bench/results/summary.md.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time

from bench.common import RESULTS, WORK

CASES = {
    # case name → module in bench/ with `run() -> dict` (the figures) and `summary(dict) -> str` (markdown)
    "startup": "bench.bench_startup",
    "inspect_large": "bench.bench_inspect_large",
    "prune": "bench.bench_prune",
    "quantize": "bench.bench_quantize",
    "int8": "bench.bench_int8",
    "llm": "bench.bench_llm",
    "lowrank": "bench.bench_lowrank",
    "distill": "bench.bench_distill",
    "hf_load": "bench.bench_hf_load",
    "minilm": "bench.bench_minilm",
    "ddp": "bench.bench_ddp",
    "export": "bench.bench_export",
    "export_hf": "bench.bench_export_hf",
    "recover": "bench.bench_recover",
    "minilm_quant": "bench.bench_minilm_quant",
    "decoder": "bench.bench_decoder",
    "cnn_int8": "bench.bench_cnn_int8",
    "scale": "bench.bench_scale",
    "export_formats": "bench.bench_export_formats",
}


def main(names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpus": len(__import__("os").sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M")}
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown bench case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
    for name in names or list(CASES):
        print(f"== {name}", flush=True)
        mod = importlib.import_module(CASES[name])
        t0 = time.perf_counter()
        figures = mod.run()
        record = {"case": name, "env": env, "seconds": round(time.perf_counter() - t0, 1), "results": figures}
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(mod.summary(figures), flush=True)
    write_summary(env)


def write_summary(env: dict) -> None:
    parts = ["# modelzip benchmarks", "",
             f"Machine: {env['machine']}, {env['cpus']} CPUs, Python {env['python']}, torch {env['torch']}. "
             "Medians of repeated runs; every ratio is measured side by side in the same run.", ""]
    for name, module in CASES.items():
        path = RESULTS / f"{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
            parts += [f"## {name} ({record['env']['date']})", "",
                      importlib.import_module(module).summary(record["results"]), ""]
    (RESULTS / "summary.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main(sys.argv[1:])
