"""Quantization: dynamic, static (calibrated), QAT and weight-only int8/int4.

dynamic, static and qat put modelzip's plain-int8 modules in place (int8.py: int8 weights and float scales
as ordinary tensors, no torch.ao needed to write, read or run them). `--backend` chooses what runs them:
plain (int8.py's own kernels), torch-ao (torch.ao's fbgemm kernels built from the same integers, where
torch.ao can be imported; see quant_backend.py) or auto (torch.ao's kernels for the layers and batch sizes
where they measured faster, plain elsewhere, never needing torch.ao). The file is the same whichever runs
it. weight-only is modelzip's own too: integer weights with per-channel or per-group scales and zero
points, int4 packed two per byte, run on the kernel measured fastest on the running machine for each
layer shape and call size (wo_kernels.py: torch's packed int4/int8 CPU kernels, a bf16 or a float copy of
the weight). Every method records an edit that
loading replays on a fresh float model before the integer tensors are loaded.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from modelzip_cli import int8
from modelzip_cli.context import Context
from modelzip_cli.edits import (
    WeightOnlyEmbedding,
    WeightOnlyLinear,
    check_embedding,
    conv_batchnorm_pairs,
    fold_batchnorm,
    replace_module,
)
from modelzip_cli.errors import first_line
from modelzip_cli.format import Manifest
from modelzip_cli.measure import predict, sqnr_db
from modelzip_cli.techniques.base import MethodConfig, Op, Result, Selection
from modelzip_cli.techniques.select import WEIGHTED, select_modules, unsupported_layers
from modelzip_cli.techniques.sensitivity import Scorer, keep_float, layer_losses

Backend = Literal["auto", "plain", "torch-ao"]


class _QuantizeConfig(MethodConfig, Selection):
    op: ClassVar[str] = "quantize"


class DynamicConfig(_QuantizeConfig):
    """int8 weights; activations quantized at run time (per token or per tensor) where an int8 GEMM runs."""

    method: ClassVar[str] = "dynamic"
    backend: Backend = "auto"
    activations: Literal["per-token", "per-tensor"] = "per-token"
    # auto: with --calib-data, each Linear takes the activation-outlier migration strength (SmoothQuant's
    # alpha, 0 = none) whose output error measured least on the calibration inputs; off: none
    smoothing: Literal["auto", "off"] = "auto"
    calib_batches: int = Field(8, ge=1)  # calibration batches seen for activation ranges (smoothing)
    calib_batch_size: int = Field(32, ge=1)


class StaticConfig(_QuantizeConfig):
    """int8 weights and activations, activation ranges calibrated on data."""

    method: ClassVar[str] = "static"
    backend: Backend = "auto"
    observer: Literal["minmax", "percentile"] = "minmax"  # minmax measured better on the digits model
    calib_batches: int = Field(100, ge=1)  # batches of calibration data run through the observers
    calib_batch_size: int = Field(32, ge=1)

    def required_data(self) -> set[str]:
        return {"calib_data"}


class QATConfig(_QuantizeConfig):
    """Fake-quantization fine-tuning, then the same int8 conversion as static."""

    method: ClassVar[str] = "qat"
    backend: Backend = "auto"
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0)  # small: the float weights are already trained
    batch_size: int = Field(64, ge=1)
    # The last epochs run with observer ranges and BatchNorm statistics frozen, so the weights settle on
    # the scales they will be converted with. Default: the last third, at least one epoch when epochs ≥ 2.
    freeze_epochs: int | None = Field(None, ge=0)

    def required_data(self) -> set[str]:
        return {"data"}

    def needs_targets(self) -> bool:
        return False  # unlabelled data: the float model is the teacher (recover.py)

    def frozen_epochs(self) -> int:
        if self.freeze_epochs is not None:
            return min(self.freeze_epochs, self.epochs)
        return max(1, self.epochs // 3) if self.epochs >= 2 else 0


class WeightOnlyConfig(_QuantizeConfig):
    """int8 or int4 (packed two per byte) weights with per-group scales; float compute."""

    method: ClassVar[str] = "weight-only"
    bits: Literal[8, 4] = 8
    group_size: int = Field(128, ge=0)  # input channels sharing one scale; 0 = one scale per output channel
    embeddings: bool = False  # also the Embedding tables (a token's row is dequantized when it is looked up)


QuantizeConfig = DynamicConfig | StaticConfig | QATConfig | WeightOnlyConfig


# ---------------------------------------------------------------------------------------------------
# Methods: (model, cfg, ctx) → (quantized model, edits, training history)


def plan(model: nn.Module, cfg: QuantizeConfig, example: torch.Tensor | None) -> list[str]:
    """Names of the modules this config would quantize (for `chain --dry-run`)."""
    if isinstance(cfg, WeightOnlyConfig):
        return _weight_only_names(model, cfg)[0]
    return _names(model, cfg, *_types(cfg))


def _names(model: nn.Module, cfg: QuantizeConfig, types: tuple[type, ...], what: str) -> list[str]:
    return [n for n, _ in select_modules(model, include=cfg.include, exclude=cfg.exclude, types=types, what=what)]


SMOOTH_ALPHAS = (0.0, 0.5, 0.65, 0.8, 0.9)  # migration strengths tried per layer; 0 = no smoothing
SMOOTH_ROWS = 2048  # input rows per layer kept to measure each strength's output error


def smooth_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scales s (K,): s_k = max|X_k|^α / max|W_:,k|^(1−α). The layer then
    computes (X·diag(1/s)) @ (W·diag(s))ᵀ, the same product, with activation outliers moved into the weight."""
    w = weight.detach().float().abs().amax(0).clamp_min(1e-5)  # (K,)
    return (act_absmax.float().clamp_min(1e-5) ** alpha / w ** (1 - alpha)).clamp(1e-4, 1e4)


def _calibration_inputs(model: nn.Module, names: list[str], ctx: Context, cfg: DynamicConfig
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer: the absolute maximum of each input channel over the calibration batches (K,), and up to
    SMOOTH_ROWS of its input rows (M, K), taken evenly from every batch."""
    absmax: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    batches = min(cfg.calib_batches, math.ceil(len(ctx.calib_data) / cfg.calib_batch_size))
    per_batch = max(1, SMOOTH_ROWS // batches)

    def seen(layer, args, name):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (..., K) → (M, K)
        m = x.abs().amax(0)
        absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        rows[name].append(x[torch.randperm(x.shape[0], generator=ctx.generator())[:per_batch]])

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda layer, args, n=n: seen(layer, args, n))
             for n in names]
    try:
        with ctx.progress("calibrate", batches) as bar, torch.no_grad():
            for i, (x, _, _) in enumerate(ctx.calib_data.batches(cfg.calib_batch_size)):
                if i >= batches:
                    break
                model(x)
                bar.advance()
    finally:
        for h in hooks:
            h.remove()
    return absmax, {n: torch.cat(r) for n, r in rows.items() if r}


def _best_smoothing(linear: nn.Linear, absmax: torch.Tensor, x: torch.Tensor, act: str
                    ) -> tuple[float, torch.Tensor | None, float]:
    """(alpha, scales or None, relative output error) of the strength whose int8 layer, run by the current
    backend, measured least error against the float layer on the inputs `x` (M, K)."""
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, linear.weight.float(), None)  # bias cancels in the error
        best = (0.0, None, math.inf)
        for alpha in SMOOTH_ALPHAS:
            s = smooth_scales(absmax, linear.weight, alpha) if alpha else None
            q = int8.DynamicInt8Linear.from_float(linear, act, s)
            y = q(x) - (0 if q.bias is None else q.bias.float())
            err = float((y - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
            if err < best[2]:
                best = (alpha, s, err)
    return best


def quantize_dynamic(model: nn.Module, cfg: DynamicConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    names = _names(model, cfg, *_types(cfg))
    smooth: dict[str, torch.Tensor] = {}
    alphas: dict[str, dict] = {}
    if cfg.smoothing == "auto" and ctx.calib_data is not None:
        absmax, inputs = _calibration_inputs(model, [n for n in names if n], ctx, cfg)
        for name in names:
            if name not in inputs:
                continue  # no calibration batch reached it
            alpha, s, err = _best_smoothing(model.get_submodule(name), absmax[name], inputs[name], cfg.activations)
            alphas[name] = {"smoothing_alpha": alpha, "output_error": round(err, 6)}
            if s is not None:
                smooth[name] = s
    for name in names:
        replace_module(model, name, int8.DynamicInt8Linear.from_float(model.get_submodule(name), cfg.activations,
                                                                      smooth.get(name)))
    edit = {"kind": "quantize_dynamic", "modules": names, "activations": cfg.activations}
    if smooth:  # (absent otherwise: a file without smoothing stays readable by a modelzip without it)
        edit["smoothed"] = [n for n in names if n in smooth]
    return model, [edit], {"layer_extra": alphas}


def _converted(prepared: nn.Module, names: list[str], qat: bool, observer: str, reduced: bool
               ) -> tuple[nn.Module, list]:
    quantized, unseen = int8.convert(prepared)
    edit = {"kind": "quantize_static", "modules": [n for n in names if n not in unseen], "qat": qat,
            "observer": observer, "reduced_range": reduced}
    return quantized, [edit]


def _reduced(cfg: StaticConfig | QATConfig) -> bool:
    """7-bit activation ranges unless only the plain kernels will ever run the file (int8.affine_qparams)."""
    return cfg.backend != "plain"


def quantize_static(model: nn.Module, cfg: StaticConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    names = _names(model, cfg, *_types(cfg))
    folds = []
    if ctx.example_input is not None and (pairs := conv_batchnorm_pairs(model, ctx.example_input, set(names))):
        fold_batchnorm(model, pairs)
        folds = [{"kind": "fold_batchnorm", "pairs": pairs}]
    prepared = int8.prepare_static(model, names, cfg.observer, _reduced(cfg))
    batches = min(cfg.calib_batches, math.ceil(len(ctx.calib_data) / cfg.calib_batch_size))
    with ctx.progress("calibrate", batches) as bar, torch.no_grad():
        for i, (x, _, _) in enumerate(ctx.calib_data.batches(cfg.calib_batch_size)):
            if i >= batches:
                break
            prepared(x)
            bar.advance()
    quantized, edits = _converted(prepared, names, False, cfg.observer, _reduced(cfg))
    return quantized, folds + edits, {}


def quantize_qat(model: nn.Module, cfg: QATConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    from modelzip_cli.techniques.recover import Teacher
    from modelzip_cli.train import TrainConfig, train

    names = _names(model, cfg, *_types(cfg))
    teacher = None
    if ctx.data.targets is None:  # no labels: match the float model's outputs instead
        teacher = Teacher.of(model, ctx.data, ctx, loss="auto", temperature=2.0, hidden_weight=0.0)
    prepared = int8.prepare_qat(model, names, _reduced(cfg))
    freeze_from = cfg.epochs - cfg.frozen_epochs()

    def on_epoch(epoch: int) -> None:  # epoch is 0-based; runs after the loop puts the model in train mode
        if epoch >= freeze_from:
            int8.freeze_observers(prepared)

    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size)
    with teacher.training(prepared, ctx.device) if teacher else contextlib.nullcontext(None) as loss_fn:
        extra = {"loss_fn": loss_fn} if loss_fn else {}
        history = train(prepared, ctx.data, tcfg, ctx=ctx, description="qat", on_epoch=on_epoch, **extra)
    for row in history:
        row["observers_frozen"] = row["epoch"] > freeze_from
    return (*_converted(prepared.eval(), names, True, "minmax (moving average)", _reduced(cfg)),
            {"after": {"qat_history": history}})


def _weight_only_names(model: nn.Module, cfg: WeightOnlyConfig) -> tuple[list[str], list[str]]:
    """The Linears to quantize, and the zero-width ones left alone (no weight to quantize)."""
    names = _names(model, cfg, *_types(cfg))
    empty = [n for n in names if 0 in model.get_submodule(n).weight.shape]
    return [n for n in names if n not in empty], empty


def quantize_weight_only(model: nn.Module, cfg: WeightOnlyConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    names, _ = _weight_only_names(model, cfg)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Embedding):
            check_embedding(layer)
            replace_module(model, name, WeightOnlyEmbedding.from_embedding(layer, cfg.bits, cfg.group_size))
        else:
            replace_module(model, name, WeightOnlyLinear.from_float(layer, cfg.bits, cfg.group_size))
    return model, [{"kind": "quantize_weight_only", "modules": names, "bits": cfg.bits,
                    "group_size": cfg.group_size}], {}


# method → (model, config, ctx) → (quantized model, edits for the manifest, extra figures: "after" (QAT's
# training history), "layer_extra" (name → fields of its layer row))
QUANTIZERS: dict[type, Callable[..., tuple[nn.Module, list[dict], dict]]] = {
    DynamicConfig: quantize_dynamic,
    StaticConfig: quantize_static,
    QATConfig: quantize_qat,
    WeightOnlyConfig: quantize_weight_only,
}

NOTES = {
    "dynamic": "int8 weights (per channel); activations quantized at run time where an int8 GEMM runs them "
               "(torch.ao's fbgemm, or _int_mm on AVX512-VNNI), float elsewhere",
    "static": "int8 weights and int8 activations with calibrated per-tensor scales; each layer takes and gives "
              "float, rounding its input to the calibrated grid",
    "qat": "fake-quantization fine-tuning, then the same int8 layers as static",
    "weight-only": "smaller file; each layer runs on the kernel measured fastest on this machine for its shape "
                   "and call size (see the weight-only kernels note and each layer's `kernel`)",
}

WO_ROWS = (1, 16, 128)  # call sizes (rows) the weight-only kernel choice is reported at: decoding, few, a batch
WO_KERNEL_NOTE = ("int4pack / int8pack: torch's packed int4 / int8 CPU kernels, bf16 activations; bf16: a bf16 "
                  "dequantized copy of the weight kept in memory; float: a dequantized copy in the input's dtype "
                  "(the float layer's own speed)")


def _weight_only_kernel_note(model: nn.Module, layer_extra: dict[str, dict]) -> str:
    """Which kernel runs each weight-only Linear at each call size, measured here; also into its layer row."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    counts: dict[int, dict[str, int]] = {r: {} for r in WO_ROWS}
    unusable: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, WeightOnlyLinear) or isinstance(m, WeightOnlyEmbedding):
            continue
        chosen = {r: m.kernel_for(r, dtype) for r in WO_ROWS}
        layer_extra.setdefault(name, {})["kernel"] = {f"{r}_rows": k for r, k in chosen.items()}
        for r, k in chosen.items():
            counts[r][k] = counts[r].get(k, 0) + 1
        for kernel, why in m.kernel_notes().items():
            unusable.setdefault(f"{kernel} ({why})", []).append(name)
    parts = [f"{r} row{'s' * (r > 1)}: " + ", ".join(f"{k} ×{n}" for k, n in sorted(c.items()))
             for r, c in counts.items()]
    note = f"weight-only kernels measured on this machine, per call size ({WO_KERNEL_NOTE}): " + "; ".join(parts)
    for what, names in unusable.items():
        note += f"; forced kernel {what} not used for {', '.join(names)}: float instead"
    return note


def _backend_note(model: nn.Module, backend: str, rows: tuple[int, ...]) -> str:
    """Which kernel runs which int8 layer, at each batch size the report measures."""
    parts = []
    for n in rows:
        by_kernel: dict[str, list[str]] = {}
        for name, kernel in int8.kernels_for(model, n).items():
            by_kernel.setdefault(kernel, []).append(name)
        parts.append(f"batch {n}: " + "; ".join(f"{k} for {', '.join(v)}" for k, v in sorted(by_kernel.items())))
    return f"backend {backend} (" + int8.KERNEL_NAMES_NOTE + "): " + " | ".join(parts)


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
    backend = getattr(cfg, "backend", "plain")  # weight-only has one backend: its own
    with int8.use_backend(backend):
        reference = copy.deepcopy(model).eval()
        quantized, edits, extra = QUANTIZERS[type(cfg)](model, cfg, ctx)
        quantized.eval()
        notes = [NOTES[cfg.method], *filter(None, [unsupported_layers(reference)])]
        if folded := [p for e in edits if e["kind"] == "fold_batchnorm" for p in e["pairs"]]:
            notes.append(f"{len(folded)} BatchNorm layers folded into the convolutions before them")
        after: dict = dict(extra.get("after", {}))
        layer_extra: dict[str, dict] = extra.get("layer_extra", {})
        if isinstance(cfg, WeightOnlyConfig) and (empty := _weight_only_names(reference, cfg)[1]):
            notes.append(f"zero-width layers left as they are (no weight to quantize): {', '.join(empty)}")
        selected = set(edits[-1]["modules"])
        still_float = [n for n in _names(reference, cfg, *_types(cfg)) if n not in selected]
        if still_float:
            notes.append(f"left in float (no calibration or training batch reached them): {', '.join(still_float)}")
        recurrent = [n for n, m in reference.named_modules() if isinstance(m, nn.RNNBase)]
        if recurrent and isinstance(cfg, DynamicConfig):
            notes.append(f"left in float (the plain int8 runtime has no recurrent kernel): {', '.join(recurrent)}")
        if ctx.min_fidelity is not None:
            kept = _keep_float_for_fidelity(quantized, reference, edits[-1], ctx, layer_extra)
            after["kept_float"] = kept
            notes.append(_kept_note(kept, ctx))
        x, note = _probe_inputs(ctx)
        if x is not None:
            try:  # a measurement: it never fails the step
                after["sqnr_db"] = round(sqnr_db(predict(reference, x), predict(quantized, x)), 3)
            except Exception as exc:
                note = f"SQNR not measured: the probe could not run ({first_line(exc, 200)})"
        notes.append(note)
        if int8.modules_of(quantized):
            notes.append(_backend_note(quantized, backend, (1, 256)))
        if isinstance(cfg, WeightOnlyConfig):
            notes.append(_weight_only_kernel_note(quantized, layer_extra))
    return Result(quantized, edits, notes=notes, after=after, layer_extra=layer_extra)


SENSITIVITY_SAMPLES = 64  # samples each one-layer sensitivity is measured on (the ranking needs few)
GATE_MARGIN = 0.2


def _keep_float_for_fidelity(quantized: nn.Module, reference: nn.Module, edit: dict, ctx: Context,
                             layer_extra: dict[str, dict]) -> dict:
    """--min-fidelity: rank the quantized layers by what each alone costs (1 − cosine on a few samples),
    then put back in float the fewest, most costly first, that bring the whole model to the gate on the
    selection data (--calib-data when given, else --eval-data). Updates `edit` and `layer_extra`."""
    data = ctx.calib_data or ctx.eval_data
    names = list(edit["modules"])
    ranking = Scorer(reference, data.inputs[:SENSITIVITY_SAMPLES])
    with ctx.progress("sensitivity", len(names)) as bar:
        losses = layer_losses(reference, {n: quantized.get_submodule(n) for n in names}, ranking, bar)
    full = Scorer(reference, data.inputs)
    before = full.cosine(quantized)
    # On calibration data, aim inside the gate by a fifth of its allowed loss: held-out data differs a little
    target = ctx.min_fidelity if data is ctx.eval_data else 1 - (1 - ctx.min_fidelity) * (1 - GATE_MARGIN)
    floated, reached = keep_float(quantized, reference, names, losses, full, target)
    edit["modules"] = [n for n in names if n not in floated]
    if "smoothed" in edit:
        edit["smoothed"] = [n for n in edit["smoothed"] if n not in floated]
        if not edit["smoothed"]:
            del edit["smoothed"]
    for n in names:
        layer_extra.setdefault(n, {})["fidelity_loss_alone"] = round(losses[n], 6)
    return {"min_fidelity": ctx.min_fidelity, "target": round(target, 6),
            "measured_on": f"{len(data)} samples of {data.path.name}",
            "cosine_all_quantized": round(before, 6), "cosine_reached": round(reached, 6),
            "layers": [{"name": n, "fidelity_loss_alone": round(losses[n], 6)} for n in floated]}


def _kept_note(kept: dict, ctx: Context) -> str:
    layers = kept["layers"]
    head = (f"--min-fidelity {ctx.min_fidelity} (aimed at {kept['target']:.4f}): all layers quantized reach "
            f"cosine {kept['cosine_all_quantized']:.4f} on {kept['measured_on']}")
    if not layers:
        return head + "; no layer left in float"
    return head + ("; left in float, costliest alone first (1 − cosine of that layer alone): "
                   + ", ".join(f"{r['name']} ({r['fidelity_loss_alone']:.2e})" for r in layers)
                   + f"; cosine reached {kept['cosine_reached']:.4f}")


def _types(cfg: QuantizeConfig) -> tuple[tuple[type, ...], str]:
    if isinstance(cfg, WeightOnlyConfig) and cfg.embeddings:
        return (nn.Linear, nn.Embedding), "Linear or Embedding"
    if isinstance(cfg, DynamicConfig | WeightOnlyConfig):
        return (nn.Linear,), "Linear"
    return WEIGHTED, "Linear or Conv"


OP = Op("quantize", "quantized", {c.method: c for c in QUANTIZERS}, apply, plan=plan)
