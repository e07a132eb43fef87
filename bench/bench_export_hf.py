"""`modelzip export --format hf | compressed-tensors`: each directory's size on disk and its latency in its own
runtime (transformers' `from_pretrained`, compressed-tensors installed) beside fp32 PyTorch, one run.

Models: the pretrained all-MiniLM-L6-v2 (float `hf`, and weight-only int4 g32 as W4A16 `compressed-tensors`: its
word embeddings, 47 MB of its 90, stay float, so the directory shrinks little) and the sample decoder
(sample_models/tiny_llama): float `hf`, MLP-pruned (`--uniform`) `hf`, W4A16 / W8A16 / W8A8
`compressed-tensors`.
Latency: batch 8 of held-out windows (decoder) or sentences (MiniLM), 2 threads, every model timed in the
same interleaved rounds, medians; fidelity is the max relative |Δ| the export's own check measured against the
modelzip model it came from."""

from __future__ import annotations

import json

from bench.common import ROOT, WORK

THREADS = 2
BATCH = 8
ROUNDS = 5


def _cli(*args) -> None:
    from modelzip_cli.cli.app import run

    code = run([str(a) for a in args] + ["--force", "-q"])
    if code != 0:
        raise RuntimeError(f"modelzip {' '.join(map(str, args))} exited {code}")


def _export(source, fmt: str, out, data) -> dict:
    from modelzip_cli.cli.app import run

    report = out.with_name(out.name + ".json")
    code = run(["export", str(source), "--format", fmt, "-o", str(out), "--eval-data", str(data), "--force", "-q"])
    if code != 0:
        raise RuntimeError(f"modelzip export {source} --format {fmt} exited {code}")
    return json.loads(report.read_text())


SAMPLES = 32  # held-out windows / sentences each export is checked and measured on


def _subset(path, out):
    """The first SAMPLES samples of a data file (the export's figures on all of them take minutes here)."""
    from safetensors.torch import save_file

    from modelzip_cli.pipeline.data import load_data

    save_file({"inputs": load_data(path, require_targets=False).inputs[:SAMPLES].contiguous()}, str(out))
    return out


def _cases(work) -> tuple[dict, dict]:
    """label → (source model, export format, data) for MiniLM and the sample decoder."""
    from sample_models import decoder, text_sets

    cases, data = {}, {}
    dec = ROOT / "sample_models" / "tiny_llama"
    windows = decoder.write_windows(work / "windows", length=64)
    data["decoder"] = _subset(windows["heldout"], work / "decoder-heldout.safetensors")
    q = work / "decoder"
    q.mkdir(parents=True, exist_ok=True)
    _cli("quantize", dec, "--method", "weight-only", "--bits", "4", "--group-size", "32", "-o", q / "w4.safetensors")
    _cli("quantize", dec, "--method", "weight-only", "--bits", "8", "-o", q / "w8.safetensors")
    _cli("quantize", dec, "--method", "dynamic", "--smoothing", "off", "-o", q / "w8a8.safetensors")
    # the MLPs' channels (gate, up and down together), one width in every block: a standard config.json
    _cli("prune", dec, "--method", "structured", "--ratio", "0.25", "--include", "*mlp*", "--uniform", "-o",
         q / "pruned.safetensors")
    cases["decoder fp32 → hf"] = (dec, "hf", "decoder")
    cases["decoder pruned 25% MLP → hf"] = (q / "pruned.safetensors", "hf", "decoder")
    cases["decoder W4A16 g32 → compressed-tensors"] = (q / "w4.safetensors", "compressed-tensors", "decoder")
    cases["decoder W8A16 → compressed-tensors"] = (q / "w8.safetensors", "compressed-tensors", "decoder")
    cases["decoder W8A8 → compressed-tensors"] = (q / "w8a8.safetensors", "compressed-tensors", "decoder")
    minilm = text_sets.minilm_dir()
    if minilm is not None:
        data["minilm"] = _subset(text_sets.write(work / "text")["heldout"], work / "minilm-heldout.safetensors")
        cases["MiniLM fp32 → hf"] = (minilm, "hf", "minilm")
        _cli("quantize", minilm, "--method", "weight-only", "--bits", "4", "--group-size", "32", "-o",
             q / "minilm-w4.safetensors")
        cases["MiniLM W4A16 g32 → compressed-tensors"] = (q / "minilm-w4.safetensors", "compressed-tensors", "minilm")
    return cases, data


def run() -> dict:
    import torch

    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.files import disk_bytes
    from modelzip_cli.measure.metrics import latency_ms, num_threads
    from modelzip_cli.pipeline.data import load_data

    work = WORK / "export_hf"
    cases, data = _cases(work)
    rows, models = {}, {}
    for label, (source, fmt, which) in cases.items():
        out = work / label.split(" → ")[0].replace(" ", "_").replace("%", "")
        report = _export(source, fmt, out, data[which])
        check = report["gate"]["export_check"]
        rows[label] = {"bytes": disk_bytes(out), "source_bytes": report["input"]["bytes"],
                       "relative_max_diff": check["relative"], "cosine_min": check["cosine_min"], "data": which}
        models[label] = (out, which)
    import transformers

    from modelzip_cli.hf import HFModel

    timed = {}
    for which, folder in (("decoder", cases["decoder fp32 → hf"][0]),
                          ("minilm", cases.get("MiniLM fp32 → hf", (None,))[0])):
        if folder is not None:
            timed[f"{which}: fp32 PyTorch (modelzip)"] = (load_checkpoint(folder).model, which)
            rows[f"{which}: fp32 PyTorch (modelzip)"] = {"bytes": disk_bytes(folder), "data": which}
    for label, (out, which) in models.items():
        auto = transformers.AutoModelForCausalLM if which == "decoder" else transformers.AutoModel
        timed[label] = (HFModel(auto.from_pretrained(str(out)).eval(),
                                task="causal-lm" if which == "decoder" else "feature-extraction"), which)
    inputs = {w: load_data(p, require_targets=False).inputs[:BATCH] for w, p in data.items()}
    times: dict[str, list[float]] = {k: [] for k in timed}
    with torch.inference_mode(), num_threads(THREADS):
        for _ in range(ROUNDS):
            for label, (m, which) in timed.items():
                times[label].append(latency_ms(m, inputs[which], threads=THREADS, warmup=1, min_repeats=3,
                                               min_seconds=0.3))
    import statistics

    for label in timed:
        rows.setdefault(label, {"data": timed[label][1]})["latency_ms"] = round(statistics.median(times[label]), 3)
    return {"batch": BATCH, "threads": THREADS, "rounds": ROUNDS, "rows": rows}


def summary(r: dict) -> str:
    lines = [f"batch {r['batch']}, {r['threads']} threads, median of {r['rounds']} interleaved rounds; each "
             "directory loaded by transformers' from_pretrained.", "",
             "| model | runtime | ms | size on disk | max rel. Δ vs modelzip |", "| --- | --- | --- | --- | --- |"]
    for label, row in r["rows"].items():
        runtime = "PyTorch (modelzip)" if "PyTorch" in label else "transformers"
        size = f"{row['bytes'] / 1e6:.2f} MB" if "bytes" in row else "-"
        diff = f"{row['relative_max_diff']:.1e}" if "relative_max_diff" in row else "-"
        lines.append(f"| {label} | {runtime} | {row['latency_ms']:.2f} | {size} | {diff} |")
    return "\n".join(lines)
