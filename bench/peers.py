"""Peer tools for side-by-side benches, each in its own virtual environment under bench/work/ (their pins
conflict with modelzip's: llm-compressor 0.14 wants transformers ≤ 5.17), made from the package registry
on first use and reused after. A peer that cannot be installed is reported as skipped, with why."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import WORK

LLMCOMPRESSOR = "llmcompressor==0.14.0.1"

_GPTQ = r"""
import json, math, sys, time
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

model_dir, calib_path, held_path, out_dir, samples = sys.argv[1:6]
torch.set_num_threads(2)
calib = load_file(calib_path)
n = int(samples)
ds = Dataset.from_dict({"input_ids": calib["inputs"][:n].tolist(),
                       "attention_mask": calib["attention_mask"][:n].tolist()})
t_load = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
t0 = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
        max_seq_length=calib["inputs"].shape[1], num_calibration_samples=n)
seconds = time.perf_counter() - t0
model.save_pretrained(out_dir, save_compressed=True)
whole = time.perf_counter() - t_load
model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
held = load_file(held_path)
nll, tokens = 0.0, 0
with torch.inference_mode():
    for ids, mask in zip(held["inputs"].split(8), held["attention_mask"].split(8)):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
        nll += float(torch.nn.functional.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum"))
        tokens += int(valid.sum())
print("PEER " + json.dumps({"seconds": round(seconds, 2), "seconds_load_to_save": round(whole, 2),
                            "perplexity": math.exp(nll / tokens),
                            "version": llmcompressor.__version__}))
"""


def _venv(name: str, packages: list[str]) -> Path | str:
    """The peer's python, installing it on first use; a string saying why not when it cannot be had."""
    root = WORK / name
    python = root / "bin" / "python"
    stamp = root / ".installed"
    if stamp.exists():
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
        # torch first and pinned, as the Makefile does: the CPU build on disk, not a CUDA download
        for step in (["torch==2.13.0"], packages):
            subprocess.run([str(python), "-m", "pip", "install", "-q", *step], check=True, capture_output=True,
                           text=True, timeout=1800)
    except (subprocess.SubprocessError, OSError) as exc:
        tail = getattr(exc, "stderr", "") or str(exc)
        return f"could not install {' '.join(packages)}: {str(tail).strip().splitlines()[-1][:200]}"
    stamp.touch()
    return python


def llmcompressor_gptq(model_dir: Path, calib: Path, held: Path, out: Path, group: int,
                       samples: int = 128) -> dict:
    """llm-compressor's GPTQ W4A16 (group 128, symmetric, lm_head float) of a causal LM directory on the
    first `samples` calibration windows: its own wall time for `oneshot` (calibration and GPTQ) and from loading
    the model to its saved directory (imports done before either), and the perplexity of the
    compressed-tensors directory it saved, reloaded by transformers, on the held-out windows."""
    if group != 128:
        return {"skipped": "its W4A16 preset is group 128"}
    python = _venv("llmc", [LLMCOMPRESSOR])
    if isinstance(python, str):
        return {"skipped": python}
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), "-c", _GPTQ, str(model_dir), str(calib), str(held), str(out),
                           str(samples)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"skipped": "llm-compressor failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("PEER ")).removeprefix("PEER "))
    result.update(group=group, samples=samples, wall_seconds=round(time.perf_counter() - t0, 1),
                  bytes=sum(p.stat().st_size for p in out.glob("*.safetensors")))
    return result
