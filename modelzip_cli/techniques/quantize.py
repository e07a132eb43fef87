"""Quantization: dynamic, static (calibrated), QAT and weight-only int8/int4.

dynamic, static and qat put modelzip's plain-int8 modules in place (int8.py: int8 weights and float scales
as ordinary tensors, no torch.ao needed to write, read or run them). `--backend` chooses what runs them:
plain (int8.py's own kernels), torch-ao (torch.ao's fbgemm kernels built from the same integers, where
torch.ao can be imported; see kernels/torch_ao.py) or auto (torch.ao's kernels for the layers and batch sizes
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
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from modelzip_cli.checkpoint.edits import DynamicEdit, Edit, FoldEdit, StaticEdit, WeightOnlyEdit
from modelzip_cli.checkpoint.format import Manifest
from modelzip_cli.errors import first_line
from modelzip_cli.measure.metrics import (
    DEFAULT_BATCH_N,
    DEFAULT_BATCH_N_TOKENS,
    batch_of,
    default_batch_n,
    default_threads,
    interleaved_latency,
    latency_change,
)
from modelzip_cli.nn import int8
from modelzip_cli.nn.surgery import conv_batchnorm_pairs, fold_batchnorm, replace_module
from modelzip_cli.nn.weight_only import Quantized, WeightOnlyEmbedding, WeightOnlyLinear, check_embedding, rtn
from modelzip_cli.pipeline import sequential
from modelzip_cli.pipeline.context import Context
from modelzip_cli.pipeline.run import predict
from modelzip_cli.pipeline.sequential import Hessian
from modelzip_cli.techniques import awq, smoothing
from modelzip_cli.techniques.base import MethodConfig, Op, Result, Selection, handler, register
from modelzip_cli.techniques.gptq import gptq_rows
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
    # With --calib-data, activation outliers moved into the weights (SmoothQuant, techniques/smoothing.py) at
    # the strength whose int8 outputs measured closest on the calibration inputs (0 = none): auto folds the
    # scales into the norm or Linear that writes a layer's input where one can carry them, else keeps a
    # smoothing tensor in the layer; fold: folded only; layer: a tensor in every layer, nothing folded; off: none
    smoothing: Literal["auto", "fold", "layer", "off"] = "auto"
    calib_batches: int = Field(8, ge=1)  # calibration batches seen for activation ranges (smoothing)
    calib_batch_size: int = Field(32, ge=1)


class StaticConfig(_QuantizeConfig):
    """int8 weights and activations, activation ranges calibrated on data."""

    method: ClassVar[str] = "static"
    backend: Backend = "auto"
    observer: Literal["minmax", "percentile", "mse"] = "minmax"  # minmax measured better on the digits model
    # auto (= fold): with the calibration data, activation outliers moved into the weights where the norm or
    # Linear writing a layer's input can carry the scales (techniques/smoothing.py); off: none
    smoothing: Literal["auto", "fold", "off"] = "auto"
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


class GPTQConfig(_QuantizeConfig):
    """int4 or int8 weights chosen on calibration data so that each layer's output moves least (GPTQ),
    block by block; written in the weight-only format, so whatever reads weight-only reads it."""

    method: ClassVar[str] = "gptq"
    bits: Literal[8, 4] = 4
    group_size: int = Field(128, ge=0)  # input channels sharing one scale; 0 = one scale per output channel
    # True: columns in decreasing Hessian diagonal, group scales fixed first (llm-compressor's default); False:
    # stored order, each group's scale chosen when it is reached; None: per layer, whichever order leaves the
    # lower GPTQ loss (GPTQ run twice, so only when asked). On the sample decoder act-order won at group 128
    # (+0.27 % perplexity against +0.49 %) and lost at group 32 (+0.25 % against +0.12 %).
    act_order: bool | None = True
    damp: float = Field(0.01, gt=0, le=1)  # added to the Hessian's diagonal, as a share of its mean
    calib_batches: int = Field(16, ge=1)  # calibration batches the Hessians are accumulated over
    calib_batch_size: int = Field(8, ge=1)

    def required_data(self) -> set[str]:
        return {"calib_data"}


class AWQConfig(_QuantizeConfig):
    """int4 or int8 weights rounded to nearest after activation-aware scales (AWQ) folded into the norms or
    Linears that feed them, chosen block by block on calibration data; written in the weight-only format."""

    method: ClassVar[str] = "awq"
    bits: Literal[8, 4] = 4
    group_size: int = Field(128, ge=0)
    calib_batches: int = Field(16, ge=1)
    calib_batch_size: int = Field(8, ge=1)

    def required_data(self) -> set[str]:
        return {"calib_data"}


QuantizeConfig = DynamicConfig | StaticConfig | QATConfig | WeightOnlyConfig | GPTQConfig | AWQConfig


# ---------------------------------------------------------------------------------------------------
# Methods: (model, cfg, ctx) → (quantized model, edits, training history)


def plan(model: nn.Module, cfg: QuantizeConfig, example: torch.Tensor | None) -> list[str]:
    """Names of the modules this config would quantize (for `chain --dry-run`)."""
    if isinstance(cfg, WeightOnlyConfig | GPTQConfig | AWQConfig):
        return _integer_weight_names(model, cfg)[0]
    return _names(model, cfg, *_types(cfg))


def _names(model: nn.Module, cfg: QuantizeConfig, types: tuple[type, ...], what: str) -> list[str]:
    return [n for n, _ in select_modules(model, include=cfg.include, exclude=cfg.exclude, types=types, what=what)]


SMOOTH_ALPHAS = (0.0, 0.5, 0.65, 0.8, 0.9)  # migration strengths tried per layer; 0 = no smoothing
SMOOTH_ROWS = 2048  # input rows per layer kept to measure each strength's output error
PROBE_WINDOWS = 32  # token windows the SQNR probe runs (a causal LM's logits are vocabulary-wide per token)
PROBE_BATCH = 2  # windows in the probe's first forward: a 49k-token vocabulary makes 50 MB of logits for two
PROBE_VALUES = 12_500_000  # output values per later probe forward (50 MB of float32), as many samples as fit


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
        ctx.calibrate(model, batches, cfg.calib_batch_size)
    finally:
        for h in hooks:
            h.remove()
    return absmax, {n: torch.cat(r) for n, r in rows.items() if r}


def best_smoothing(linear: nn.Linear, absmax: torch.Tensor, x: torch.Tensor, act: str
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


@register(DynamicConfig)
def quantize_dynamic(model: nn.Module, cfg: DynamicConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    names = _names(model, cfg, *_types(cfg))
    smooth: dict[str, torch.Tensor] = {}
    figures: dict[str, dict] = {}
    notes: list[str] = []
    if cfg.smoothing != "off" and ctx.calib_data is not None:
        smooth, figures, notes = _dynamic_smoothing(model, names, cfg, ctx)
    for name in names:
        replace_module(model, name, int8.DynamicInt8Linear.from_float(model.get_submodule(name), cfg.activations,
                                                                      smooth.get(name)))
    edit = DynamicEdit(modules=names, activations=cfg.activations, smoothed=[n for n in names if n in smooth])
    return model, [edit], {"layer_extra": figures, "notes": notes}


SMOOTH_BY_BLOCK = True  # smoothing block by block where the model has a stack (False: whole-model passes)


def _smoothing(model: nn.Module, names: list[str], batches: list, run: smoothing.Int8Output, ctx: Context, *,
               fold: bool, unfolded=None) -> tuple[list[smoothing.Group], list[str]]:
    """`smoothing.by_block` with a progress bar: the groups, and the notes (how the statistics were taken)."""
    stack = sequential.blocks_of(model) if SMOOTH_BY_BLOCK else None
    with ctx.progress("smoothing", (len(stack.layers) if stack else 0) + 1) as bar:
        groups, notes, how = smoothing.by_block(model, names, batches, sequential.forward, ctx.generator(), run,
                                                fold=fold, unfolded=unfolded, progress=bar.advance,
                                                blocks=SMOOTH_BY_BLOCK, offload=ctx.offload)
        bar.advance()
    return groups, [*notes, f"smoothing statistics on {sum(len(x) for x in batches)} calibration samples, {how}"]


def _dynamic_smoothing(model: nn.Module, names: list[str], cfg: DynamicConfig, ctx: Context
                       ) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[str]]:
    """Fold smoothing scales where a writer can carry them (in place, in float), and choose per-layer scales
    for the other layers on their own recorded inputs: (name → per-layer scales, name → figures for its row,
    notes)."""
    batches = sequential.calibration_batches(model, ctx.calib_data, cfg.calib_batches, cfg.calib_batch_size)
    smooth, figures = {}, {}

    def per_layer(name: str, layer: nn.Module, group: smoothing.Group) -> None:
        alpha, s, err = best_smoothing(layer, group.absmax, group.rows, cfg.activations)
        figures[name] = {"smoothing_alpha": alpha, "output_error": round(err, 6)}
        if s is not None:
            smooth[name] = s

    groups, notes = _smoothing(model, names, batches, smoothing.dynamic_output(cfg.activations), ctx,
                               fold=cfg.smoothing in ("auto", "fold"),
                               unfolded=per_layer if cfg.smoothing in ("auto", "layer") else None)
    for group in groups:
        if "smoothing_folded_into" in group.figures:
            figures.update({name: dict(group.figures) for name in group.linears})
    return smooth, figures, notes


def _converted(prepared: nn.Module, names: list[str], qat: bool, observer: str, reduced: bool
               ) -> tuple[nn.Module, list]:
    quantized, unseen = int8.convert(prepared)
    edit = StaticEdit(modules=[n for n in names if n not in unseen], qat=qat, observer=observer,
                      reduced_range=reduced)
    return quantized, [edit]


def _reduced(cfg: StaticConfig | QATConfig) -> bool:
    """7-bit activation ranges unless only the plain kernels will ever run the file (int8.affine_qparams)."""
    return cfg.backend != "plain"


@register(StaticConfig)
def quantize_static(model: nn.Module, cfg: StaticConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    names = _names(model, cfg, *_types(cfg))
    folds = []
    if ctx.example_input is not None and (pairs := conv_batchnorm_pairs(model, ctx.example_input, set(names))):
        fold_batchnorm(model, pairs)
        folds = [FoldEdit(pairs=pairs)]
    notes, figures = [], {}
    if cfg.smoothing != "off":
        notes, figures = _static_smoothing(model, names, cfg, ctx)
    prepared = int8.prepare_static(model, names, cfg.observer, _reduced(cfg))
    batches = min(cfg.calib_batches, math.ceil(len(ctx.calib_data) / cfg.calib_batch_size))
    ctx.calibrate(prepared, batches, cfg.calib_batch_size)
    quantized, edits = _converted(prepared, names, False, cfg.observer, _reduced(cfg))
    return quantized, folds + edits, {"notes": notes, "layer_extra": figures}


STATIC_SMOOTHING_BATCHES = 8  # calibration batches the smoothing scales are chosen on


def _static_smoothing(model: nn.Module, names: list[str], cfg: StaticConfig, ctx: Context
                      ) -> tuple[list[str], dict[str, dict]]:
    """Fold smoothing scales into the norms and Linears that can carry them (static int8 layers hold no
    smoothing tensor of their own): notes, and name → figures for its row."""
    linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    if not linears:
        return [], {}
    batches = sequential.calibration_batches(model, ctx.calib_data, min(cfg.calib_batches, STATIC_SMOOTHING_BATCHES),
                                             cfg.calib_batch_size)
    groups, notes = _smoothing(model, linears, batches, smoothing.static_output(_reduced(cfg)), ctx, fold=True)
    return notes, {n: dict(g.figures) for g in groups if "smoothing_folded_into" in g.figures for n in g.linears}


@register(QATConfig)
def quantize_qat(model: nn.Module, cfg: QATConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    from modelzip_cli.pipeline.train import TrainConfig, train
    from modelzip_cli.techniques.recover import Teacher

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


def _integer_weight_names(model: nn.Module, cfg: WeightOnlyConfig | GPTQConfig | AWQConfig
                          ) -> tuple[list[str], list[str], list[str]]:
    """The layers weight-only methods quantize; the zero-width ones left alone (no weight to quantize); and
    the Linears left float by default as a language model's output (`lm_head`, or a Linear sharing its
    weight with an Embedding) unless --include names them."""
    names = _names(model, cfg, *_types(cfg))
    empty = [n for n in names if 0 in model.get_submodule(n).weight.shape]
    head = []
    if cfg.include is None:
        tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        head = [n for n in names if isinstance(model.get_submodule(n), nn.Linear) and n not in empty
                and (n.rsplit(".", 1)[-1] == "lm_head" or id(model.get_submodule(n).weight) in tied)]
    return [n for n in names if n not in empty and n not in head], empty, head


@register(WeightOnlyConfig)
def quantize_weight_only(model: nn.Module, cfg: WeightOnlyConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    names = _integer_weight_names(model, cfg)[0]
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Embedding):
            check_embedding(layer)
            replace_module(model, name, WeightOnlyEmbedding.from_embedding(layer, cfg.bits, cfg.group_size))
        else:
            replace_module(model, name, WeightOnlyLinear.from_float(layer, cfg.bits, cfg.group_size))
    return model, [WeightOnlyEdit(modules=names, bits=cfg.bits, group_size=cfg.group_size)], {}


@register(GPTQConfig)
def quantize_gptq(model: nn.Module, cfg: GPTQConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    names = _integer_weight_names(model, cfg)[0]
    chosen: dict[str, WeightOnlyLinear] = {}  # packed as soon as chosen: half a byte a weight until put in
    extra: dict[str, dict] = {}

    def process(group_names: list[str], layers: list[nn.Linear], hessian: Hessian) -> None:
        """GPTQ of the Linears that read one input (q, k, v; gate, up), their rows stacked: one walk."""
        width = layers[0].in_features
        group = cfg.group_size if 0 < cfg.group_size < width else width
        weight = torch.cat([layer.weight for layer in layers])  # (Σ out, in)
        best = None
        for order in [cfg.act_order] if cfg.act_order is not None else [True, False]:
            q, loss = gptq_rows(weight, hessian.h, cfg.bits, group, damp=cfg.damp, act_order=order)
            if best is None or float(loss.sum()) < float(best[1].sum()):
                best = q, loss, order
        q, loss, order = best
        rows = [layer.out_features for layer in layers]
        parts = zip(q.ints.split(rows), q.scales.split(rows), q.zero_points.split(rows), loss.split(rows), strict=True)
        for name, layer, (ints, scales, zeros, layer_loss) in zip(group_names, layers, parts, strict=True):
            chosen_q = Quantized(ints, scales, zeros)
            chosen[name] = WeightOnlyLinear.from_quantized(layer, chosen_q.to(torch.device("cpu")), cfg.bits, group)
            extra[name] = {"gptq_loss": round(float(layer_loss.sum()), 6),
                           "gptq_order": "activation" if order else "stored"}
            layer.weight.data.copy_(chosen_q.dequantized(group))  # what later blocks see, in the weight's memory

    def put_in(done: list[str]) -> None:
        """The packed layers in place of the float ones: each block's as soon as calibration is past it (its
        float weights freed then, not at the end: the 24-block decoder of hidden 1024, bench `scale`)."""
        for n in done:
            replace_module(model, n, chosen.pop(n))

    with sequential.on_device(model, ctx.device):  # --device: calibration and GPTQ where the weights are
        batches = sequential.calibration_batches(model, ctx.calib_data, cfg.calib_batches, cfg.calib_batch_size)
        how = sequential.per_layer(model, names, batches, process, ctx.progress, "gptq", ctx.offload,
                                   finished=put_in)
    put_in(list(chosen))
    done = [n for n in names if n in extra]
    notes = [f"GPTQ on {sum(len(x) for x in batches)} calibration samples ({len(batches)} batches), {how}"]
    edit = WeightOnlyEdit(modules=done, bits=cfg.bits, group_size=cfg.group_size)
    return model, [edit], {"layer_extra": extra, "notes": notes}


class _Producers:
    """While open on a block: which submodule wrote each tensor a named Linear reads, and up to
    awq.ROWS rows of every such tensor over the calibration batches (a tensor read by several Linears is
    kept once)."""

    def __init__(self, block: nn.Module, linears: dict[str, nn.Module], per_batch: int):
        self.writer: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) → (module name, output kept alive)
        self.producer: dict[str, str | None] = {}  # Linear → its input's writer (first batch)
        self.reads: dict[str, int] = {}  # Linear → index of the input it reads, in `inputs`
        self.inputs: list[list[torch.Tensor]] = []
        self._current: list[torch.Tensor] = []  # this forward's distinct Linear inputs
        self.per_batch = per_batch
        self.handles = [block.register_forward_pre_hook(lambda *_: self._new_forward())]
        self.handles += [m.register_forward_hook(lambda m, a, out, n=n: self._wrote(n, out))
                         for n, m in block.named_modules() if n]
        self.handles += [m.register_forward_pre_hook(lambda m, a, n=n: self._read(n, a[0])) for n, m in linears.items()]

    def _new_forward(self) -> None:
        self.writer.clear()
        self._current.clear()

    def _wrote(self, name: str, out: object) -> None:
        if isinstance(out, torch.Tensor):
            self.writer[id(out)] = (name, out)

    def _read(self, name: str, x: torch.Tensor) -> None:
        if name not in self.producer:
            self.producer[name] = self.writer.get(id(x), (None, None))[0]
        for i, seen in enumerate(self._current):
            if seen is x:
                self.reads.setdefault(name, self.reads.get(name, i))
                return
        slot = self.reads.get(name)
        if slot is None:
            slot = self.reads[name] = len(self.inputs)
            self.inputs.append([])
        rows = x.detach().reshape(-1, x.shape[-1])
        step = max(1, rows.shape[0] // self.per_batch)
        self.inputs[slot].append(rows[::step][: self.per_batch].float())
        self._current.append(x)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.writer.clear()
        self._current.clear()


def _awq_groups(block: nn.Module, prefix: str, names: list[str],
                seen: _Producers) -> list[tuple[list[str], str | None]]:
    """The block's Linears grouped by the tensor they read, each with the module its scales fold into
    (a norm that writes it; for a gated MLP's down projection, the up projection), fold-into-Linear first."""
    by_input: dict[int, list[str]] = {}
    for n in names:
        by_input.setdefault(seen.reads.get(n, -1 - len(by_input)), []).append(n)
    groups = []
    for members in by_input.values():
        first = members[0]
        width = block.get_submodule(first[len(prefix):]).in_features
        writer = seen.producer.get(first)
        producer = None
        if writer is not None and awq.is_norm(block.get_submodule(writer), width):
            producer = prefix + writer
        elif first.endswith("down_proj") and len(members) == 1:  # gated MLP: down reads act(gate) · up
            up = first[: -len("down_proj")] + "up_proj"
            if up.startswith(prefix) and up[len(prefix):] in dict(block.named_modules()) and \
                    getattr(block.get_submodule(up[len(prefix):]), "out_features", None) == width:
                producer = up
        groups.append((members, producer))
    return sorted(groups, key=lambda g: not (g[1] or "").endswith("up_proj"))


@register(AWQConfig)
def quantize_awq(model: nn.Module, cfg: AWQConfig, ctx: Context) -> tuple[nn.Module, list, dict]:
    names = _integer_weight_names(model, cfg)[0]
    batches = sequential.calibration_batches(model, ctx.calib_data, cfg.calib_batches, cfg.calib_batch_size)
    per_batch = max(1, awq.ROWS // max(1, len(batches)))
    chosen: dict[str, tuple[Quantized, int]] = {}
    extra: dict[str, dict] = {}
    folded: list[str] = []

    def group_of(n: str) -> int:
        width = model.get_submodule(n).in_features
        return cfg.group_size if 0 < cfg.group_size < width else width

    def per_block(i: int, block: nn.Module, inputs: sequential.Inputs) -> None:
        prefix = stack.name(i) + "."
        mine = [n for n in names if n.startswith(prefix)]
        seen = _Producers(block, {n[len(prefix):]: block.get_submodule(n[len(prefix):]) for n in mine}, per_batch)
        try:
            sequential.feed(block, inputs)
        finally:
            seen.remove()
        seen.producer = {prefix + k: v for k, v in seen.producer.items()}
        seen.reads = {prefix + k: v for k, v in seen.reads.items()}
        for members, producer in _awq_groups(block, prefix, mine, seen):
            slot = seen.reads.get(members[0])
            x = torch.cat(seen.inputs[slot]) if slot is not None and seen.inputs[slot] else None
            with torch.no_grad():
                q, figures = awq.scale_and_round({n: model.get_submodule(n) for n in members},
                                                 model.get_submodule(producer) if producer else None, x, cfg.bits,
                                                 {n: group_of(n) for n in members})
            for n in members:
                chosen[n] = q[n], group_of(n)
                extra[n] = {**figures, "awq_folded_into": producer} if producer else {"awq_folded_into": None}
            if producer and figures.get("awq_alpha"):
                folded.append(producer)
        bar.advance()

    stack = sequential.blocks_of(model)
    with ctx.progress("awq", (len(stack.layers) if stack else 0)) as bar, sequential.on_device(model, ctx.device):
        if stack is not None:
            batches = [x.to(ctx.device) for x in batches]
            sequential.calibrate(model, batches, sequential.forward, per_block, offload=ctx.offload)
    outside = [n for n in names if n not in chosen]
    for n in outside:  # outside the stack: no scales, no clipping, round to nearest
        chosen[n] = rtn(model.get_submodule(n).weight, cfg.bits, group_of(n)), group_of(n)
    for n in names:
        q, group = chosen[n]
        layer = model.get_submodule(n)
        replace_module(model, n, WeightOnlyLinear.from_quantized(layer, q.to(layer.weight.device), cfg.bits, group))
    plain = [n for n in names if n not in outside and not (extra.get(n) or {}).get("awq_folded_into")]
    notes = [f"AWQ on {sum(len(x) for x in batches)} calibration samples, scales folded into "
             f"{len(set(folded))} norms or Linears" + (f" over the {len(stack.layers)} blocks of {stack.prefix}"
                                                       if stack else " (no stack of repeated blocks found)")]
    if plain:
        notes.append("no scales (no norm or Linear writes their input), only clipped ranges: " + ", ".join(plain))
    if outside:
        notes.append("rounded to nearest, no scales or clipping (outside a stack of repeated blocks): "
                     + ", ".join(outside))
    edit = WeightOnlyEdit(modules=names, bits=cfg.bits, group_size=cfg.group_size)
    return model, [edit], {"layer_extra": extra, "notes": notes}


# method → (model, config, ctx) → (quantized model, edits for the manifest, extra figures: "after" (QAT's
# training history), "layer_extra" (name → fields of its layer row))

NOTES = {
    "dynamic": "int8 weights (per channel); activations quantized at run time where an int8 GEMM runs them "
               "(torch.ao's fbgemm, or _int_mm on AVX512-VNNI), float elsewhere",
    "static": "int8 weights and int8 activations with calibrated per-tensor scales; each layer takes and gives "
              "float, rounding its input to the calibrated grid",
    "qat": "fake-quantization fine-tuning, then the same int8 layers as static",
    "weight-only": "smaller file; each layer runs on the kernel measured fastest on this machine for its shape "
                   "and call size (see the weight-only kernels note and each layer's `kernel`)",
    "gptq": "int4/int8 weights chosen on calibration data to keep each layer's outputs (GPTQ); stored and run "
            "as weight-only",
    "awq": "int4/int8 weights rounded to nearest after activation-aware per-channel scales (AWQ); stored and "
           "run as weight-only",
}

WO_ROWS = (1, 16, 128)  # call sizes (rows) the weight-only kernel choice is reported at: decoding, few, a batch
WO_KERNEL_NOTE = ("int4pack / int8pack: torch's packed int4 / int8 CPU kernels, bf16 activations; int8chan: the "
                  "int8 kernel on the weight requantized at load to one scale per output channel (adds at most "
                  "half that scale of rounding per weight); int8dyn (only where MODELZIP_WO_KERNEL forces it): W8A8, "
                  "activations rounded to int8 per token at run time, torch._int_mm; bf16: a "
                  "bf16 dequantized copy of the weight kept in memory; float: a dequantized copy in the input's "
                  "dtype (the float layer's own speed); MODELZIP_WO_KERNEL=<name> forces one")


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


NOTE_NAMES = 6  # a longer list of layers in a note is said as its length and its first and last names


def names_list(names: list[str]) -> str:
    """Layer names for a note: all of a few, or "37 layers: a, b, c, …, z" (the layer table has them all)."""
    if len(names) <= NOTE_NAMES:
        return ", ".join(names)
    return f"{len(names)} layers: {', '.join(names[:3])}, …, {names[-1]}"


def _backend_note(model: nn.Module, backend: str, rows: tuple[int, ...]) -> str:
    """Which kernel runs which int8 layer at the batch sizes the report measures: each layer said once, with
    the kernel it runs at each of them."""
    per_rows = [int8.kernels_for(model, n) for n in rows]
    groups: dict[tuple[str, ...], list[str]] = {}  # (kernel at each batch size) → layers
    for name in per_rows[0]:
        groups.setdefault(tuple(kernels[name] for kernels in per_rows), []).append(name)
    parts = []
    for kernels, names in groups.items():
        at = (f"{kernels[0]} at batch {' and '.join(map(str, rows))}" if len(set(kernels)) == 1 else
              ", ".join(f"{k} at batch {n}" for k, n in zip(kernels, rows, strict=True)))
        parts.append(f"{at} for {names_list(names)}")
    return f"backend {backend} (" + int8.KERNEL_NAMES_NOTE + "): " + "; ".join(parts)


def measured_batch_n(ctx: Context) -> int:
    """The batch N the report's latency uses, for notes that speak of it."""
    data = ctx.eval_data or ctx.calib_data or ctx.data
    if data is not None:
        return default_batch_n(data)
    tokens = ctx.example_input is not None and not ctx.example_input.is_floating_point()
    return DEFAULT_BATCH_N_TOKENS if tokens else DEFAULT_BATCH_N


PROBE_KEEP_BYTES = 128 << 20  # float outputs of the unquantized model kept for the SQNR probe, at most


def _reference_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """The model's outputs on `x` before it is quantized, as (start, stop, outputs of x[start:stop]): PROBE_BATCH
    samples first, then as many as make PROBE_VALUES output values at a time; what the SQNR probe compares
    against instead of a second copy of the model. Keeps at most PROBE_KEEP_BYTES (always at least one forward):
    a vocabulary-wide causal LM's logits are large (2 windows of 512 tokens over 32000 words: 125 MB; a second
    forward, taken while fewer than PROBE_KEEP_BYTES were kept, made it 250 MB)."""
    outputs: list[tuple[int, int, torch.Tensor]] = []
    kept, i, step = 0, 0, PROBE_BATCH
    while i < x.shape[0]:
        a = predict(model, x[i:i + step])
        outputs.append((i, min(i + step, x.shape[0]), a))
        kept += a.numel() * a.element_size()
        i += step
        step = max(PROBE_BATCH, PROBE_VALUES * a.shape[0] // max(1, a.numel()))  # samples per PROBE_VALUES
        per_sample = a.numel() * a.element_size() // max(1, a.shape[0])
        if kept + per_sample * min(step, x.shape[0] - i) > PROBE_KEEP_BYTES:
            break
    return outputs


def _sqnr(reference: list[tuple[int, int, torch.Tensor]], quantized: nn.Module, x: torch.Tensor) -> float:
    """`sqnr_db` of the quantized model's outputs against the float outputs `reference` (from
    `_reference_outputs`), slice by slice: never all outputs of both models in memory."""
    signal = noise = 0.0
    for start, stop, a in reference:
        signal += float(a.pow(2).sum(dtype=torch.float64))
        b = predict(quantized, x[start:stop])
        with torch.inference_mode():  # (b is an inference tensor) in b's memory: no third logits-sized tensor
            noise += float(b.sub_(a).pow_(2).sum(dtype=torch.float64))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _needs_copy(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> bool:
    """Whether the float model must stay beside the quantized one: --min-fidelity puts float layers back from
    it, and static int8 convolutions are timed against it. Otherwise no copy is kept (a second model's bytes)."""
    return ctx.min_fidelity is not None or (
        not isinstance(cfg, DynamicConfig | WeightOnlyConfig | GPTQConfig | AWQConfig)
        and any(isinstance(m, CONVS) for m in model.modules()))


def _probe_inputs(ctx: Context) -> tuple[torch.Tensor | None, str]:
    """Inputs for the SQNR probe and a note on where they came from. Integer inputs (token ids) are never
    perturbed as floats; with no data and no example input there is no probe."""
    source = ctx.calib_data or ctx.data
    if source is not None:
        n = 1024 if source.inputs.is_floating_point() else PROBE_WINDOWS
        return source.inputs[:n], f"SQNR measured on {min(n, len(source))} samples of {source.path.name}"
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
        model.eval()
        # What the notes need of the float model, taken before the handler changes it in place
        notes_before = list(filter(None, [unsupported_layers(model)]))
        planned = _names(model, cfg, *_types(cfg))
        empty = head = []
        if isinstance(cfg, WeightOnlyConfig | GPTQConfig | AWQConfig):
            planned, empty, head = _integer_weight_names(model, cfg)
        recurrent = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
        reference = copy.deepcopy(model) if _needs_copy(model, cfg, ctx) else None
        x, note = _probe_inputs(ctx)
        expected = None
        if x is not None:
            try:  # a measurement: it never fails the step
                expected = _reference_outputs(model, x)
            except Exception as exc:
                note = f"SQNR not measured: the probe could not run ({first_line(exc, 200)})"
        quantized, edits, extra = handler(cfg)(model, cfg, ctx)
        quantized.eval()
        notes = [NOTES[cfg.method], *extra.get("notes", []), *notes_before]
        if folded := [p for e in edits if isinstance(e, FoldEdit) for p in e.pairs]:
            notes.append(f"{len(folded)} BatchNorm layers folded into the convolutions before them")
        after: dict = dict(extra.get("after", {}))
        layer_extra: dict[str, dict] = extra.get("layer_extra", {})
        if empty:
            notes.append(f"zero-width layers left as they are (no weight to quantize): {', '.join(empty)}")
        if head:
            notes.append("left in float as language-model outputs (name them with --include to quantize): "
                         + ", ".join(head))
        selected = set(edits[-1].modules)
        still_float = [n for n in planned if n not in selected]
        if still_float:
            notes.append(f"left in float (no calibration or training batch reached them): {', '.join(still_float)}")
        if recurrent and isinstance(cfg, DynamicConfig):
            notes.append(f"left in float (the plain int8 runtime has no recurrent kernel): {', '.join(recurrent)}")
        if ctx.min_fidelity is not None:
            kept = _keep_float_for_fidelity(quantized, reference, edits[-1], ctx, layer_extra)
            after["kept_float"] = kept
            notes.append(_kept_note(kept, ctx))
        if expected is not None:
            try:
                after["sqnr_db"] = round(_sqnr(expected, quantized, x), 3)
                probed = expected[-1][1]
                if probed < x.shape[0]:
                    note += f" (the first {probed}: the float outputs kept to compare are at most " \
                            f"{PROBE_KEEP_BYTES >> 20} MB)"
            except Exception as exc:
                note = f"SQNR not measured: the probe could not run ({first_line(exc, 200)})"
        del expected
        notes.append(note)
        if int8.modules_of(quantized):
            notes.append(_backend_note(quantized, backend, (1, measured_batch_n(ctx))))
        if isinstance(cfg, WeightOnlyConfig | GPTQConfig | AWQConfig):
            notes.append(_weight_only_kernel_note(quantized, layer_extra))
        warnings = conv_warnings(reference, quantized, cfg, x, min(CONV_CHECK_BATCH, measured_batch_n(ctx)))
    return Result(quantized, edits, notes=notes, warnings=warnings, after=after, layer_extra=layer_extra)


CONVS = (nn.Conv1d, nn.Conv2d)
CONV_CHECK_BATCH = 64  # the larger batch int8 convolutions are timed at (a CNN at 256 costs seconds a round)


def conv_warnings(reference: nn.Module | None, quantized: nn.Module, cfg: QuantizeConfig, x: torch.Tensor | None,
                  batch_n: int) -> list[str]:
    """Int8 that is not faster says so. Dynamic quantization leaves convolutions float; static int8
    convolutions compute in fp32 on their dequantized weights after rounding their input, so the whole model
    is timed against the float one (interleaved rounds, batch 1 and N) and a slowdown beyond the spread
    names them."""
    if isinstance(cfg, DynamicConfig):
        convs = [n for n, m in quantized.named_modules() if isinstance(m, CONVS)]  # dynamic leaves them float
        if not convs:
            return []
        return [f"dynamic quantization covers Linear layers only: the convolutions stay float ({names_list(convs)}); "
                "--method static quantizes them too, calibrated on --calib-data"]
    convs = [n for n, m in quantized.named_modules() if isinstance(m, int8.StaticInt8Conv)]
    if not convs or x is None or reference is None:
        return []
    slower = []
    for rows in (1, batch_n):
        xb = batch_of(x, rows)
        before, after = interleaved_latency([reference, quantized], [xb, xb], threads=default_threads(),
                                            warmup=1, min_rounds=5, min_seconds=0.1)
        if latency_change(before, after) == "slower":
            slower.append(f"batch {rows}: {after.median:.3f} ms (IQR {after.q1:.3f}–{after.q3:.3f}) vs fp32 "
                          f"{before.median:.3f} ms (IQR {before.q1:.3f}–{before.q3:.3f})")
    if not slower:
        return []
    return [f"int8 is slower than the float model ({'; '.join(slower)}, {after.rounds} interleaved rounds): its "
            f"int8 convolutions compute in fp32 on dequantized weights after rounding their inputs, no faster "
            f"here ({names_list(convs)}); --exclude them to keep fp32 speed, or keep them for the smaller file"]


SENSITIVITY_SAMPLES = 64  # samples each one-layer sensitivity is measured on (the ranking needs few)
GATE_MARGIN = 0.2


def _keep_float_for_fidelity(quantized: nn.Module, reference: nn.Module, edit: Edit, ctx: Context,
                             layer_extra: dict[str, dict]) -> dict:
    """--min-fidelity: rank the quantized layers by what each alone costs (1 − cosine on a few samples),
    then put back in float the fewest, most costly first, that bring the whole model to the gate on the
    selection data: --calib-data when given, else the tuning part of --eval-data (`ctx.tune_data`), never the
    data the gate is judged on. Updates `edit` and `layer_extra`."""
    data = ctx.calib_data or ctx.tune_data or ctx.eval_data
    names = list(edit.modules)
    ranking = Scorer(reference, data.inputs[:SENSITIVITY_SAMPLES])
    with ctx.progress("sensitivity", len(names)) as bar:
        losses = layer_losses(reference, {n: quantized.get_submodule(n) for n in names}, ranking, bar)
    full = Scorer(reference, data.inputs)
    before = full.cosine(quantized)
    # On calibration data, aim inside the gate by a fifth of its allowed loss: held-out data differs a little
    target = ctx.min_fidelity if data is ctx.eval_data else 1 - (1 - ctx.min_fidelity) * (1 - GATE_MARGIN)
    floated, reached = keep_float(quantized, reference, names, losses, full, target)
    edit.modules = [n for n in names if n not in floated]
    if isinstance(edit, DynamicEdit):
        edit.smoothed = [n for n in edit.smoothed if n not in floated]
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
    if isinstance(cfg, DynamicConfig | WeightOnlyConfig | GPTQConfig | AWQConfig):
        return (nn.Linear,), "Linear"
    return WEIGHTED, "Linear or Conv"


OP = Op("quantize", "quantized", apply, plan=plan, quantizes=True, calibrates=True, fidelity_gate=True)
