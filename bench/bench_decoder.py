"""The sample decoder (sample_models/tiny_llama, a 1.05 M-parameter Llama-architecture LM): every decoder
method modelzip has, each made by the `modelzip` command's own code path, its held-out perplexity, file
size and the time the method took; beside llm-compressor's GPTQ W4A16 on the same model and calibration
windows when its peer environment can be made (bench/peers.py).

Windows: `data text --pack` of the decoder's own document split (sample_models/decoder.py): 128-token
windows, calibration and held-out from different documents. Perplexity on every held-out window."""

from __future__ import annotations

import time
import warnings

from bench.common import WORK

GROUP = 128
RATIO = 0.5
DECODER_KEEP = ["--exclude", "model.lm_head"]  # LLM tools leave the output layer float (llm-compressor too)
SPARSE_KEEP = ["--exclude", "model.lm_head", "--exclude", "model.model.embed_tokens"]


def _rows(calib: str) -> dict[str, list[str]]:
    """name → the modelzip command line after MODEL."""
    c = ["--calib-data", calib]
    rows = {}
    for g in (GROUP, 32):
        rows[f"RTN int4 g{g}"] = ["quantize", "--method", "weight-only", "--bits", "4", "--group-size", str(g),
                                  *DECODER_KEEP]
        rows[f"GPTQ int4 g{g}"] = ["quantize", "--method", "gptq", "--bits", "4", "--group-size", str(g), *c]
        rows[f"AWQ int4 g{g}"] = ["quantize", "--method", "awq", "--bits", "4", "--group-size", str(g), *c]
    rows["RTN int8 g128"] = ["quantize", "--method", "weight-only", "--bits", "8", *DECODER_KEEP]
    rows["W8A8 dynamic (smoothed)"] = ["quantize", "--method", "dynamic", *c, *DECODER_KEEP]
    rows["magnitude 50% (per layer)"] = ["prune", "--method", "magnitude", "--scope", "layer", "--ratio",
                                         str(RATIO), *SPARSE_KEEP]
    rows["Wanda 50%"] = ["prune", "--method", "wanda", "--ratio", str(RATIO), *c]
    rows["SparseGPT 50%"] = ["prune", "--method", "sparsegpt", "--ratio", str(RATIO), *c]
    return rows


def run() -> dict:
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.cli.app import run as modelzip
    from modelzip_cli.measure.metrics import num_threads
    from modelzip_cli.measure.perplexity import lm_figures
    from modelzip_cli.pipeline.data import load_data
    from sample_models import decoder

    warnings.simplefilter("ignore")
    work = WORK / "decoder"
    windows = decoder.write_windows(work / "windows")
    held = load_data(windows["heldout"], require_targets=False).inputs
    model_dir = decoder.HERE / decoder.NAME
    paths, seconds, failed = {"fp32": model_dir}, {}, {}
    for name, args in _rows(str(windows["calib"])).items():
        out = work / (name.replace(" ", "_").replace("%", "").replace("(", "").replace(")", "") + ".safetensors")
        t0 = time.perf_counter()
        code = modelzip([args[0], str(model_dir), *args[1:], "-o", str(out), "--force", "--quiet"])
        seconds[name] = round(time.perf_counter() - t0, 1)
        if code != 0:
            failed[name] = code
            continue
        paths[name] = out
    from bench import peers

    peer = peers.llmcompressor_gptq(model_dir, windows["calib"], windows["heldout"], work / "llmcompressor", GROUP)
    with num_threads(2):
        models = [load_checkpoint(p).model for p in paths.values()]
        figures = lm_figures(models, held)
    base = figures[0]["perplexity"]
    rows = {}
    for (name, path), f in zip(paths.items(), figures, strict=True):
        size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.glob("*.safetensors")))
        rows[name] = {"perplexity": round(f["perplexity"], 3),
                      "increase_pct": round((f["perplexity"] / base - 1) * 100, 2),
                      "next_token_agreement": round(f.get("next_token_agreement", 1.0), 4),
                      "bytes": size, "seconds": seconds.get(name)}
    return {"model": str(model_dir.relative_to(decoder.HERE.parent)), "heldout_windows": int(held.shape[0]),
            "window": int(held.shape[-1]), "rows": rows, "failed": failed, "llmcompressor": peer}


def summary(r: dict) -> str:
    lines = [f"Sample decoder {r['model']}, perplexity on {r['heldout_windows']} held-out windows of "
             f"{r['window']} tokens.", "",
             "| model | perplexity | increase | next-token agreement | bytes | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['perplexity']:.3f} | {row['increase_pct']:+.2f}% | "
                     f"{row['next_token_agreement']:.4f} | {row['bytes']:,} | {row['seconds'] or ''} |")
    peer = r.get("llmcompressor") or {}
    if "perplexity" in peer:
        lines.append(f"| llm-compressor {peer['version']} GPTQ W4A16 g{peer['group']} | {peer['perplexity']:.3f} | "
                     f"{(peer['perplexity'] / r['rows']['fp32']['perplexity'] - 1) * 100:+.2f}% | | "
                     f"{peer['bytes']:,} | {peer['seconds']} |")
    elif peer:
        lines.append(f"\nllm-compressor: {peer.get('skipped')}")
    if r["failed"]:
        lines.append(f"\nfailed: {r['failed']}")
    return "\n".join(lines)
