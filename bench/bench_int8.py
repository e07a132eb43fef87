"""int8 without torch.ao: modelzip's plain-int8 modules on each backend against fp32, the first wave's torch.ao
paths, torchao's eager int8, and modelzip's weight-only int8 / int4 on the kernels measured fastest here
(and forced onto the float fallback, for comparison), one run.

MLP 1024→4096→4096→1024 (random inputs, random calibration) and the digits teacher (its own test and
train data), batch 1 and 64, 2 threads. Every model is timed in interleaved rounds (machine noise hits
all alike) and the median is reported with its ratio to fp32 and its SQNR against fp32 on the timed
batch. The plain modules run under each backend (auto, plain, torch-ao) and, named as such, on
`_int_mm` forced. Models far slower than fp32 (a scalar int8 loop) are timed with fewer repeats. The
weight-only rows name the kernel each layer ran on; the results hold the CPU's model and flags."""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
import warnings
from pathlib import Path

from bench.common import ROOT

ROUNDS = 5
SLOW_S = 0.2  # a model whose warm call takes longer than this is timed in one round of 3 calls
MLP = {"input_size": 1024, "hidden_sizes": [4096, 4096], "num_classes": 1024, "dropout": 0.0}
# the flags that decide which int8 / int4 / bf16 kernels a CPU can run fast
KERNEL_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> dict:
    """The CPU's model name and the kernel-relevant flags it has (from /proc/cpuinfo), with a short summary."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith(key)), "")  # noqa: E731
    flags = set(field("flags").split())
    have = [f for f in KERNEL_FLAGS if f in flags]
    if "avx512f" in flags:
        summary = "AVX-512 (" + ", ".join(f.removeprefix("avx512_") for f in ("avx512_vnni", "avx512_bf16")
                                         if f in flags) + ")"
    else:
        summary = "AVX2 only" if "avx2" in flags else "no AVX2"
    if "amx_tile" in flags:
        summary += ", AMX"
    return {"model": field("model name") or "unknown", "flags": have, "summary": summary,
            "cores": len(os.sched_getaffinity(0))}


def _models(fp32, calib, example) -> dict:
    """name → (model, backend, forced plain kernel or None)."""
    import torch
    from torch import nn

    from modelzip_cli.nn import int8
    from modelzip_cli.nn.weight_only import WeightOnlyLinear

    names = [n for n, m in fp32.named_modules() if isinstance(m, nn.Linear)]

    def plain_static(reduced: bool):
        prepared = int8.prepare_static(copy.deepcopy(fp32), names, reduced=reduced)
        with torch.no_grad():
            for x in calib:
                prepared(x)
        return int8.convert(prepared)[0].eval()

    def ao_dynamic():  # the first wave's path: torch.ao.quantization directly
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(fp32), set(names), dtype=torch.qint8)

    def ao_static():
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(fp32), get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for x in calib:
                prepared(x)
        return convert_fx(prepared)

    def weight_only(bits):
        m = copy.deepcopy(fp32)
        for n in names:
            parent, _, child = n.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child,
                    WeightOnlyLinear.from_float(m.get_submodule(n), bits, 128))
        return m.eval()

    dyn = {act: int8.quantize_dynamic(copy.deepcopy(fp32), names, act).eval() for act in int8.ACTIVATIONS}
    static8, static7 = plain_static(False), plain_static(True)
    models = {
        "fp32": (fp32, "auto", None),
        "modelzip dynamic, backend auto": (dyn["per-token"], "auto", None),
        "modelzip dynamic, backend plain": (dyn["per-token"], "plain", None),
        "modelzip dynamic per-token, plain on _int_mm": (dyn["per-token"], "plain", "int_mm"),
        "modelzip dynamic per-tensor, plain on _int_mm": (dyn["per-tensor"], "plain", "int_mm"),
        "modelzip dynamic, backend torch-ao": (dyn["per-token"], "torch-ao", None),
        "modelzip static (7-bit), backend auto": (static7, "auto", None),
        "modelzip static (8-bit), backend plain": (static8, "plain", None),
        "modelzip static (8-bit), plain on _int_mm": (static8, "plain", "int_mm"),
        "modelzip static (7-bit), backend torch-ao": (static7, "torch-ao", None),
        "torch.ao quantize_dynamic (first wave)": (ao_dynamic(), "auto", None),
        "torch.ao FX static x86 (first wave)": (ao_static(), "auto", None),
    }
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = copy.deepcopy(fp32)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        models["torchao Int8DynamicActivationInt8Weight (eager)"] = (ao, "auto", None)
    except Exception as exc:  # report, do not hide
        models[f"torchao failed: {type(exc).__name__}: {exc}"[:200]] = (None, "auto", None)
    for bits in (8, 4):
        m = weight_only(bits)
        models[f"weight-only int{bits} (group 128)"] = (m, "auto", None)
        models[f"weight-only int{bits} (group 128), float fallback forced"] = (copy.deepcopy(m), "auto", "wo-float")
    return models


@contextlib.contextmanager
def _kernel(backend: str, kernel: str | None):
    """The int8 backend and plain kernel a model runs under, or ("wo-float") weight-only on the float kernel."""
    from modelzip_cli.kernels import weight_only as wo_kernels
    from modelzip_cli.nn import int8

    with int8.use_backend(backend), int8.use_kernel("auto" if kernel in (None, "wo-float") else kernel):
        with wo_kernels.use_kernel("float") if kernel == "wo-float" else contextlib.nullcontext():
            yield


def _kernels(model, rows: int) -> dict[str, str] | None:
    """Weight-only layer → the kernel a call on `rows` rows runs on; None for other models."""
    from modelzip_cli.nn.weight_only import WeightOnlyLinear

    found = {n: m.kernel_for(rows) for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    return found or None


def _time(model, x, threads: int, slow: bool) -> float:
    from modelzip_cli.measure.metrics import latency_ms

    if slow:
        return latency_ms(model, x, threads=threads, warmup=0, min_repeats=3, min_seconds=0)
    return latency_ms(model, x, threads=threads, min_seconds=0.3)


def _compare(fp32, calib, example, inputs, threads: int) -> dict:
    import torch

    from modelzip_cli.measure.metrics import num_threads, sqnr_db

    models = _models(fp32, calib, example)
    out: dict = {}
    for batch in (1, 64):
        x = inputs(batch)
        rows: dict = {}
        with torch.inference_mode(), num_threads(threads):
            reference = fp32(x)
            for name, (m, b, k) in models.items():
                if m is None:
                    continue
                with _kernel(b, k):
                    y = m(x)  # builds what a first call builds (dequantized weights, packed weights, torch.ao modules)
                    t0 = time.perf_counter()
                    m(x)
                    once = time.perf_counter() - t0
                    kernels = _kernels(m, batch)
                sqnr = sqnr_db(reference, y)
                rows[name] = {"sqnr_db": round(sqnr, 2) if sqnr != float("inf") else None, "slow": once > SLOW_S,
                              "ms": []}
                if kernels is not None:
                    rows[name]["kernels"] = kernels
        for r in range(ROUNDS):
            for name, row in rows.items():
                if row["slow"] and r > 0:
                    continue
                m, b, k = models[name]
                with _kernel(b, k):
                    row["ms"].append(_time(m, x, threads, row["slow"]))
        fp32_ms = statistics.median(rows["fp32"]["ms"])
        for row in rows.values():
            row["ms"] = statistics.median(row["ms"])
            row["speedup_vs_fp32"] = fp32_ms / row["ms"]
        out[f"batch_{batch}"] = rows
    out["failed"] = [name for name, (m, _, _) in models.items() if m is None]
    return out


def _products(threads: int) -> dict:
    """One int8×int8→int32 product against the fp32 one, at the MLP's widest shape."""
    import torch

    from modelzip_cli.measure.metrics import num_threads

    out = {}
    with torch.inference_mode(), num_threads(threads):
        for m in (1, 64):
            a, b = torch.randn(m, 4096), torch.randn(4096, 4096)
            qa = torch.randint(-127, 128, (m, 4096), dtype=torch.int8)
            qb = torch.randint(-127, 128, (4096, 4096), dtype=torch.int8)
            ms = {}
            for name, fn, args in (("fp32", torch.mm, (a, b)), ("int_mm", torch._int_mm, (qa, qb))):
                fn(*args)  # warm-up
                t0 = time.perf_counter()
                fn(*args)
                ms[name] = (time.perf_counter() - t0) * 1000
            out[f"{m}x4096x4096"] = {"fp32_ms": ms["fp32"], "int_mm_ms": ms["int_mm"],
                                     "int_mm_speedup": ms["fp32"] / ms["int_mm"]}
    return out


def run() -> dict:
    import torch

    from modelzip_cli import load_model
    from modelzip_cli.checkpoint.io import build_arch
    from modelzip_cli.measure.metrics import batch_of
    from modelzip_cli.nn import int8
    from modelzip_cli.pipeline.data import load_data

    warnings.simplefilter("ignore")
    threads = 2
    torch.manual_seed(0)
    results: dict = {
        "threads": threads, "rounds": ROUNDS, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_flags(),
        "int_mm_is_fast": int8.int_mm_is_fast(), "auto_kernel": int8.kernel(),
        "int_mm_products": _products(threads),
    }
    mlp = build_arch("zoo:mlp", MLP).eval()
    calib = [torch.randn(32, 1024) for _ in range(16)]
    results["mlp"] = _compare(mlp, calib, torch.randn(1, 1024), lambda b: torch.randn(b, 1024), threads)
    teacher = load_model(ROOT / "sample_models" / "digits_teacher.safetensors")
    train = load_data(ROOT / "sample_models" / "digits_train.safetensors")
    test = load_data(ROOT / "sample_models" / "digits_test.safetensors")
    calib = [x for x, _, _ in train.batches(32)][:16]
    results["digits"] = _compare(teacher, calib, test.inputs[:1], lambda b: batch_of(test.inputs, b), threads)
    return results


def summary(r: dict) -> str:
    lines = [f"{r['threads']} threads, median of {r['rounds']} interleaved rounds (models slower than "
             f"{SLOW_S * 1000:.0f} ms a call: one round of 3). CPU capability {r['cpu_capability']}; "
             f"`_int_mm` on oneDNN: {r['int_mm_is_fast']}; the plain modules' auto kernel: {r['auto_kernel']}.",
             f"CPU: {r['cpu']['model']}, {r['cpu']['summary']}; flags: {' '.join(r['cpu']['flags'])}."
             if "cpu" in r else "CPU flags not recorded (a run before they were).", ""]
    for shape, p in r["int_mm_products"].items():
        lines.append(f"- {shape} product: fp32 {p['fp32_ms']:.2f} ms, `_int_mm` {p['int_mm_ms']:.2f} ms "
                     f"({p['int_mm_speedup']:.3f}× fp32)")
    lines.append("")
    for model, title in (("mlp", "MLP 1024→4096→4096→1024"), ("digits", "digits teacher 64→512→256→128→10")):
        for batch in ("batch_1", "batch_64"):
            lines += [f"{title}, {batch.replace('_', ' ')}:", "", "| model | ms | vs fp32 | SQNR dB |",
                      "|---|---|---|---|"]
            lines += [f"| {name} | {v['ms']:.3f} | {v['speedup_vs_fp32']:.2f}× | {v['sqnr_db']} |"
                      + (f" kernels: {', '.join(v['kernels'].values())} |" if v.get("kernels") else "")
                      for name, v in r[model][batch].items()]
            lines.append("")
        if r[model]["failed"]:
            lines += [f"failed: {', '.join(r[model]['failed'])}", ""]
    return "\n".join(lines)
