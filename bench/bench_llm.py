"""Decoding speed of weight-only int4 / int8 on a decoder LLM: prefill and decode tokens/s against fp32.

A random Llama-architecture decoder shaped like a 135M model (30 blocks, hidden 576, intermediate 1536, 9
heads, 3 KV heads, vocab 49152, tied embeddings), saved as transformers saves it, quantized by modelzip's
own `quantize --method weight-only` command (group 128: the 576-wide layers are 4.5 groups, padded to 5),
then timed by `measure.generation_speed`: a 64-token prompt in one pass (prefill), then 32 tokens one at a
time with the KV cache (decode), greedy, every model in turn in each of 5 rounds, medians. 2 threads. The
kernel each weight-only layer runs on (measured on this machine) is counted per call size."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings

from bench.common import WORK

THREADS = 2
CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
PROMPT, NEW_TOKENS, ROUNDS = 64, 32, 5
VARIANTS = {  # name → (file stem, flags); by default the output layer (lm_head, tied) stays float
    "weight-only int4 (group 128)": ("q4", ["--bits", "4"]),
    "weight-only int4 (group 128), lm_head too": ("q4-all", ["--bits", "4", "--include", "*"]),
    "weight-only int8 (group 128)": ("q8", ["--bits", "8"]),
}


def _build() -> dict:
    """name → checkpoint path: the fp32 HF directory and modelzip's weight-only files of it."""
    import torch
    import transformers

    root = WORK / "llm"
    fp32 = root / "llama-135m-random"
    if not (fp32 / "config.json").exists():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(fp32)
    paths = {"fp32": fp32}
    for name, (stem, flags) in VARIANTS.items():
        out = root / f"{stem}.safetensors"
        cmd = [sys.executable, "-m", "modelzip_cli", "quantize", str(fp32), "--method", "weight-only", *flags,
               "--group-size", "128", "-o", str(out), "--force", "-q"]
        subprocess.run(cmd, check=True)
        paths[name] = out
    return paths


def _kernels(model) -> dict:
    """Call size → kernel → number of weight-only layers running it."""
    from modelzip_cli.nn.weight_only import WeightOnlyEmbedding, WeightOnlyLinear

    out: dict = {}
    for m in model.modules():
        if isinstance(m, WeightOnlyLinear) and not isinstance(m, WeightOnlyEmbedding):
            for rows in (1, PROMPT):
                k = m.kernel_for(rows)
                out.setdefault(f"{rows}_rows", {}).setdefault(k, 0)
                out[f"{rows}_rows"][k] += 1
    return out


def run() -> dict:
    import torch

    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.measure.metrics import generation_speed

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    paths = _build()
    built_s = time.perf_counter() - t0
    models = {name: load_checkpoint(p).model for name, p in paths.items()}
    torch.manual_seed(0)
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, PROMPT))
    speeds = generation_speed(list(models.values()), prompt, threads=THREADS, new_tokens=NEW_TOKENS,
                              rounds=ROUNDS)
    fp32 = speeds[0]
    rows = {}
    for (name, model), speed in zip(models.items(), speeds, strict=True):
        rows[name] = {**speed, "decode_vs_fp32": speed["decode_tokens_per_s"] / fp32["decode_tokens_per_s"],
                      "prefill_vs_fp32": speed["prefill_tokens_per_s"] / fp32["prefill_tokens_per_s"],
                      "bytes": sum(f.stat().st_size for f in ([paths[name]] if paths[name].is_file()
                                                               else paths[name].glob("*.safetensors"))),
                      "kernels": _kernels(model)}
    from bench.bench_int8 import cpu_flags

    return {"threads": THREADS, "config": CONFIG, "rounds": ROUNDS, "prompt_tokens": PROMPT,
            "new_tokens": NEW_TOKENS, "build_and_quantize_s": round(built_s, 1), "cpu": cpu_flags(),
            "models": rows}


def summary(r: dict) -> str:
    lines = [f"Random Llama decoder (30 × 576, vocab 49152, tied), {r['threads']} threads, {r['prompt_tokens']}-token "
             f"prompt then {r['new_tokens']} tokens greedily with the KV cache, median of {r['rounds']} interleaved "
             f"rounds. CPU: {r['cpu']['model']}; {r['cpu']['summary']}.", "",
             "| model | MB | prefill tok/s | vs fp32 | decode tok/s | vs fp32 | kernels (layers) |",
             "|---|---|---|---|---|---|---|"]
    for name, v in r["models"].items():
        kernels = "; ".join(f"{rows.replace('_', ' ')}: " + ", ".join(f"{k} ×{n}" for k, n in ks.items())
                            for rows, ks in v["kernels"].items()) or "—"
        lines.append(f"| {name} | {v['bytes'] / 1e6:.0f} | {v['prefill_tokens_per_s']:.0f} | "
                     f"{v['prefill_vs_fp32']:.2f}× | {v['decode_tokens_per_s']:.1f} | {v['decode_vs_fp32']:.2f}× | "
                     f"{kernels} |")
    return "\n".join(lines)
