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
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from modelzip_cli import quant_backend as backend
from modelzip_cli.context import Context
from modelzip_cli.edits import WeightOnlyLinear, replace_module
from modelzip_cli.errors import InputError, UsageError
from modelzip_cli.format import Manifest
from modelzip_cli.measure import layer_table, predict, sqnr_db
from modelzip_cli.techniques.base import MethodConfig, Op, Result, Selection
from modelzip_cli.techniques.select import WEIGHTED, select_modules

DYNAMIC_TYPES = (nn.Linear, nn.LSTM, nn.GRU)


class _QuantizeConfig(MethodConfig, Selection):
    op: ClassVar[str] = "quantize"


class DynamicConfig(_QuantizeConfig):
    """int8 weights; activations quantized per batch at run time."""

    method: ClassVar[str] = "dynamic"


class StaticConfig(_QuantizeConfig):
    """int8 weights and activations, activation ranges calibrated on data."""

    method: ClassVar[str] = "static"
    calib_batches: int = Field(100, ge=1)  # batches of calibration data run through the observers
    calib_batch_size: int = Field(32, ge=1)

    def required_data(self) -> set[str]:
        return {"calib_data"}


class QATConfig(_QuantizeConfig):
    """Fake-quantization fine-tuning, then the same int8 conversion as static."""

    method: ClassVar[str] = "qat"
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0)  # small: the float weights are already trained
    batch_size: int = Field(64, ge=1)
    # The last epochs run with observer ranges and BatchNorm statistics frozen, so the weights settle on
    # the scales they will be converted with. Default: the last third, at least one epoch when epochs ≥ 2.
    freeze_epochs: int | None = Field(None, ge=0)

    def required_data(self) -> set[str]:
        return {"data"}

    def frozen_epochs(self) -> int:
        if self.freeze_epochs is not None:
            return min(self.freeze_epochs, self.epochs)
        return max(1, self.epochs // 3) if self.epochs >= 2 else 0


class WeightOnlyConfig(_QuantizeConfig):
    """int8 or int4 (packed two per byte) weights with per-group scales; float compute."""

    method: ClassVar[str] = "weight-only"
    bits: Literal[8, 4] = 8
    group_size: int = Field(128, ge=0)  # input channels sharing one scale; 0 = one scale per output channel


QuantizeConfig = DynamicConfig | StaticConfig | QATConfig | WeightOnlyConfig


# ---------------------------------------------------------------------------------------------------
# Methods: (model, cfg, ctx) → (quantized model, edits, training history)


def plan(model: nn.Module, cfg: QuantizeConfig, example: torch.Tensor | None) -> list[str]:
    """Names of the modules this config would quantize (for `chain --dry-run`)."""
    types, what = {DynamicConfig: (DYNAMIC_TYPES, "Linear, LSTM or GRU"),
                   WeightOnlyConfig: ((nn.Linear,), "Linear")}.get(type(cfg), (WEIGHTED, "Linear or Conv"))
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


def quantize_qat(model: nn.Module, cfg: QATConfig, ctx: Context) -> tuple[nn.Module, list, list]:
    from modelzip_cli.train import TrainConfig, train

    names, skip, prepared = _prepare(model, cfg, ctx, qat=True)
    freeze_from = cfg.epochs - cfg.frozen_epochs()

    def on_epoch(epoch: int) -> None:  # epoch is 0-based; runs after the loop puts the model in train mode
        if epoch >= freeze_from:
            backend.freeze_observers(prepared)

    with backend.quiet():
        history = train(prepared, ctx.data, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size),
                        ctx=ctx, description="qat", on_epoch=on_epoch)
    for row in history:
        row["observers_frozen"] = row["epoch"] > freeze_from
    edit = {"kind": "quantize_static", "modules": names, "skip": sorted(skip), "qat": True, "engine": backend.ENGINE}
    return _convert(prepared, ctx.example_input), [edit], history


def quantize_weight_only(model: nn.Module, cfg: WeightOnlyConfig, ctx: Context) -> tuple[nn.Module, list, list]:
    names = _names(model, cfg, (nn.Linear,), "Linear")
    for name in names:
        replace_module(model, name, WeightOnlyLinear.from_float(model.get_submodule(name), cfg.bits, cfg.group_size))
    return model, [{"kind": "quantize_weight_only", "modules": names, "bits": cfg.bits,
                    "group_size": cfg.group_size}], []


# method → (model, config, ctx) → (quantized model, edits for the manifest, training history)
QUANTIZERS: dict[type, Callable[..., tuple[nn.Module, list[dict], list[dict]]]] = {
    DynamicConfig: quantize_dynamic,
    StaticConfig: quantize_static,
    QATConfig: quantize_qat,
    WeightOnlyConfig: quantize_weight_only,
}

NOTES = {
    "dynamic": "int8 weights; activations are quantized per batch at run time (Linear layers run int8 kernels)",
    "static": "int8 weights and activations with calibrated scales; ops without int8 kernels run in float "
              "between dequantize/quantize pairs",
    "qat": "fake-quantization fine-tuning, then the same int8 conversion as static",
    "weight-only": "smaller file and memory; compute stays float (weights are dequantized at each call), so "
                   "expect no speed-up",
}


def _probe_inputs(ctx: Context) -> tuple[torch.Tensor | None, str]:
    """Inputs for the SQNR probe and a note on where they came from. Integer inputs (token ids) are never
    perturbed as floats; with no data and no example input there is no probe."""
    source = ctx.calib_data or ctx.data
    if source is not None:
        return source.inputs[:1024], f"SQNR measured on {min(1024, len(source))} samples of {source.path.name}"
    x = ctx.example_input
    if x is None:
        return None, "SQNR not measured: no data and no example input (pass --calib-data or --input-shape)"
    if not x.is_floating_point():
        return x.repeat(8, *[1] * (x.ndim - 1)), "SQNR measured on the example input only: pass --calib-data"
    noise = 0.1 * torch.randn(64, *x.shape[1:], generator=ctx.generator(), dtype=x.dtype)
    return torch.cat([x] * 64) + noise, "SQNR measured on random inputs (no data given): pass --calib-data"


def apply(model: nn.Module, cfg: QuantizeConfig, ctx: Context, manifest: Manifest) -> Result:
    reference = copy.deepcopy(model).eval()
    quantized, edits, history = QUANTIZERS[type(cfg)](model, cfg, ctx)
    quantized.eval()
    notes = [NOTES[cfg.method]]
    selected = set(edits[0]["modules"])
    still_float = [r["name"] for r in layer_table(quantized, with_bytes=False) if r["scheme"].startswith("float")
                   and (r["name"] in selected or r["name"].rsplit(".", 1)[0] in selected)]
    if still_float:  # e.g. torch.ao keeps a conv whose input is not quantized as a float "reference" module
        notes.append(f"left in float by the backend (no int8 kernel on this path): {', '.join(still_float)}")
    after: dict = {}
    x, note = _probe_inputs(ctx)
    notes.append(note)
    if x is not None:
        with backend.quiet():
            after["sqnr_db"] = round(sqnr_db(predict(reference, x), predict(quantized, x)), 3)
    if history:
        after["qat_history"] = history
    return Result(quantized, edits, notes=notes, after=after)


OP = Op("quantize", "quantized", {c.method: c for c in QUANTIZERS}, apply, plan=plan)
