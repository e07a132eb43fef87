"""int8 on CPU: modelzip's dynamic/static int8 against fp32, torch.ao.quantize_dynamic and torchao, one run.

MLP 1024→4096→4096→1024 at batch 64 and batch 1; the MNIST-1D CNN's static int8 at batch 256. Each
model is measured in interleaved rounds (so machine noise hits all alike) and the median is reported.
modelzip's models are the ones a user gets: written to disk and loaded back.
"""

from __future__ import annotations

import copy
import statistics
import warnings

from bench.common import ROOT, WORK

ROUNDS = 5
MLP = {"input_size": 1024, "hidden_sizes": [4096, 4096], "num_classes": 1024, "dropout": 0.0}


def _modelzip(model, method: str, example, calib, path):
    from modelzip_cli.checkpoint.io import Manifest, load_checkpoint, save_checkpoint
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.techniques import make_config
    from modelzip_cli.techniques.quantize import apply

    manifest = Manifest(arch="zoo:mlp", arch_kwargs=MLP, input_shape=[1, 1024])
    result = apply(copy.deepcopy(model), make_config("quantize", method, {}),
                   Context(example_input=example, calib_data=calib), manifest)
    save_checkpoint(result.model, manifest.with_edits(result.edits), path)
    return load_checkpoint(path).model


def run() -> dict:
    import torch

    from modelzip_cli.checkpoint.io import build_arch, load_checkpoint
    from modelzip_cli.measure.metrics import batch_of, default_threads, latency_ms
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import Dataset, load_data
    from modelzip_cli.techniques.quantize import StaticConfig, apply

    warnings.simplefilter("ignore")
    threads = default_threads()
    torch.manual_seed(0)
    fp32 = build_arch("zoo:mlp", MLP).eval()
    calib = Dataset(inputs=torch.randn(512, 1024), targets=None, path=WORK / "random-calibration")
    example = torch.randn(1, 1024)
    models = {"fp32": fp32,
              "modelzip dynamic int8": _modelzip(fp32, "dynamic", example, calib, WORK / "q_dyn.safetensors"),
              "modelzip static int8": _modelzip(fp32, "static", example, calib, WORK / "q_static.safetensors")}
    from torch.ao.quantization import quantize_dynamic

    models["torch.ao quantize_dynamic"] = quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    torchao_error = None
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = copy.deepcopy(fp32)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        models["torchao Int8DynamicActivationInt8Weight (eager)"] = ao
    except Exception as exc:  # report, do not hide
        torchao_error = f"{type(exc).__name__}: {exc}"[:300]

    results: dict = {"threads": threads, "rounds": ROUNDS, "torchao_error": torchao_error, "mlp": {}}
    for batch in (64, 1):
        x = torch.randn(batch, 1024)
        rounds = {name: [] for name in models}
        for _ in range(ROUNDS):
            for name, m in models.items():
                rounds[name].append(latency_ms(m, x, threads=threads, min_seconds=0.3))
        med = {name: statistics.median(v) for name, v in rounds.items()}
        results["mlp"][f"batch_{batch}"] = {name: {"ms": ms, "speedup_vs_fp32": med["fp32"] / ms}
                                            for name, ms in med.items()}

    teacher = ROOT / "sample_models" / "mnist1d_teacher.safetensors"
    loaded = load_checkpoint(teacher)
    train = load_data(ROOT / "sample_models" / "mnist1d_train.safetensors")
    cnn_q = apply(copy.deepcopy(loaded.model), StaticConfig(),
                  Context(example_input=loaded.manifest.example_input(), calib_data=train), loaded.manifest).model
    x = batch_of(train.inputs, 256)
    rows = [(latency_ms(loaded.model, x, threads=threads), latency_ms(cnn_q, x, threads=threads))
            for _ in range(ROUNDS)]
    f, q = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    results["cnn1d_static_batch_256"] = {"fp32_ms": f, "int8_ms": q, "speedup_vs_fp32": f / q}
    return results


def summary(r: dict) -> str:
    lines = [f"{r['threads']} threads, median of {r['rounds']} interleaved rounds.", ""]
    for batch, rows in r["mlp"].items():
        lines += [f"MLP 1024→4096→4096→1024, {batch.replace('_', ' ')}:", "", "| model | ms | vs fp32 |",
                  "|---|---|---|"]
        lines += [f"| {name} | {v['ms']:.3f} | {v['speedup_vs_fp32']:.2f}× |" for name, v in rows.items()]
        lines.append("")
    if r["torchao_error"]:
        lines += [f"torchao could not run: {r['torchao_error']}", ""]
    c = r["cnn1d_static_batch_256"]
    lines.append(f"MNIST-1D CNN static int8 at batch 256: {c['fp32_ms']:.3f} ms → {c['int8_ms']:.3f} ms, "
                 f"**{c['speedup_vs_fp32']:.2f}×**.")
    return "\n".join(lines)
