"""The sample decoder (sample_models/tiny_llama, a 1.05 M-parameter Llama-architecture LM): every decoder
method modelzip has, each made by the `modelzip` command's own code path, its held-out perplexity, file
size, prefill and decode tokens/s (batch 1, 2 threads) and the time the method took; beside llm-compressor's
GPTQ W4A16 on the same model and calibration windows when its peer environment can be made (bench/peers.py).

Windows: `data text --pack` of the decoder's own document split (sample_models/decoder.py): 128-token
windows, calibration and held-out from different documents. Perplexity on every held-out window."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

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
    rows["W8A8 dynamic (smoothing folded into norms)"] = ["quantize", "--method", "dynamic", *c, *DECODER_KEEP]
    rows["W8A8 dynamic (smoothing tensor per layer)"] = ["quantize", "--method", "dynamic", "--smoothing", "layer",
                                                         *c, *DECODER_KEEP]
    rows["W8A8 dynamic (no smoothing)"] = ["quantize", "--method", "dynamic", "--smoothing", "off", *c,
                                           *DECODER_KEEP]
    rows["W8A8 static (smoothing folded)"] = ["quantize", "--method", "static", *c, *DECODER_KEEP]
    rows["W8A8 static (smoothing folded, MSE ranges)"] = ["quantize", "--method", "static", "--observer", "mse", *c,
                                                          *DECODER_KEEP]
    rows["magnitude 50% (per layer)"] = ["prune", "--method", "magnitude", "--scope", "layer", "--ratio",
                                         str(RATIO), *SPARSE_KEEP]
    rows["Wanda 50%"] = ["prune", "--method", "wanda", "--ratio", str(RATIO), *c]
    rows["SparseGPT 50%"] = ["prune", "--method", "sparsegpt", "--ratio", str(RATIO), *c]
    # Structured: whole KV groups and SwiGLU channels, the same share in every block (at 25 % the sample's two KV
    # groups per block round to none removed: only channels go; 50 % removes one of two)
    for pct in (25, 50):
        rows[f"structured {pct}% (KV groups + SwiGLU)"] = ["prune", "--method", "structured", "--ratio",
                                                           str(pct / 100), *c]
    rows["structured 25% + --recover"] = ["prune", "--method", "structured", "--ratio", "0.25", *c, "--recover",
                                          "--data", c[1]]
    rows["layers: 1 of 4 blocks (ShortGPT)"] = ["prune", "--method", "layers", "--blocks", "1", *c]
    rows["layers: 1 of 4 blocks + --recover"] = ["prune", "--method", "layers", "--blocks", "1", *c, "--recover",
                                                 "--data", c[1]]
    every = ["--calib-batches", "32"]  # 32 × 8: every calibration window (the calibration split has 250)
    rows["Wanda 50% (all calibration windows)"] = ["prune", "--method", "wanda", "--ratio", str(RATIO), *c, *every]
    rows["SparseGPT 50% (all calibration windows)"] = ["prune", "--method", "sparsegpt", "--ratio", str(RATIO), *c,
                                                       *every]
    return rows


def run() -> dict:
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.cli.app import run as modelzip
    from modelzip_cli.measure.metrics import generation_speed, num_threads
    from modelzip_cli.measure.perplexity import lm_figures
    from modelzip_cli.pipeline.data import load_data
    from sample_models import decoder

    warnings.simplefilter("ignore")
    work = WORK / "decoder"
    windows = decoder.write_windows(work / "windows")
    held = load_data(windows["heldout"], require_targets=False).inputs
    model_dir = decoder.HERE / decoder.NAME
    paths, seconds, step_seconds, failed = {"fp32": model_dir}, {}, {}, {}
    for name, args in _rows(str(windows["calib"])).items():
        out = work / (name.replace(" ", "_").replace("%", "").replace("(", "").replace(")", "") + ".safetensors")
        t0 = time.perf_counter()
        code = modelzip([args[0], str(model_dir), *args[1:], "-o", str(out), "--force", "--quiet"])
        seconds[name] = round(time.perf_counter() - t0, 2)
        if code != 0:
            failed[name] = code
            continue
        paths[name] = out
        step_seconds[name] = json.loads(Path(f"{out}.json").read_text())["steps"][0]["duration_s"]
    peer, timing = _gptq_timing(model_dir, windows, work)
    spread = _channel_spread(model_dir, load_data(windows["calib"], require_targets=False).inputs)
    with num_threads(2):
        models = [load_checkpoint(p).model for p in paths.values()]
        figures = lm_figures(models, held)
    speeds = generation_speed(models, held, threads=2)  # prefill and decode tokens/s, interleaved rounds
    base = figures[0]["perplexity"]
    rows = {}
    for (name, path), f, speed in zip(paths.items(), figures, speeds, strict=True):
        size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.glob("*.safetensors")))
        rows[name] = {"perplexity": round(f["perplexity"], 3),
                      "increase_pct": round((f["perplexity"] / base - 1) * 100, 2),
                      "next_token_agreement": round(f.get("next_token_agreement", 1.0), 4),
                      "bytes": size, "seconds": seconds.get(name), "step_seconds": step_seconds.get(name),
                      "prefill_tokens_per_s": round(speed["prefill_tokens_per_s"], 1),
                      "decode_tokens_per_s": round(speed["decode_tokens_per_s"], 1)}
    return {"model": str(model_dir.relative_to(decoder.HERE.parent)), "heldout_windows": int(held.shape[0]),
            "window": int(held.shape[-1]), "rows": rows, "failed": failed, "llmcompressor": peer,
            "gptq_timing": timing, "channel_spread": spread}


def _channel_spread(model_dir: Path, calib) -> dict[str, float]:
    """Linear kind (q_proj, …) → max / median of its input channels' norms over the calibration windows, the
    median over the blocks: how far the sample has the outlier channels (LLM.int8()'s outlier features) that
    Wanda's |w|·‖x‖ and AWQ's scales are built on. Near 1, ‖x‖ is about the same for every channel and Wanda
    ranks weights as magnitude does."""
    import statistics

    import torch

    from modelzip_cli.checkpoint.io import load_checkpoint

    model = load_checkpoint(model_dir).model
    sums: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, n=n: sums.__setitem__(n, sums.get(n, 0) + args[0].detach().float().pow(2)
                                                .reshape(-1, args[0].shape[-1]).sum(0)))
        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    with torch.inference_mode():
        for i in range(0, len(calib), 16):
            model(calib[i:i + 16])
    for h in hooks:
        h.remove()
    kinds: dict[str, list[float]] = {}
    for n, total in sums.items():
        norms = total.sqrt()
        kinds.setdefault(n.rsplit(".", 1)[-1], []).append(float(norms.max() / norms.median()))
    return {kind: round(statistics.median(v), 2) for kind, v in kinds.items()}


TIMING_ROUNDS = 3  # interleaved rounds of the GPTQ timing: a change in the machine's load falls on both tools


def _gptq_timing(model_dir: Path, windows: dict, work: Path) -> tuple[dict, dict]:
    """GPTQ int4 g128 on the same 128 calibration windows, modelzip and llm-compressor side by side in
    interleaved rounds (medians): the method alone (modelzip's handler: calibration passes and GPTQ, as
    llm-compressor's `oneshot`), and load to save (modelzip's whole command, which also measures SQNR and
    writes notes; llm-compressor's from_pretrained, oneshot and save_pretrained). Returns the peer's first
    result (its perplexity) and the medians."""
    import statistics

    from bench import peers
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.cli.app import run as modelzip
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import load_data
    from modelzip_cli.techniques.base import handler
    from modelzip_cli.techniques.quantize import GPTQConfig

    cfg = GPTQConfig(bits=4, group_size=GROUP)
    out = work / "timing_gptq.safetensors"
    command = ["quantize", str(model_dir), "--method", "gptq", "--bits", "4", "--group-size", str(GROUP),
               "--calib-data", str(windows["calib"]), "-o", str(out), "--force", "--quiet"]
    times: dict[str, list[float]] = {}
    first: dict = {}
    modelzip(command)  # untimed: the process's first GPTQ pays for lazy imports and kernel choices
    for _ in range(TIMING_ROUNDS):
        model = load_checkpoint(model_dir).model
        ctx = Context(calib_data=load_data(windows["calib"], require_targets=False))
        t0 = time.perf_counter()
        handler(cfg)(model, cfg, ctx)
        times.setdefault("modelzip_method", []).append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if modelzip(command) != 0:
            return first, {"skipped": "modelzip's GPTQ command failed"}
        times.setdefault("modelzip_load_to_save", []).append(time.perf_counter() - t0)
        step = json.loads(Path(f"{out}.json").read_text())["steps"][0]
        times.setdefault("modelzip_step", []).append(step["duration_s"])
        peer = peers.llmcompressor_gptq(model_dir, windows["calib"], windows["heldout"], work / "llmcompressor", GROUP)
        first = first or peer
        if "seconds" not in peer:
            continue
        times.setdefault("llmcompressor_oneshot", []).append(peer["seconds"])
        times.setdefault("llmcompressor_load_to_save", []).append(peer["seconds_load_to_save"])
    return first, {k: round(statistics.median(v), 2) for k, v in times.items()} | {"rounds": TIMING_ROUNDS}


def summary(r: dict) -> str:
    lines = [f"Sample decoder {r['model']}, perplexity on {r['heldout_windows']} held-out windows of "
             f"{r['window']} tokens.", "",
             "| model | perplexity | increase | next-token agreement | bytes | prefill tok/s | decode tok/s | "
             "seconds: load to save | seconds: the step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in r["rows"].items():
        speed = (f"{row['prefill_tokens_per_s']:.0f} | {row['decode_tokens_per_s']:.0f}"
                 if "decode_tokens_per_s" in row else " | ")
        lines.append(f"| {name} | {row['perplexity']:.3f} | {row['increase_pct']:+.2f}% | "
                     f"{row['next_token_agreement']:.4f} | {row['bytes']:,} | {speed} | {row['seconds'] or ''} | "
                     f"{row.get('step_seconds') or ''} |")
    peer = r.get("llmcompressor") or {}
    if "perplexity" in peer:
        lines.append(f"| llm-compressor {peer['version']} GPTQ W4A16 g{peer['group']} | {peer['perplexity']:.3f} | "
                     f"{(peer['perplexity'] / r['rows']['fp32']['perplexity'] - 1) * 100:+.2f}% | | "
                     f"{peer['bytes']:,} | | | {peer.get('seconds_load_to_save', '')} | {peer['seconds']} |")
    elif peer:
        lines.append(f"\nllm-compressor: {peer.get('skipped')}")
    if r["failed"]:
        lines.append(f"\nfailed: {r['failed']}")
    t = r.get("gptq_timing") or {}
    if "llmcompressor_oneshot" in t:
        lines += ["", f"GPTQ int4 g{GROUP}, 128 calibration windows, median of {t['rounds']} interleaved rounds "
                  "(seconds): | modelzip | llm-compressor |", "| --- | --- | --- |",
                  f"| the method (calibration passes and GPTQ; llm-compressor's oneshot) | {t['modelzip_method']} | "
                  f"{t['llmcompressor_oneshot']} |",
                  f"| load to save | {t['modelzip_load_to_save']} (the step with its SQNR probe: "
                  f"{t['modelzip_step']}) | {t['llmcompressor_load_to_save']} |"]
    if spread := r.get("channel_spread"):
        lines += ["", "Input channels of each Linear on the calibration windows, the largest norm over the median "
                  "(median over the blocks): " + ", ".join(f"{k} {v:.2f}" for k, v in spread.items()) + ". Wanda's "
                  "|w|·‖x‖ and AWQ's scales gain where a few channels are many times the median (the outlier "
                  "features of large LLMs); where every channel is near the median, Wanda ranks as magnitude does."]
    lines += ["", "Seconds, in one process with its imports done: *load to save* is modelzip's whole command (load, "
              "the step, its SQNR probe and notes, write; no --eval-data) and llm-compressor's from_pretrained, "
              "oneshot and save_pretrained; *the step* is modelzip's quantize/prune step (calibration passes, the "
              "method, its SQNR probe and notes) and llm-compressor's oneshot (calibration passes and GPTQ)."]
    return "\n".join(lines)
