"""Static int8 of convolutional nets against fp32, at batch 1 and 64 (issue 25, item 3).

Two CNNs: a small residual CNN built here (there is no residual CNN sample: 3 stages of 2 basic blocks,
32/64/128 channels, BatchNorm, 32×32 RGB input, seeded random weights; timing only) and the sample
MobileNetV2 (sample_models/mobilenet_v2_digits: depthwise convolutions, BatchNorm, ReLU6). Each is quantized
by modelzip's own static path (BatchNorm folded, calibrated on 256 digit images), then timed against fp32 in
interleaved rounds (measure.interleaved_latency: median and interquartile range) with a third variant, bench
only: the same int8 convolutions run by oneDNN's int8 convolution (`torch.ops.onednn.qconv2d_pointwise`, fp32
output; the same numerics, checked here), which the library does not use yet. The CPU's flags go into the
result: whether int8 convolutions can be fast depends on VNNI/AMX.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

from bench.common import ROOT

THREADS = 2
BATCHES = (1, 64)
SMOKE = os.environ.get("BENCH_SMOKE") == "1"  # a quick run that checks the case works, not a figure
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> dict:
    import torch

    from modelzip_cli.nn import int8

    try:
        text = Path("/proc/cpuinfo").read_text()
        present = set(next(ln for ln in text.splitlines() if ln.startswith("flags")).split(":")[1].split())
        model = next((ln.split(":")[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    except (OSError, StopIteration):
        present, model = set(), "?"
    return {"cpu": model, "flags": {f: f in present for f in FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "int_mm_fast": int8.int_mm_is_fast()}


def residual_cnn():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    class ResCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
            self.blocks = nn.Sequential(Block(32, 32, 1), Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1),
                                        Block(64, 128, 2), Block(128, 128, 1))
            self.head = nn.Linear(128, 10)

        def forward(self, x):  # (B, 3, 32, 32) → (B, 10)
            y = self.blocks(torch.relu(self.bn(self.stem(x))))
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    return ResCNN().eval()


def static_int8(model, calib):
    """modelzip's static quantization of `model` (the technique itself: BatchNorm folded, calibrated)."""
    from modelzip_cli.checkpoint.format import Manifest
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.techniques.quantize import StaticConfig, apply

    ctx = Context(calib_data=calib, example_input=calib.inputs[:1])
    result = apply(copy.deepcopy(model), StaticConfig(), ctx, Manifest(arch=None, input_shape=[1, 3, 32, 32]))
    return result.model.eval(), result.warnings


@contextlib.contextmanager
def onednn_convolutions(model):
    """Run `model`'s 2-d StaticInt8Conv layers on oneDNN's int8 convolution (fp32 output), inside the block."""
    import torch

    from modelzip_cli.nn import int8

    originals = {}
    for m in model.modules():
        if isinstance(m, int8.StaticInt8Conv) and m.dims == 2 and isinstance(m.padding, tuple):
            scale, zp = m.input_qparams()
            scale, zp_u8 = float(scale), int(zp) - int8.AMIN  # the int8 grid [-128, 127] as uint8 [0, 255]
            w_scale = m.weight_scale.float().flatten()
            packed = torch.ops.onednn.qconv_prepack(m.qweight, w_scale, scale, zp_u8, list(m.stride), list(m.padding),
                                                    list(m.dilation), m.groups, None)
            bias = None if m.bias is None else m.bias.float()
            w_zp = torch.zeros(w_scale.shape, dtype=torch.int64)

            def forward(x, m=m, scale=scale, zp_u8=zp_u8, packed=packed, w_scale=w_scale, bias=bias, w_zp=w_zp):
                qx = torch.clamp(torch.round(x / scale) + zp_u8, 0, 255).to(torch.uint8)
                return torch.ops.onednn.qconv2d_pointwise(qx, scale, zp_u8, packed, w_scale, w_zp, bias,
                                                          list(m.stride), list(m.padding), list(m.dilation),
                                                          m.groups, 1.0, 0, torch.float32, "none", [], "")

            originals[m] = m.forward
            m.forward = forward
    try:
        yield len(originals)
    finally:
        for m in originals:
            del m.forward


def run() -> dict:
    import torch

    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.measure.metrics import batch_of, fidelity, interleaved_latency, num_threads
    from modelzip_cli.pipeline.data import load_data
    from sample_models import digit_images

    work = ROOT / "bench" / "work"
    work.mkdir(parents=True, exist_ok=True)
    calib = load_data(digit_images.write("train", work / "cnn_calib.safetensors", limit=256), require_targets=False)
    models = {"residual CNN (built in the bench)": residual_cnn(),
              "MobileNetV2 sample": load_checkpoint(ROOT / "sample_models" / "mobilenet_v2_digits").model.eval()}
    out = {"env": cpu_flags(), "threads": THREADS, "models": {}}
    with num_threads(THREADS), torch.inference_mode():
        for label, fp32 in models.items():
            q, warnings = static_int8(fp32, calib)
            onednn = copy.deepcopy(q)
            row = {"warnings": warnings, "batches": {}}
            with onednn_convolutions(onednn) as n:
                row["onednn_convolutions"] = n
                x = calib.inputs[:64]
                row["onednn_max_abs_diff_vs_plain_int8"] = float((onednn(x) - q(x)).abs().max())
                row["int8_cosine_vs_fp32"] = fidelity(fp32(x), q(x))["cosine_mean"]
                for batch in BATCHES:
                    xb = batch_of(calib.inputs, batch)
                    t = interleaved_latency([fp32, q, onednn], [xb] * 3, threads=THREADS, warmup=1 if SMOKE else 2,
                                            min_rounds=3 if SMOKE else 10,
                                            min_seconds=0.0 if SMOKE else 0.5 if batch == 1 else 1.0)
                    row["batches"][f"batch_{batch}"] = {
                        name: {"median_ms": round(ti.median, 3), "iqr_ms": [round(ti.q1, 3), round(ti.q3, 3)],
                               "rounds": ti.rounds, "speed_vs_fp32": round(t[0].median / ti.median, 3)}
                        for name, ti in zip(("fp32", "static int8 (modelzip)", "static int8, oneDNN conv (bench)"),
                                            t, strict=True)}
            out["models"][label] = row
    return out


def summary(r: dict) -> str:
    env = r["env"]
    flags = ", ".join(f for f, on in env["flags"].items() if on) or "none of " + ", ".join(FLAGS)
    lines = [f"CPU: {env['cpu']} ({flags}; torch capability {env['torch_cpu_capability']}), "
             f"{r['threads']} threads. Median ms (interquartile range) over interleaved rounds; speed = fp32 time / "
             "this time.", "",
             "| model | batch | fp32 ms | static int8 ms (speed) | int8, oneDNN conv ms (speed) |",
             "|---|---|---|---|---|"]
    for label, row in r["models"].items():
        for batch, figures in row["batches"].items():
            cells = []
            for name in ("fp32", "static int8 (modelzip)", "static int8, oneDNN conv (bench)"):
                f = figures[name]
                iqr = f"{f['iqr_ms'][0]:.2f}–{f['iqr_ms'][1]:.2f}"
                speed = "" if name == "fp32" else f" {f['speed_vs_fp32']:.2f}×"
                cells.append(f"{f['median_ms']:.2f} ({iqr}){speed}")
            lines.append(f"| {label} | {batch.removeprefix('batch_')} | " + " | ".join(cells) + " |")
        if row["warnings"]:
            lines.append(f"| {label} | warnings | " + "; ".join(row["warnings"])[:300] + " | | |")
    return "\n".join(lines)
