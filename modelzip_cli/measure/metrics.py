"""Measurements: parameters, bytes, sparsity, per-layer tables, accuracy and latency.

Figures are what was measured. Latency is a median and an interquartile range over rounds after warm-up,
every model compared timed in the same rounds, at a fixed thread count that is reported beside it.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.measure.perplexity import is_causal_lm, lm_figures
from modelzip_cli.pipeline.data import Dataset, as_model_input, float_dtype
from modelzip_cli.pipeline.run import device_of, evaluate

DEFAULT_BATCH_N = 256
DEFAULT_BATCH_N_TOKENS = 32


def default_threads() -> int:
    """One thread per core we may use (the report records it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def gzip_bytes(path: Path) -> int:
    """Size after gzip level 6: how small the file is for transfer (zeros compress). Streamed in 1 MB
    chunks, so a multi-GB checkpoint costs no more memory than a small one."""

    class _Count:
        n = 0

        def write(self, b) -> int:
            self.n += len(b)
            return len(b)

        def flush(self) -> None:
            pass

    sink = _Count()
    with open(path, "rb") as src, gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0) as gz:
        shutil.copyfileobj(src, gz, 1 << 20)
    return sink.n


def cpu_only(model: nn.Module) -> bool:
    """Whether the model holds int8 modules, whose kernels are chosen for, and measured on, CPUs only:
    modelzip's plain-int8 modules (int8.py: the kernel choice and its accelerators are CPU ones;
    `torch._int_mm` on CUDA refuses small batches) and torch.ao's quantized modules."""
    return any(type(m).__module__ == "modelzip_cli.nn.int8" or type(m).__module__.startswith("torch.ao.nn.quantized")
               for m in model.modules())


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, *, threads: int, warmup: int = 3,
               min_repeats: int = 10, min_seconds: float = 0.3) -> float:
    """Median wall time of one forward pass on `example`, in milliseconds, where the model is (on a GPU,
    from launch to the kernels' end)."""
    return interleaved_latency([model], [example], threads=threads, warmup=warmup, min_rounds=min_repeats,
                               min_seconds=min_seconds)[0].median


@dataclass(frozen=True)
class Timing:
    """Wall times of one forward pass over interleaved rounds, in milliseconds."""

    median: float
    q1: float
    q3: float
    rounds: int

    @property
    def spread(self) -> float:
        """The interquartile range: half the rounds fell inside it."""
        return self.q3 - self.q1


def _timing(times_s: list[float]) -> Timing:
    ms = sorted(t * 1000 for t in times_s)
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return Timing(median=median, q1=q1, q3=q3, rounds=len(ms))


@torch.inference_mode()
def interleaved_latency(models: list[nn.Module], examples: list[torch.Tensor], *, threads: int, warmup: int = 3,
                        min_rounds: int = 10, min_seconds: float = 0.3, max_rounds: int = 1000) -> list[Timing]:
    """One forward pass of every model on its example per round, the order reversed every other round, so a
    change in the machine's load (or a cache warmed by the one before) falls on every model alike. Rounds
    go on until each model has had `min_seconds` of them (at least `min_rounds`, at most `max_rounds`)."""
    runs = []
    for model, example in zip(models, examples, strict=True):
        model.eval()
        device = device_of(model)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        runs.append((model, as_model_input(example, float_dtype(model)).to(device), sync))
    times: list[list[float]] = [[] for _ in runs]
    with num_threads(threads):
        for _ in range(warmup):
            for model, x, sync in runs:
                model(x)
                sync()
        start = time.perf_counter()
        for r in range(max_rounds):
            if r >= min_rounds and time.perf_counter() - start >= min_seconds * len(runs):
                break
            order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
            for i in order:
                model, x, sync = runs[i]
                t0 = time.perf_counter()
                model(x)
                sync()
                times[i].append(time.perf_counter() - t0)
    return [_timing(t) for t in times]


NOISY_SPREAD = 0.25  # an interquartile range above a quarter of the median: the figures are indicative only
CLEAR_CHANGE = 0.05  # a difference under 5% is never called slower or faster, however tight the spread


def latency_change(before: Timing, after: Timing) -> str | None:
    """"slower" or "faster" when `after` differs from `before` by more than both spreads (and by more
    than 5%), else None: a difference inside the noise is no claim."""
    gap = after.median - before.median
    if abs(gap) <= max(before.spread, after.spread) or abs(gap) <= CLEAR_CHANGE * min(before.median, after.median):
        return None
    return "slower" if gap > 0 else "faster"


def timing_of(block: dict, key: str) -> Timing:
    """The Timing of a report's latency block at "batch_1" or "batch_n"."""
    q1, q3 = block.get(f"{key}_iqr", (block[key], block[key]))
    return Timing(median=block[key], q1=q1, q3=q3, rounds=block.get("rounds", 1))


def machine_load() -> float | None:
    """The 1-minute load average (runnable processes), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def noise_note(blocks: list[dict]) -> str | None:
    """One line when the spread of any latency is wide: the figures then say little."""
    widest = max((timing_of(b, k).spread / max(b[k], 1e-9) for b in blocks for k in ("batch_1", "batch_n")),
                 default=0.0)
    if widest <= NOISY_SPREAD:
        return None
    load = next((b["load"] for b in blocks if b.get("load") is not None), None)
    return (f"machine is noisy (load {load if load is not None else '?'} on {default_threads()} cores): latency "
            f"varied by up to {widest:.0%} of its median between rounds; no speed claim is made inside that spread")


def batch_of(example_source: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch of `batch` samples cut (and tiled if needed) from real inputs."""
    reps = -(-batch // example_source.shape[0])
    return example_source.repeat(reps, *[1] * (example_source.ndim - 1))[:batch].contiguous()


def default_batch_n(data: Dataset) -> int:
    """256 samples, or 32 sequences for token inputs (a sequence costs as much as hundreds of small samples)."""
    return DEFAULT_BATCH_N_TOKENS if data.inputs.dtype == torch.long else DEFAULT_BATCH_N


def measure_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """`device` (default: where the model is); a model whose kernels exist on CPU only is measured there."""
    device = torch.device(device) if device is not None else device_of(model)
    return torch.device("cpu") if device.type != "cpu" and cpu_only(model) else device


def latencies(models: list[nn.Module], data: Dataset, *, batch_n: int | None = None, threads: int | None = None,
              device: torch.device | str | None = None) -> list[dict]:
    """The report's latency block of each model, at batch 1 and batch N, all models timed in the same
    interleaved rounds: median, interquartile range and the number of rounds, with the thread count and
    the machine's load."""
    threads = threads or default_threads()
    batch_n = batch_n or default_batch_n(data)
    homes = [device_of(m) for m in models]
    devices = [measure_device(m, device) for m in models]
    for model, where in zip(models, devices, strict=True):
        model.to(where)
    try:
        blocks = [{"n": batch_n, "threads": threads, "device": str(where)} for where in devices]
        for key, x in (("batch_1", data.inputs[:1]), ("batch_n", batch_of(data.inputs, batch_n))):
            for block, t in zip(blocks, interleaved_latency(models, [x] * len(models), threads=threads), strict=True):
                block[key] = t.median
                block[f"{key}_iqr"] = [t.q1, t.q3]
                block["rounds"] = min(block.get("rounds", t.rounds), t.rounds)
    finally:
        for model, home in zip(models, homes, strict=True):
            model.to(home)
    load = machine_load()
    for block in blocks:
        block["load"] = load
    return blocks


def model_metrics(model: nn.Module, data: Dataset, *, batch_n: int | None = None,
                  threads: int | None = None, size_bytes: int | None = None,
                  device: torch.device | None = None, latency: bool = True, lm: bool = True) -> dict:
    """The report's metrics block for one model on one dataset. Batch N defaults to 256 samples, or 32
    sequences for token inputs. Measured on `device` (default: where the model is); a model whose kernels
    exist on CPU only is measured there, and the block says so. `latency=False`: no latency block (the
    caller times this model with others, interleaved, through `latencies`). A causal LM on token windows also
    gets its perplexity (`lm=False`: the caller measures it beside another model, lm.lm_figures)."""
    home, where = device_of(model), measure_device(model, device)
    model.to(where)
    try:
        m = evaluate(model, data) if data.targets is not None else {"samples": len(data)}
        if lm and is_causal_lm(model) and not data.inputs.is_floating_point():
            m.update(lm_figures([model], data.inputs)[0])
    finally:
        model.to(home)
    if latency:
        m["latency_ms"] = latencies([model], data, batch_n=batch_n, threads=threads, device=device)[0]
    m["parameters"] = count_parameters(model)
    if size_bytes is not None:
        m["bytes"] = size_bytes
    return m


def outputs_class_logits(model: nn.Module) -> bool:
    """Whether the model's compared output is class logits (modelzip's own models are classifiers; a
    Hugging Face adapter says for itself)."""
    return bool(getattr(model, "outputs_class_logits", True))


def fidelity(reference: torch.Tensor, outputs: torch.Tensor, *, class_logits: bool = True) -> dict:
    """How closely `outputs` follow `reference` (the input model's outputs on the same samples): cosine per
    sample (mean and minimum), top-1 agreement when the outputs are class logits (N, classes), max |Δ|."""
    ref, out = reference.float().flatten(1), outputs.float().flatten(1)  # (N, features)
    cosine = F.cosine_similarity(ref, out, dim=1, eps=1e-12)
    both_zero = (ref.norm(dim=1) == 0) & (out.norm(dim=1) == 0)
    cosine = torch.where(both_zero, torch.ones_like(cosine), cosine)
    result = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
              "max_abs_diff": float((ref - out).abs().max()), "samples": int(ref.shape[0])}
    if class_logits and reference.ndim == 2:
        result["top1_agreement"] = float((reference.argmax(1) == outputs.argmax(1)).float().mean())
    return result


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB (higher is better)."""
    noise = (reference.float() - test.float()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(reference.float().pow(2).sum() / noise))


# ---------------------------------------------------------------------------------------------------
# Generation speed of causal language models: prefill (the prompt in one pass) and decode (one token at a
# time against the KV cache), the two phases whose costs differ: decoding reads every weight per token.

DECODE_TOKENS = 32  # new tokens decoded greedily after the prompt
PROMPT_MAX = 128  # prompt tokens taken from the first sample of the data
GENERATION_ROUNDS = 5


def causal_lm(model: nn.Module) -> nn.Module | None:
    """The transformers causal LM `model` is, or holds (an HFModel), with a KV cache; else None."""
    lm_names = ("ForCausalLM", "LMHeadModel")
    inner = model if type(model).__name__.endswith(lm_names) else getattr(model, "model", None)
    config = getattr(inner, "config", None)
    if inner is None or config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if not type(inner).__name__.endswith(lm_names) or not getattr(config, "use_cache", True):
        return None
    return inner


def _prompt(inputs: torch.Tensor) -> torch.Tensor:
    """(1, L) token ids: the first sample's unpadded tokens, at most PROMPT_MAX."""
    x = inputs[0]
    if x.ndim == 2:  # (2, L): ids over mask
        x = x[0][x[1].bool()]
    return x[:PROMPT_MAX].reshape(1, -1)


@torch.inference_mode()
def _generate_once(lm: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation with the KV cache."""
    t0 = time.perf_counter()
    out = lm(input_ids=prompt, use_cache=True)
    t1 = time.perf_counter()
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (1, 1)
    for _ in range(new_tokens):
        out = lm(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return t1 - t0, time.perf_counter() - t1


def generation_speed(models: list[nn.Module], inputs: torch.Tensor, *, threads: int,
                     new_tokens: int = DECODE_TOKENS, rounds: int = GENERATION_ROUNDS) -> list[dict | None]:
    """Per model: prefill tokens/s (prompt tokens over the prompt's pass) and decode tokens/s (new tokens,
    one at a time with the KV cache, greedy), medians over `rounds` rounds that run every model once in
    turn (a change in the machine's load falls on all alike). None for a model that is not a causal LM."""
    lms = [causal_lm(m) for m in models]
    prompt = _prompt(inputs)
    times: list[list[tuple[float, float]]] = [[] for _ in models]
    with num_threads(threads):
        for lm in lms:  # warm-up: first calls pack weights and allocate
            if lm is not None:
                _generate_once(lm, prompt, 2)
        for _ in range(rounds):
            for i, lm in enumerate(lms):
                if lm is not None:
                    times[i].append(_generate_once(lm, prompt, new_tokens))
    out: list[dict | None] = []
    for lm, t in zip(lms, times, strict=True):
        if lm is None:
            out.append(None)
            continue
        prefill, decode = (statistics.median(x[k] for x in t) for k in (0, 1))
        out.append({"prefill_tokens_per_s": prompt.shape[1] / prefill, "decode_tokens_per_s": new_tokens / decode,
                    "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens, "batch": 1, "rounds": rounds,
                    "threads": threads})
    return out
