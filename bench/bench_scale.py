"""Models bigger than memory (README): peak RSS and wall time of `modelzip` commands, each run in a fresh child
process whose own VmHWM is read when it ends (bench/common.py).

1. A Llama-7B-shaped checkpoint (32 blocks, hidden 4096, intermediate 11008, vocab 32000, bf16, random
   weights, about 13.5 GB) generated on the meta device and written shard by shard, never held in memory, as a
   Hugging Face folder in a temporary folder removed after. Against a plain copy of its files measured in the
   same run: weight-only int4 g128 (streamed) and magnitude 50% global (streamed). Each starts with the model's
   pages dropped from the page cache (posix_fadvise) and ends with what it wrote on the disk (fsync), so all
   three read and write the disk, not memory.
2. GPTQ int4 g128 on a random 24-block decoder of hidden 1024 with WINDOWS × 512 calibration tokens.
3. The 1.21 GB MLP of the `prune` case: global magnitude 50%, in process (what `prune` measures) and through
   the CLI (streamed).
4. W8A8 dynamic with smoothing on a random 30-block GQA decoder of hidden 576 (135 M-class), 128 × 128 tokens.

The machine these run on is shared: figures are one run each, and the page cache holds part of the input.
Every child is killed if its resident memory passes MAX_RSS_MB (others share the machine's 24 GB).

MODELZIP_SCALE_CASES=mlp,dynamic,llama,gptq runs only those cases (any prefix of a case's name); the others'
figures are carried from the last bench/results/scale.json, each case with the date it ran.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, WORK, in_child

LLAMA_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
DECODER_1024 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
                "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
                "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 1024,
                "tie_word_embeddings": True, "torch_dtype": "float32"}
DECODER_576 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048,
               "tie_word_embeddings": True, "torch_dtype": "float32"}
WINDOWS = 128  # GPTQ calibration windows of 512 tokens, as the issue asks (about 10 minutes a path here)
SHARD = 5 << 30
MAX_RSS_MB = 8000  # a child past this is killed: the machine is shared

GENERATE = """
import json, sys, torch
from pathlib import Path
from modelzip_cli import hf
from modelzip_cli.checkpoint import shards
from modelzip_cli.files import Outputs
config, folder = json.loads(sys.argv[2]), Path(sys.argv[3])
folder.mkdir(parents=True)
with torch.device("meta"):
    model = hf.build("causal-lm", config).model
seen, state = set(), {}
for k, t in model.state_dict(keep_vars=True).items():  # a tied tensor once, under its first name
    if id(t) not in seen:
        seen.add(id(t))
        state[k] = t
dtype = getattr(torch, config["torch_dtype"])
sizes = {k: t.numel() * dtype.itemsize for k, t in state.items()}
plan, shard, size = [], 0, 0
for k in state:
    if size and size + sizes[k] > int(sys.argv[4]):
        shard, size = shard + 1, 0
    size += sizes[k]
    plan.append(shard)
g = torch.Generator().manual_seed(0)
bases = {}  # one random tensor per shape, scaled differently for each tensor: random weights, generated quickly
with Outputs() as out:
    w = shards.ShardWriter(folder / "model.safetensors", plan[-1] + 1,
                           [4096 + 200 * len(state)] * (plan[-1] + 1), out)
    for (k, t), s in zip(state.items(), plan):
        if s == len(w._shards):
            w.start(s)
        if k.endswith("norm.weight"):
            value = torch.ones(t.shape)
        else:
            if tuple(t.shape) not in bases:
                bases[tuple(t.shape)] = torch.randn(t.shape, generator=g)
            value = bases[tuple(t.shape)] * (0.02 * (1 + 0.5 * torch.rand((), generator=g).item()))
        w.add(k, value.to(dtype))
    w.finish(None)
    out.commit()
(folder / "config.json").write_text(json.dumps(config))
"""

CLI = """
import sys
from modelzip_cli.cli.app import run
code = run(sys.argv[2:])
if code:
    raise SystemExit(code)
"""

# The same command with GPTQ's statistics taken in one whole-model pass (every Linear's Hessian at once)
WHOLE_MODEL_CLI = CLI.replace("import sys\n", "import sys\nfrom modelzip_cli.pipeline import sequential\n"
                              "sequential.BY_BLOCK = False\n")

COPY = """
import os, shutil, sys
from pathlib import Path
shutil.copytree(sys.argv[2], sys.argv[3])
for p in Path(sys.argv[3]).iterdir():  # on the disk, as modelzip's outputs are (it syncs what it writes)
    with open(p, "rb") as f:
        os.fsync(f.fileno())
"""

WINDOWS_FILE = """
import sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
save_file({"inputs": torch.randint(0, 32000, (int(sys.argv[3]), 512), generator=g)}, sys.argv[2])
"""


def _evict(path: Path) -> None:
    """Drop a file's (or a folder's files') pages from the page cache, written back first: the next read comes
    from the disk. The copy and the commands it is compared with both start cold (the generated 13.5 GB file
    was otherwise read from memory by whichever ran first)."""
    for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _child(code: str, *args: str) -> dict:
    return in_child(code, *args, max_rss_mb=MAX_RSS_MB)


def _modelzip(*args: str, code: str = CLI) -> dict:
    t0 = time.perf_counter()
    result = in_child(code, *args, "--quiet", "--force", max_rss_mb=MAX_RSS_MB)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


PARTIAL: dict = {}  # the figures of the case running, kept if it stops part way


def _output_bytes(work: Path, stem: str) -> int:
    """Bytes of an output written as `stem.safetensors`, or as shards beside its index (the report left out)."""
    return sum(p.stat().st_size for p in work.glob(f"{stem}*.safetensors*") if p.name != f"{stem}.safetensors.json")


def _llama_7b(work: Path) -> dict:
    model = work / "llama7b"
    r = PARTIAL
    t0 = time.perf_counter()
    gen = _child(GENERATE, json.dumps(LLAMA_7B), str(model), str(SHARD))
    r.update({"model_bytes": _bytes(model), "generate_s": round(time.perf_counter() - t0, 1),
              "generate_peak_rss_mb": round(gen["peak_rss_mb"])})
    copied = work / "copy"
    _evict(model)
    copy = _child(COPY, str(model), str(copied))
    shutil.rmtree(copied)
    r["copy_s"] = round(copy["seconds"], 1)
    print("llama_7b_shape (so far)", json.dumps(r), flush=True)
    _evict(model)
    int4 = _modelzip("quantize", str(model), "--method", "weight-only", "--bits", "4", "--group-size", "128",
                     "-o", str(work / "int4.safetensors"))
    r["int4_g128"] = {"seconds": round(int4["seconds"], 1), "peak_rss_mb": round(int4["peak_rss_mb"]),
                      "output_bytes": _output_bytes(work, "int4")}
    print("llama_7b_shape (so far)", json.dumps(r), flush=True)
    for p in work.glob("int4*"):
        p.unlink()
    _evict(model)
    pruned = _modelzip("prune", str(model), "--ratio", "0.5", "-o", str(work / "pruned.safetensors"))
    r["magnitude_50_global"] = {"seconds": round(pruned["seconds"], 1), "peak_rss_mb": round(pruned["peak_rss_mb"]),
                                "output_bytes": _output_bytes(work, "pruned")}
    for p in work.glob("pruned*"):
        p.unlink()
    return dict(r)


def _gptq(work: Path) -> dict:
    model = work / "decoder1024"
    _child(GENERATE, json.dumps(DECODER_1024), str(model), str(SHARD))
    windows = work / "windows.safetensors"
    _child(WINDOWS_FILE, str(windows), str(WINDOWS))
    args = ("quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "128", "--calib-data",
            str(windows), "--calib-batches", str(WINDOWS // 8), "--calib-batch-size", "8")
    run = _modelzip(*args, "-o", str(work / "gptq.safetensors"))
    r = PARTIAL
    r.update({"model_bytes": _bytes(model), "windows": WINDOWS, "tokens_per_window": 512,
              "seconds": round(run["seconds"], 1), "peak_rss_mb": round(run["peak_rss_mb"])})
    print("gptq_24x1024 (so far)", json.dumps(r), flush=True)
    whole = _modelzip(*args, "-o", str(work / "gptq_whole.safetensors"), code=WHOLE_MODEL_CLI)
    r["whole_model_path"] = {"seconds": round(whole["seconds"], 1), "peak_rss_mb": round(whole["peak_rss_mb"])}
    return dict(r)


def _dynamic(work: Path) -> dict:
    """W8A8 dynamic with smoothing calibrated on 128 × 128 tokens, statistics block by block; the output layer
    (tied to the embedding) left float, as LLM tools leave it."""
    model = work / "decoder576"
    _child(GENERATE, json.dumps(DECODER_576), str(model), str(SHARD))
    windows = work / "windows128.safetensors"
    _child(WINDOWS_FILE.replace("512", "128"), str(windows), "128")
    run = _modelzip("quantize", str(model), "--method", "dynamic", "--calib-data", str(windows),
                    "--calib-batches", "4", "--calib-batch-size", "32", "--exclude", "model.lm_head",
                    "-o", str(work / "dynamic.safetensors"))
    return {"model_bytes": _bytes(model), "windows": 128, "tokens_per_window": 128,
            "seconds": round(run["seconds"], 1), "peak_rss_mb": round(run["peak_rss_mb"])}


def _mlp(work: Path) -> dict:
    from bench.bench_prune import KWARGS, MAKE, MODELZIP

    path = WORK / "big_mlp.safetensors"
    if not path.exists():
        _child(MAKE.replace("KWARGS", repr(KWARGS)), str(path))
    lines = _child(MODELZIP, str(path))["stdout"].splitlines()
    inproc = json.loads(next(ln for ln in lines if ln.startswith("BENCH_RESULT ")).removeprefix("BENCH_RESULT "))
    prune_s = float(next(ln for ln in lines if ln.startswith("PRUNE_S")).split()[1])
    cli = _modelzip("prune", str(path), "--ratio", "0.5", "-o", str(work / "mlp.pruned.safetensors"))
    return {"model_bytes": path.stat().st_size, "in_process_prune_s": round(prune_s, 2),
            "in_process_peak_rss_mb": round(inproc["peak_rss_mb"]),
            "cli_streamed_s": round(cli["seconds"], 2), "cli_streamed_peak_rss_mb": round(cli["peak_rss_mb"])}


CASES = (("mlp_1.21gb", "_mlp"), ("dynamic_30x576", "_dynamic"), ("llama_7b_shape", "_llama_7b"),
         ("gptq_24x1024", "_gptq"))


def _chosen() -> list[str]:
    wanted = [w.strip() for w in os.environ.get("MODELZIP_SCALE_CASES", "").split(",") if w.strip()]
    return [name for name, _ in CASES if not wanted or any(name.startswith(w) for w in wanted)]


def _terminated(signum, frame):  # SIGTERM: unwind, so the temporary folders (13.5 GB) are removed
    raise SystemExit(143)


def run() -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "scale.json"
    results = json.loads(previous.read_text())["results"] if previous.exists() else {}
    chosen = _chosen()
    stopped = False
    old = signal.signal(signal.SIGTERM, _terminated)
    try:
        for name, case in CASES:
            if name not in chosen:
                continue
            PARTIAL.clear()
            with tempfile.TemporaryDirectory(dir=WORK, prefix="scale-") as tmp:
                try:
                    results[name] = globals()[case](Path(tmp))
                except Exception as exc:  # one failing case still reports the others, with what it measured
                    why = str(exc).strip().splitlines()[-1][:400] if str(exc) else repr(exc)
                    results[name] = {**PARTIAL, "failed": why}
                except SystemExit:  # SIGTERM: what was measured is kept, the rest said to be stopped
                    results[name] = {**PARTIAL, "failed": "stopped (SIGTERM) before the case ended"}
                    stopped = True
            results[name]["ran"] = time.strftime("%Y-%m-%d %H:%M")
            print(name, json.dumps(results[name]), flush=True)
            if stopped:
                break
    finally:
        signal.signal(signal.SIGTERM, old)
    if previous.exists():  # another run may have recorded other cases meanwhile
        latest = json.loads(previous.read_text())["results"]
        results = {**latest, **{name: results[name] for name in chosen if name in results}}
    return {name: results[name] for name, _ in CASES if name in results}


def targets(r: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's targets against the figures: (what, met or None when not measured, the figures)."""
    mb = 2 ** 20
    out: list[tuple[str, bool | None, str]] = []
    s = r.get("llama_7b_shape", {})
    if int4 := s.get("int4_g128"):
        out.append(("7B-shaped int4 g128: peak < 2 GB", int4["peak_rss_mb"] * mb < 2e9, f"{int4['peak_rss_mb']} MB"))
        out.append(("7B-shaped int4 g128: time < reading and writing the bytes twice (2 × copy)",
                    int4["seconds"] < 2 * s["copy_s"], f"{int4['seconds']} s vs 2 × {s['copy_s']} s"))
    else:
        out.append(("7B-shaped int4 g128", None, str(s.get("failed", "not run"))))
    if prune := s.get("magnitude_50_global"):
        out.append(("7B-shaped magnitude 50% global: peak < 3 GB", prune["peak_rss_mb"] * mb < 3e9,
                    f"{prune['peak_rss_mb']} MB ({prune['seconds']} s)"))
    else:
        out.append(("7B-shaped magnitude 50% global", None, str(s.get("failed", "not run"))))
    g = r.get("gptq_24x1024", {})
    if g and "failed" not in g:
        out.append(("GPTQ 24 × 1024: peak < 2 × the model's bytes", g["peak_rss_mb"] * mb < 2 * g["model_bytes"],
                    f"{g['peak_rss_mb']} MB, model {g['model_bytes'] / mb:.0f} MB"))
        if w := g.get("whole_model_path"):
            out.append(("GPTQ 24 × 1024: block by block within 20% of the whole-model path's time",
                        g["seconds"] <= 1.2 * w["seconds"], f"{g['seconds']} s vs {w['seconds']} s "
                        f"(whole-model peak {w['peak_rss_mb']} MB)"))
    else:
        out.append(("GPTQ 24 × 1024", None, str(g.get("failed", "not run"))))
    d = r.get("dynamic_30x576", {})
    if d and "failed" not in d:
        out.append(("dynamic W8A8, 30 × 576, 128 × 128 tokens: < 3 min", d["seconds"] < 180, f"{d['seconds']} s"))
        out.append(("dynamic W8A8, 30 × 576: peak < 2 GB", d["peak_rss_mb"] * mb < 2e9, f"{d['peak_rss_mb']} MB"))
    else:
        out.append(("dynamic W8A8", None, str(d.get("failed", "not run"))))
    m = r.get("mlp_1.21gb", {})
    if m and "failed" not in m:
        out.append(("1.21 GB MLP global magnitude 50% in process: ≤ 3 s", m["in_process_prune_s"] <= 3,
                    f"{m['in_process_prune_s']} s"))
        out.append(("1.21 GB MLP in process: peak ≤ 1.3 × the model's bytes",
                    m["in_process_peak_rss_mb"] * mb <= 1.3 * m["model_bytes"],
                    f"{m['in_process_peak_rss_mb'] * mb / m['model_bytes']:.2f} ×"))
    else:
        out.append(("1.21 GB MLP", None, str(m.get("failed", "not run"))))
    return out


def summary(r: dict) -> str:
    lines = ["One run each on a shared machine (noisy); peak RSS is each child process's own VmHWM. Each case "
             "says when it ran (`ran` in scale.json).", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {what} | {'yes' if ok else 'no' if ok is False else '-'} | {fig} |" for what, ok, fig in targets(r)]
    lines.append("")
    m = r.get("mlp_1.21gb", {})
    if "failed" not in m and m:
        gb = m["model_bytes"] / 1e9
        lines += [f"Global magnitude 50% of the {gb:.2f} GB MLP:", "",
                  "| way | s | peak RSS MB | × model bytes |", "|---|---|---|---|",
                  f"| in process (`prune` case: prune only, after loading) | {m['in_process_prune_s']} | "
                  f"{m['in_process_peak_rss_mb']} | {m['in_process_peak_rss_mb'] * 2**20 / m['model_bytes']:.2f} |",
                  f"| `modelzip prune` (streamed, whole command) | {m['cli_streamed_s']} | "
                  f"{m['cli_streamed_peak_rss_mb']} | {m['cli_streamed_peak_rss_mb'] * 2**20 / m['model_bytes']:.2f} |",
                  ""]
    else:
        lines += [f"MLP: {m}", ""]
    s = r.get("llama_7b_shape", {})
    if "failed" not in s and s and "magnitude_50_global" in s:
        lines += [f"Llama-7B-shaped bf16 checkpoint, {s['model_bytes'] / 1e9:.2f} GB (generated in "
                  f"{s['generate_s']} s at {s['generate_peak_rss_mb']} MB peak); a plain copy of its files took "
                  f"{s['copy_s']} s, so reading and writing its bytes twice takes about {2 * s['copy_s']:.0f} s:", "",
                  "| command | s | peak RSS MB | output GB |", "|---|---|---|---|",
                  f"| weight-only int4 g128 (streamed) | {s['int4_g128']['seconds']} | "
                  f"{s['int4_g128']['peak_rss_mb']} | {s['int4_g128']['output_bytes'] / 1e9:.2f} |",
                  f"| magnitude 50% global (streamed) | {s['magnitude_50_global']['seconds']} | "
                  f"{s['magnitude_50_global']['peak_rss_mb']} | "
                  f"{s['magnitude_50_global']['output_bytes'] / 1e9:.2f} |", ""]
    else:
        lines += [f"Llama-7B shape: {s}", ""]
    g = r.get("gptq_24x1024", {})
    if "failed" not in g and g:
        lines += [f"GPTQ int4 g128 of a random 24-block decoder of hidden 1024 ({g['model_bytes'] / 1e9:.2f} GB fp32), "
                  f"{g['windows']} × {g['tokens_per_window']} calibration tokens: {g['seconds']} s, "
                  f"peak {g['peak_rss_mb']} MB "
                  f"({g['peak_rss_mb'] * 2**20 / g['model_bytes']:.2f} × the model's bytes)"
                  + (f"; the whole-model path (one pass, every Hessian at once) {w['seconds']} s, peak "
                     f"{w['peak_rss_mb']} MB." if (w := g.get("whole_model_path")) else ".")]
    else:
        lines += [f"GPTQ: {g}"]
    d = r.get("dynamic_30x576", {})
    if "failed" not in d and d:
        lines += ["", f"W8A8 dynamic with smoothing, calibrated block by block on {d['windows']} × "
                  f"{d['tokens_per_window']} tokens, of a random 30-block GQA decoder of hidden 576 "
                  f"({d['model_bytes'] / 1e9:.2f} GB fp32; lm_head left float): {d['seconds']} s, peak "
                  f"{d['peak_rss_mb']} MB."]
    else:
        lines += ["", f"dynamic: {d}"]
    return "\n".join(lines)
