"""Decoding speed of weight-only int4 / int8 and W8A8 on a decoder LLM: prefill and decode tokens/s against fp32.

A random Llama-architecture decoder shaped like a 135M model (30 blocks, hidden 576, intermediate 1536, 9
heads, 3 KV heads, vocab 49152, tied embeddings), saved as transformers saves it, quantized by modelzip's
own `quantize --method weight-only` command (group 128: the 576-wide layers are 4.5 groups, padded to 5),
then timed by `measure.generation_speed`: a 64-token prompt in one pass (prefill), then 32 tokens one at a
time with the KV cache (decode), greedy, every model in turn in each of 5 rounds, medians. 2 threads. The
kernel each weight-only layer runs on (measured on this machine) is counted per call size, and a separate
pass splits a decoded token's time into the output layer (lm_head: 28M of the model's 135M weights, float
by default), the other Linears and everything else (attention, norms, rotary embedding, Python)."""

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
WO = ["--method", "weight-only", "--group-size", "128"]
VARIANTS = {  # name → (file stem, quantize flags); by default the output layer (lm_head, tied) stays float
    "weight-only int4 (group 128)": ("q4", [*WO, "--bits", "4"]),
    "weight-only int4 (group 128), lm_head too": ("q4-all", [*WO, "--bits", "4", "--include", "*"]),
    "weight-only int8 (group 128)": ("q8", [*WO, "--bits", "8"]),
    # W8A8: int8 activations rounded per token at run time (no calibration data here: no smoothing)
    "W8A8 dynamic (per-token activations)": ("w8a8", ["--method", "dynamic", "--exclude", "model.lm_head"]),
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
        cmd = [sys.executable, "-m", "modelzip_cli", "quantize", str(fp32), *flags, "-o", str(out), "--force", "-q"]
        subprocess.run(cmd, check=True)
        paths[name] = out
    return paths


def _kernels(model) -> dict:
    """Call size → kernel → number of weight-only or int8 layers running it."""
    from modelzip_cli.nn import int8
    from modelzip_cli.nn.weight_only import WeightOnlyEmbedding, WeightOnlyLinear

    out: dict = {}
    for rows in (1, PROMPT):
        kernels = [m.kernel_for(rows) for m in model.modules()
                   if isinstance(m, WeightOnlyLinear) and not isinstance(m, WeightOnlyEmbedding)]
        kernels += list(int8.kernels_for(model, rows).values())
        for k in kernels:
            out.setdefault(f"{rows}_rows", {}).setdefault(k, 0)
            out[f"{rows}_rows"][k] += 1
    return out


def _decode_breakdown(model, prompt, tokens: int = 8) -> dict:
    """Where one decoded token's time goes (ms a token): the output layer (lm_head), the other Linears
    (weight-only or float), and everything else (attention, norms, rotary embedding, the model's Python),
    timed by hooks around each Linear in a separate pass of `tokens` tokens (the hooks' own cost falls in
    the Linears' share)."""
    import torch
    from torch import nn

    from modelzip_cli.measure.metrics import causal_lm, num_threads
    from modelzip_cli.nn.int8 import DynamicInt8Linear
    from modelzip_cli.nn.weight_only import WeightOnlyEmbedding, WeightOnlyLinear

    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    spent = {"lm_head": 0.0, "other Linears": 0.0}
    starts: dict = {}
    hooks = []
    for m in lm.modules():
        if isinstance(m, (nn.Linear, WeightOnlyLinear, DynamicInt8Linear)) and not isinstance(m, WeightOnlyEmbedding):
            key = "lm_head" if m is head else "other Linears"
            hooks.append(m.register_forward_pre_hook(lambda mod, args: starts.__setitem__(mod, time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, key=key: spent.__setitem__(key, spent[key] + time.perf_counter() - starts[mod])))
    try:
        with torch.inference_mode(), num_threads(THREADS):
            out = lm(input_ids=prompt, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            out = lm(input_ids=token, past_key_values=past, use_cache=True)  # a first decode step chooses kernels
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            spent.update(dict.fromkeys(spent, 0.0))  # decode only
            t0 = time.perf_counter()
            for _ in range(tokens):
                out = lm(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    ms = {k: v / tokens * 1000 for k, v in spent.items()}
    ms["everything else"] = total / tokens * 1000 - sum(ms.values())
    return {k: round(v, 3) for k, v in ms.items()}


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
                      "kernels": _kernels(model), "decode_ms_per_token": _decode_breakdown(model, prompt)}
    from bench.bench_int8 import cpu_flags

    return {"threads": THREADS, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "config": CONFIG,
            "rounds": ROUNDS, "prompt_tokens": PROMPT, "new_tokens": NEW_TOKENS,
            "build_and_quantize_s": round(built_s, 1), "cpu": cpu_flags(), "models": rows}


def summary(r: dict) -> str:
    lines = [f"Random Llama decoder (30 × 576, vocab 49152, tied), {r['threads']} threads, {r['prompt_tokens']}-token "
             f"prompt then {r['new_tokens']} tokens greedily with the KV cache, median of {r['rounds']} interleaved "
             f"rounds. CPU: {r['cpu']['model']}; {r['cpu']['summary']}; torch's kernels: "
             f"{r.get('cpu_capability', 'not recorded')}.", "",
             "| model | MB | prefill tok/s | vs fp32 | decode tok/s | vs fp32 | kernels (layers) |",
             "|---|---|---|---|---|---|---|"]
    for name, v in r["models"].items():
        kernels = "; ".join(f"{rows.replace('_', ' ')}: " + ", ".join(f"{k} ×{n}" for k, n in ks.items())
                            for rows, ks in v["kernels"].items()) or "—"
        lines.append(f"| {name} | {v['bytes'] / 1e6:.0f} | {v['prefill_tokens_per_s']:.0f} | "
                     f"{v['prefill_vs_fp32']:.2f}× | {v['decode_tokens_per_s']:.1f} | {v['decode_vs_fp32']:.2f}× | "
                     f"{kernels} |")
    shares = {name: v["decode_ms_per_token"] for name, v in r["models"].items() if "decode_ms_per_token" in v}
    if shares:
        parts = list(next(iter(shares.values())))
        lines += ["", "Where a decoded token's time goes (ms, a separate pass timed by hooks around each Linear):", "",
                  "| model | " + " | ".join(parts) + " |", "|---" * (len(parts) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{v[p]:.2f}" for p in parts) + " |" for name, v in shares.items()]
    return "\n".join(lines)
