"""Quantization: dynamic, static (calibrated), QAT and weight-only int8/int4.

dynamic, static and qat run on torch.ao's x86 int8 kernels (see quant_backend.py for why). weight-only
is modelzip's own: integer weights with per-channel or per-group scales and zero points, int4 packed
two per byte, dequantized to float at run time. Every method records an edit that loading replays on
a fresh float model before the integer tensors are loaded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.checkpoint import Manifest, register_edit
from modelzip_cli.context import Context
from modelzip_cli.errors import InputError, UsageError
from modelzip_cli.measure import layer_table, predict, sqnr_db
from modelzip_cli.report import Step
from modelzip_cli.techniques import quant_backend as backend
from modelzip_cli.techniques.select import WEIGHTED, select_modules

DYNAMIC_TYPES = (nn.Linear, nn.LSTM, nn.GRU)


@dataclass
class QuantizeConfig:
    method: str  # dynamic | static | qat | weight-only
    bits: int = 8  # weight-only: 8 or 4
    group_size: int = 128  # weight-only: input channels sharing one scale; 0 = one scale per output channel
    calib_batches: int = 100  # static: batches of calibration data run through the observers
    calib_batch_size: int = 32
    epochs: int = 3  # qat: fake-quant fine-tuning epochs
    lr: float = 1e-4  # qat: small, the float weights are already trained
    batch_size: int = 64
    include: list[str] | None = None
    exclude: list[str] | None = None

    def validate(self) -> QuantizeConfig:
        if self.method not in QUANTIZERS:
            raise UsageError(f"unknown quantization method {self.method!r}", hint="use " + ", ".join(QUANTIZERS))
        if self.bits not in (8, 4):
            raise UsageError(f"--bits must be 8 or 4, got {self.bits}")
        if self.bits == 4 and self.method != "weight-only":
            raise UsageError(f"int4 is only available with --method weight-only, not {self.method}",
                             hint="use --method weight-only --bits 4, or --bits 8")
        if self.group_size < 0:
            raise UsageError(f"--group-size must be ≥ 0 (0 = per channel), got {self.group_size}")
        if self.calib_batches < 1 or self.calib_batch_size < 1:
            raise UsageError("--calib-batches and the calibration batch size must be ≥ 1")
        if self.epochs < 1 and self.method == "qat":
            raise UsageError(f"--epochs must be ≥ 1 for qat, got {self.epochs}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        return self

    def required_data(self) -> set[str]:
        return {"static": {"calib_data"}, "qat": {"data"}}.get(self.method, set())

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Weight-only: integer weights + scales + zero points, float compute


class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored as int8, or int4 packed two per byte, with per-group scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if 0 < group_size < in_features else in_features
        groups = math.ceil(in_features / self.group_size)
        padded = groups * self.group_size
        cols = padded if bits == 8 else math.ceil(padded / 2)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zero_points", torch.zeros(out_features, groups, dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scheme = f"int{bits} weight-only (group {self.group_size})"

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int) -> WeightOnlyLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        w = linear.weight.detach().float()
        pad = q.scales.shape[1] * q.group_size - q.in_features
        g = F.pad(w, (0, pad)).reshape(q.out_features, -1, q.group_size)  # (out, groups, group)
        if bits == 8:  # symmetric: zero point 0, range ±127
            scale = g.abs().amax(-1).clamp(min=1e-12) / 127
            ints = torch.clamp(torch.round(g / scale[..., None]), -127, 127)
            zp = torch.zeros_like(scale, dtype=torch.int8)
            q.qweight.copy_(ints.reshape(q.out_features, -1).to(torch.int8))
        else:  # asymmetric: 0..15 with a zero point per group
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            zp = torch.clamp(torch.round(-lo / scale), 0, 15)
            ints = torch.clamp(torch.round(g / scale[..., None]) + zp[..., None], 0, 15).to(torch.uint8)
            ints = ints.reshape(q.out_features, -1)
            if ints.shape[1] % 2:
                ints = F.pad(ints, (0, 1))
            q.qweight.copy_(ints[:, 0::2] | (ints[:, 1::2] << 4))  # two 4-bit values per byte
            zp = zp.to(torch.int8)
        q.scales.copy_(scale)
        q.zero_points.copy_(zp)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 8:
            ints = self.qweight.float()
        else:
            ints = torch.stack([self.qweight & 0x0F, self.qweight >> 4], dim=-1).reshape(self.out_features, -1)
            ints = ints[:, : self.scales.shape[1] * self.group_size].float()
        g = ints.reshape(self.out_features, -1, self.group_size)  # (out, groups, group)
        w = (g - self.zero_points.float()[..., None]) * self.scales[..., None]
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def logical_weights(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.dequantized_weight()}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme}"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ---------------------------------------------------------------------------------------------------
# Replays: rebuild the quantized module tree on a fresh float model


@register_edit("quantize_dynamic")
def _replay_dynamic(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    return backend.dynamic(model, set(edit["modules"]))


@register_edit("quantize_static")
def _replay_static(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    example = manifest.example_input()
    prepared = backend.prepare_static(model, example, set(edit["skip"]), qat=edit.get("qat", False))
    with torch.no_grad():
        prepared.eval()(example)  # give observers a range; the stored scales replace it on load
    return backend.convert_static(prepared)


@register_edit("quantize_weight_only")
def _replay_weight_only(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    for name in edit["modules"]:
        m = model.get_submodule(name)
        _replace(model, name, WeightOnlyLinear(m.in_features, m.out_features, m.bias is not None, edit["bits"],
                                               edit["group_size"]))
    return model


# ---------------------------------------------------------------------------------------------------
# Methods: (model, cfg, ctx) → (quantized model, edits, training history)


def plan(model: nn.Module, cfg: QuantizeConfig, example: torch.Tensor | None) -> list[str]:
    """Names of the modules this config would quantize (for `chain --dry-run`)."""
    types, what = {"dynamic": (DYNAMIC_TYPES, "Linear, LSTM or GRU"),
                   "weight-only": ((nn.Linear,), "Linear")}.get(cfg.method, (WEIGHTED, "Linear or Conv"))
    return _names(model, cfg, types, what)


def _names(model: nn.Module, cfg: QuantizeConfig, types: tuple[type, ...], what: str) -> list[str]:
    return [n for n, _ in select_modules(model, include=cfg.include, exclude=cfg.exclude, types=types, what=what)]


def quantize_dynamic(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> tuple[nn.Module, list, list]:
    names = _names(model, cfg, DYNAMIC_TYPES, "Linear, LSTM or GRU")
    return backend.dynamic(model, set(names)), [{"kind": "quantize_dynamic", "modules": names}], []


def _static_skip(model: nn.Module, cfg: QuantizeConfig) -> tuple[list[str], set[str]]:
    names = _names(model, cfg, WEIGHTED, "Linear or Conv")
    skip = {n for n, m in model.named_modules() if isinstance(m, WEIGHTED) and n not in names}
    return names, skip


def _prepare(model: nn.Module, cfg: QuantizeConfig, ctx: Context, qat: bool):
    if ctx.example_input is None:
        raise UsageError("static quantization traces the model and needs an example input",
                         hint="pass --input-shape or calibration data")
    names, skip = _static_skip(model, cfg)
    try:
        prepared = backend.prepare_static(model, ctx.example_input, skip, qat=qat)
    except Exception as exc:  # torch.fx cannot trace data-dependent control flow and the like
        raise InputError(f"static quantization cannot trace this model's forward: {str(exc).splitlines()[0][:300]}",
                         hint="use --method dynamic or weight-only, which need no tracing") from None
    return names, skip, prepared


def _convert(prepared: nn.Module, example: torch.Tensor) -> nn.Module:
    try:
        quantized = backend.convert_static(prepared)
        with torch.no_grad():
            quantized(example)
    except Exception as exc:
        raise InputError(f"the int8 model cannot run this model's forward: {str(exc).splitlines()[0][:300]}",
                         hint="exclude the offending layers with --exclude, or use --method dynamic") from None
    return quantized


def quantize_static(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> tuple[nn.Module, list, list]:
    names, skip, prepared = _prepare(model, cfg, ctx, qat=False)
    batches = min(cfg.calib_batches, math.ceil(len(ctx.calib_data) / cfg.calib_batch_size))
    with ctx.progress("calibrate", batches) as bar, torch.no_grad():
        for i, (x, _, _) in enumerate(ctx.calib_data.batches(cfg.calib_batch_size)):
            if i >= batches:
                break
            prepared(x)
            bar.advance()
    return _convert(prepared, ctx.example_input), [{"kind": "quantize_static", "modules": names,
                                                   "skip": sorted(skip), "qat": False, "engine": backend.ENGINE}], []


def quantize_qat(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> tuple[nn.Module, list, list]:
    from modelzip_cli.train import TrainConfig, train

    names, skip, prepared = _prepare(model, cfg, ctx, qat=True)
    with backend.quiet():
        history = train(prepared, ctx.data, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size),
                        ctx=ctx, description="qat")
    edit = {"kind": "quantize_static", "modules": names, "skip": sorted(skip), "qat": True, "engine": backend.ENGINE}
    return _convert(prepared, ctx.example_input), [edit], history


def quantize_weight_only(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> tuple[nn.Module, list, list]:
    names = _names(model, cfg, (nn.Linear,), "Linear")
    for name in names:
        _replace(model, name, WeightOnlyLinear.from_float(model.get_submodule(name), cfg.bits, cfg.group_size))
    return model, [{"kind": "quantize_weight_only", "modules": names, "bits": cfg.bits,
                    "group_size": cfg.group_size}], []


# method → (model, config, ctx) → (quantized model, edits for the manifest, training history)
QUANTIZERS: dict[str, Callable[[nn.Module, QuantizeConfig, Context], tuple[nn.Module, list[dict], list[dict]]]] = {
    "dynamic": quantize_dynamic,
    "static": quantize_static,
    "qat": quantize_qat,
    "weight-only": quantize_weight_only,
}

NOTES = {
    "dynamic": "int8 weights; activations are quantized per batch at run time (Linear layers run int8 kernels)",
    "static": "int8 weights and activations with calibrated scales; ops without int8 kernels run in float "
              "between dequantize/quantize pairs",
    "qat": "fake-quantization fine-tuning, then the same int8 conversion as static",
    "weight-only": "smaller file and memory; compute stays float (weights are dequantized at each call), so "
                   "expect no speed-up",
}


def apply(model: nn.Module, cfg: QuantizeConfig, ctx: Context, manifest: Manifest) -> tuple[nn.Module, Step, Manifest]:
    cfg.validate()
    for need in sorted(cfg.required_data()):
        if getattr(ctx, need) is None:
            flag = "--calib-data" if need == "calib_data" else "--data"
            raise UsageError(f"--method {cfg.method} needs {flag}", hint=f"pass {flag} FILE")
    reference = copy.deepcopy(model).eval()
    quantized, edits, history = QUANTIZERS[cfg.method](model, cfg, ctx)
    quantized.eval()
    step = Step(op="quantize", config=cfg.to_dict(), notes=[NOTES[cfg.method]], layers=layer_table(quantized))
    selected = set(edits[0]["modules"])
    still_float = [r["name"] for r in step.layers if r["scheme"].startswith("float")
                   and (r["name"] in selected or r["name"].rsplit(".", 1)[0] in selected)]
    if still_float:  # e.g. torch.ao keeps a conv whose input is not quantized as a float "reference" module
        step.notes.append(f"left in float by the backend (no int8 kernel on this path): {', '.join(still_float)}")
    source = ctx.calib_data or ctx.data
    if source is not None:
        x = source.inputs[:1024]
        step.notes.append(f"SQNR measured on {min(1024, len(source))} samples of {source.path.name}")
    else:
        x = torch.cat([ctx.example_input] * 64) + 0.1 * torch.randn(64, *ctx.example_input.shape[1:],
                                                                   generator=ctx.generator())
        step.notes.append("SQNR measured on random inputs (no data given): pass --calib-data for a real figure")
    with backend.quiet():
        step.after["sqnr_db"] = round(sqnr_db(predict(reference, x), predict(quantized, x)), 3)
    if history:
        step.after["qat_history"] = history
    return quantized, step, manifest.with_edits(edits)
