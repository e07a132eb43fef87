"""`export`: a model as an ONNX graph (torch's exporter) or a torch.export program (`.pt2`), verified by
running the exported file against the PyTorch model before anything is reported done.

What is exported is the model modelzip runs: token models take `input_ids` and `attention_mask` (dynamic
batch and sequence length), other models one `input` (dynamic batch unless --static-batch); the one output
is the compared tensor (hf.py's rule). Quantized models (int8.py's modules, weight-only) go one of two ways,
`--int8`:

- `qdq`: modelzip's own integers exported as they are: per-channel int8 weights behind DequantizeLinear, and
  for static / QAT layers the calibrated input scale and zero point as a QuantizeLinear/DequantizeLinear pair
  (the numerics of modelzip's kernels, exactly); weight-only layers as their dequantizing arithmetic;
- `ort`: the float parent (the same layers holding the dequantized weights) exported, then quantized by ONNX
  Runtime's quantizer with the same scheme: dynamic → `quantize_dynamic` (int8 per-channel weights,
  activations quantized at run time), static / QAT → `quantize_static` (QDQ, per-channel weights, min-max
  calibrated on `--calib-data`).

`auto` takes, per scheme, the way bench/bench_export.py measured better (AUTO_INT8). The verification runs the
written file (ONNX Runtime, or `torch.export.load`) on the example input at two batch sizes (and two sequence
lengths for token models) and on `--eval-data` when given, and reports max |Δ|, fidelity and both latencies.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from modelzip_cli.checkpoint import compressed_tensors
from modelzip_cli.checkpoint.edits import DynamicEdit, validated_edits
from modelzip_cli.checkpoint.format import Manifest
from modelzip_cli.checkpoint.io import Loaded
from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.errors import InputError, UsageError, first_line
from modelzip_cli.export import onnx_int4
from modelzip_cli.export.onnxrun import EXTRA_HINT, META_CLASS_LOGITS, OnnxModel, require_onnx
from modelzip_cli.files import Outputs
from modelzip_cli.hf import HFModel, require_transformers
from modelzip_cli.kernels import weight_only as wo_kernels
from modelzip_cli.measure.metrics import outputs_class_logits
from modelzip_cli.measure.report import Step
from modelzip_cli.nn import int8
from modelzip_cli.nn.surgery import replace_module
from modelzip_cli.nn.weight_only import WeightOnlyLinear
from modelzip_cli.pipeline.data import Dataset, as_model_input, float_dtype
from modelzip_cli.tokens import ids_and_mask, pack

SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "gguf": ".gguf"}
DEFAULT_OPSET = 18  # the lowest opset torch's (dynamo) exporter writes; ONNX Runtime 1.17 on runs it
# scheme → the --int8 way `auto` takes: the faster unless it loses more than 0.01 of mean cosine to fp32
# (bench/bench_export.py, all-MiniLM-L6-v2, batch 32 × 48, 2 threads; bench/results/export.json). dynamic: ort 2.50×
# fp32 PyTorch at cosine 0.992, qdq 1.95× at 0.9996 (float activations: no faster than float ONNX, 1.94×);
# static: qdq 1.84× at 0.975 (modelzip's own PyTorch int8: 0.975), ort 1.58× at 0.375 (ONNX Runtime's
# per-tensor min-max calibration of every activation breaks the transformer). Weight-only has one way.
AUTO_INT8 = {"dynamic": "ort", "static": "qdq", "weight-only": "qdq"}
FLOAT_TOLERANCE = 1e-3  # a float export whose max |Δ| exceeds this × max(1, max |output|) is refused
EXAMPLE_SAMPLES = 8  # samples of the example input measured when no --eval-data is given


class ExportConfig(BaseModel):
    """The export's options, from the command line or a recipe's `export` step."""

    model_config = ConfigDict(extra="forbid", strict=True)
    op: Literal["export"] = "export"
    format: Literal["onnx", "pt2", "hf", "compressed-tensors", "gguf"] = "onnx"
    gguf_type: Literal["auto", "f16", "q8_0", "q4_0", "q4_1", "q4_k"] = "auto"  # export/gguf.py
    opset: int = Field(DEFAULT_OPSET, ge=18, le=23)
    dynamic_batch: bool = True
    int8: Literal["auto", "qdq", "ort"] = "auto"
    calib_batches: int = Field(16, ge=1)  # --int8 ort, static: batches of 32 calibration samples

    @classmethod
    def parse(cls, values: dict, where: str = "") -> ExportConfig:
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = "--" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else "a value"
            raise UsageError(f"{where}{name}: {err['msg'].lower()}, got {err.get('input')!r}") from None

    def to_dict(self) -> dict:
        return self.model_dump(exclude={"op"})

    def check_available(self) -> None:
        """The packages this format needs, or exit 2 naming the extra (before any work)."""
        if self.format == "gguf":
            from modelzip_cli.checkpoint.gguf import require_gguf

            require_gguf()
        if self.format == "onnx":
            require_onnx("ONNX export")
            try:
                import onnxscript  # noqa: F401  (torch's exporter needs it)
            except ImportError:
                raise UsageError("ONNX export needs the onnxscript package", hint=EXTRA_HINT) from None
        if self.format in ("hf", "compressed-tensors"):  # directories (export/hf.py)
            require_transformers()
        if self.format == "compressed-tensors":
            compressed_tensors.require()


def default_output(path: Path, fmt: str) -> Path:
    """model.safetensors → model.onnx beside it; a model directory DIR → DIR.onnx in the current directory
    (never beside a packaged model, in site-packages)."""
    return Path(path.resolve().name + SUFFIXES[fmt]) if path.is_dir() else path.with_name(path.stem + SUFFIXES[fmt])


def check_output_suffix(output: Path, fmt: str) -> None:
    if output.suffix != SUFFIXES[fmt]:
        raise UsageError(f"output {output}: suffix {output.suffix or '(none)'!r} does not match --format {fmt}",
                         hint=f"name it …{SUFFIXES[fmt]}, or pass --format "
                              + next((f for f, s in SUFFIXES.items() if s == output.suffix), "onnx|pt2|gguf"))


# ---------------------------------------------------------------------------------------------------
# What is exported


class _TokenGraph(nn.Module):
    """A token model's graph signature: (input_ids, attention_mask) → the compared tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(pack(input_ids, attention_mask))  # (B, 2, L)


@torch.library.custom_op("modelzip::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Per-tensor affine int8 fake quantization (static activations): one op, so that it reaches ONNX as one
    QuantizeLinear/DequantizeLinear pair whatever the batch size (torch's own fake-quantize op has no
    dynamic-shape kernel for torch.export)."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, int8.AMIN, int8.AMAX)


@quantize_dequantize.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("modelzip::dequantize_weight", mutates_args=())
def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 weight (out, …) × per-output-channel scale (out,) → float32: DequantizeLinear in ONNX, so the file
    keeps the int8 weight."""
    return q.float() * scale.reshape((-1,) + (1,) * (q.ndim - 1))


@dequantize_weight.register_fake
def _(q, scale):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _onnx_translations() -> dict:
    """modelzip's two export ops in ONNX (onnxscript, traced by torch's exporter)."""
    import onnx
    from onnxscript import opset18 as op

    def qdq(x, scale: float, zero_point: int):
        s = op.Constant(value=onnx.helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [scale]))
        zp = op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.INT8, [], [zero_point]))
        return op.DequantizeLinear(op.QuantizeLinear(x, s, zp), s, zp)

    def dequantize(q, scale):
        return op.DequantizeLinear(q, scale, axis=0)

    ops = torch.ops.modelzip
    return {ops.quantize_dequantize.default: qdq, ops.dequantize_weight.default: dequantize,
            **onnx_int4.translations()}


class _QDQLinear(nn.Module):
    """Export-only twin of a plain-int8 Linear or Conv: int8 weights per channel behind DequantizeLinear, the
    calibrated input as a QuantizeLinear/DequantizeLinear pair (static) or left float (dynamic: what
    modelzip's float kernel computes). For `.pt2` (`ops=False`) the same numerics in plain torch ops, so that
    the program loads without modelzip."""

    def __init__(self, m: int8._Int8Weighted, ops: bool):
        super().__init__()
        self.ops = ops
        self.register_buffer("qweight", m.qweight.clone())
        self.register_buffer("weight_scale", m.weight_scale.float().clone())
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
        self.input_qparams = m.input_qparams() if isinstance(m, int8._StaticInput) else None
        # a smoothed dynamic layer stores W·diag(s): its input is multiplied by 1/s first, as nn/int8.py runs it
        smooth = m._buffers.get("input_smooth")
        self.register_buffer("input_smooth", None if smooth is None else smooth.float().clone())
        for attr in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "groups"):  # model code may read them (transformers' TF-style padding does)
            if hasattr(m, attr):
                setattr(self, attr, getattr(m, attr))
        self.conv = None
        if isinstance(m, int8.StaticInt8Conv):
            self.conv = (F.conv1d if m.dims == 1 else F.conv2d, m.stride, m.padding, m.dilation, m.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.input_smooth is not None:
            x = x * self.input_smooth  # (..., K) · (K,)
        if self.input_qparams is not None:
            scale, zp = self.input_qparams
            if self.ops:
                x = quantize_dequantize(x, scale, zp)
            else:  # fake_quantize_per_tensor_affine's arithmetic (it multiplies by the inverse scale)
                x = (torch.clamp(torch.round(x * (1.0 / scale)) + zp, int8.AMIN, int8.AMAX) - zp) * scale
        if self.ops:
            w = dequantize_weight(self.qweight, self.weight_scale)
        else:
            w = self.qweight.float() * self.weight_scale.reshape((-1,) + (1,) * (self.qweight.ndim - 1))
        if self.conv is None:
            return F.linear(x, w, self.bias).to(dtype)
        fn, stride, padding, dilation, groups = self.conv
        return fn(x, w, self.bias, stride, padding, dilation, groups).to(dtype)


def _float_parent(m: nn.Module) -> nn.Module:
    """A float Linear/Conv holding the dequantized weights of a plain-int8 or weight-only module."""
    w = m.dequantized_weight().float()
    bias = m.bias is not None
    if isinstance(m, int8.StaticInt8Conv):
        cls = nn.Conv1d if m.dims == 1 else nn.Conv2d
        layer = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias)
    else:
        layer = nn.Linear(m.in_features, m.out_features, bias)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.copy_(m.bias.float())
    return layer


def scheme_of(manifest: Manifest) -> str | None:
    """The quantization scheme of a model from its edits: dynamic, static (QAT too), weight-only, or None."""
    return next((s for edit in validated_edits(manifest) if (s := edit.scheme())), None)


def _smoothed(manifest: Manifest) -> bool:
    """Whether a dynamic int8 model has smoothed layers (its edit's `smoothed` list)."""
    return any(isinstance(edit, DynamicEdit) and edit.smoothed for edit in validated_edits(manifest))


def int8_way(cfg: ExportConfig, scheme: str | None) -> str | None:
    """The --int8 way this export takes (None for a float model), or exit 2 naming one that works."""
    if scheme is None:
        return None
    if scheme == "weight-only int4":
        if cfg.int8 == "ort":
            raise UsageError("--int8 ort cannot export int4 weight-only layers: ONNX Runtime's quantizer makes "
                             "int8", hint="pass --int8 qdq (the int4 arithmetic exported as it runs), or export "
                                          "the float model and quantize it to int8")
        return "qdq"
    way = AUTO_INT8[scheme] if cfg.int8 == "auto" else cfg.int8
    if cfg.format == "pt2" and way == "ort":
        if cfg.int8 == "ort":
            raise UsageError("--int8 ort makes ONNX files; a .pt2 program runs modelzip's own int8 numerics",
                             hint="pass --int8 qdq with --format pt2, or --format onnx")
        way = "qdq"
    if scheme == "weight-only" and way == "ort":
        raise UsageError("--int8 ort quantizes activations too; weight-only layers have no such scheme in ONNX "
                         "Runtime's quantizer", hint="pass --int8 qdq")
    return way


def graph_module(model: nn.Module, way: str | None, fmt: str = "onnx", notes: list | None = None) -> nn.Module:
    """The module to trace: int8 layers swapped for their QDQ twins (qdq) or float parents (ort), int4
    weight-only Linears for MatMulNBits (ONNX, export/onnx_int4.py); what was done appended to `notes`."""
    import copy

    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, (int8._Int8Weighted, WeightOnlyLinear))]
    if way is None or not swaps:
        return model
    model = copy.deepcopy(model)
    if fmt == "onnx" and way != "ort":
        (notes if notes is not None else []).extend(onnx_int4.swap_int4(model, replace_module))
        swaps = [(n, m) for n, m in swaps if isinstance(m, int8._Int8Weighted)]  # int4 layers are swapped
    for name, m in swaps:
        if way == "ort":
            replace_module(model, name, _float_parent(m))
        elif isinstance(m, int8._Int8Weighted):  # weight-only layers are exported as they compute
            replace_module(model, name, _QDQLinear(m, ops=fmt == "onnx"))
    return model


def tokens(loaded: Loaded) -> bool:
    return loaded.manifest.input_dtype == "long" and isinstance(loaded.model, HFModel)


def example_args(loaded: Loaded, batch: int, length: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs in the graph's signature: (ids, mask) for token models, else (x,)."""
    shape = list(loaded.manifest.input_shape)
    if loaded.manifest.input_dtype == "long":
        vocab = int(loaded.manifest.arch_kwargs.get("config", {}).get("vocab_size", 100) or 100)
        g = torch.Generator().manual_seed(seed)
        if not tokens(loaded):
            return (torch.randint(1, max(2, vocab), (batch, *shape[1:-1], length or shape[-1]), generator=g),)
        # (B, L) ids whatever the recorded shape: [1, L], or [1, 2, L] when data with a mask set it
        ids = torch.randint(1, max(2, vocab), (batch, length or shape[-1]), generator=g)
        mask = torch.ones_like(ids)
        if ids.shape[-1] > 2:
            mask[0, ids.shape[-1] // 2:] = 0  # one padded sequence: the mask must matter in the graph
        return ids, mask
    x = torch.randn([batch, *shape[1:]], generator=torch.Generator().manual_seed(seed))
    return (as_model_input(x, float_dtype(loaded.model)),)


def as_data_input(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Graph inputs → modelzip's one input tensor ((B, 2, L) for ids and mask)."""
    return torch.stack(args, dim=1) if len(args) == 2 else args[0]


def _dynamic_shapes(loaded: Loaded, cfg: ExportConfig, n_args: int):
    from torch.export import Dim

    batch = Dim("batch") if cfg.dynamic_batch else None
    if n_args == 2:
        sequence = Dim("sequence", max=_max_tokens(loaded))
        spec = {0: batch, 1: sequence} if batch is not None else {1: sequence}
        return (spec, dict(spec))
    return ({0: batch},) if batch is not None else None


def _max_tokens(loaded: Loaded) -> int:
    config = loaded.manifest.arch_kwargs.get("config", {})
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 512)


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter prints progress to stdout and logs to stderr: neither is the user's business here."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _reason(exc: BaseException) -> str:
    """The exporter's own reason in one line: the innermost cause's first line that says something."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "Set TORCH", "For more")):
            return " ".join(line.split())[:300]
    return type(exc).__name__


def _trace(module: nn.Module, args, loaded: Loaded, cfg: ExportConfig):
    """torch.export's program of `module`, or exit 2 with the exporter's reason."""
    try:
        with _quiet_exporter(), int8.use_backend("plain"), int8.use_kernel("float"), torch.no_grad():
            return torch.export.export(module.eval(), args, dynamic_shapes=_dynamic_shapes(loaded, cfg, len(args)),
                                       strict=False)
    except Exception as exc:
        raise InputError(f"the model's forward cannot be exported: {_reason(exc)}",
                         hint="make the forward traceable by torch.export (no data-dependent branches), "
                              "or export it from its own code") from None


def write_onnx(program, cfg: ExportConfig, path: Path, *, class_logits: bool, n_args: int) -> None:
    """An exported program → ONNX at `path` (torch's dynamo exporter), with modelzip's metadata."""
    names = ["input_ids", "attention_mask"] if n_args == 2 else ["input"]
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=cfg.opset, input_names=names,
                                             output_names=["output"], optimize=True, verbose=False,
                                             external_data=False, custom_translation_table=_onnx_translations())
    except Exception as exc:
        raise InputError(f"the model cannot be translated to ONNX opset {cfg.opset}: {_reason(exc)}",
                         hint="try another --opset, or --format pt2") from None
    onnx_program.model.metadata_props[META_CLASS_LOGITS] = "1" if class_logits else "0"
    for node in onnx_program.model.graph.all_nodes():  # the exporter's stack traces: most of a small file
        node.metadata_props.clear()
    onnx_program.save(str(path))


def ort_quantize(float_path: Path, out: Path, scheme: str, calib: Dataset | None, cfg: ExportConfig,
                 n_args: int) -> None:
    """ONNX Runtime's quantizer on the float parent, with the scheme the model was made with."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if scheme == "dynamic":
        quantize_dynamic(str(float_path), str(out), per_channel=True, weight_type=QuantType.QInt8)
        return
    names = ["input_ids", "attention_mask"] if n_args == 2 else ["input"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            batches = [calib.inputs[i:i + 32] for i in range(0, min(len(calib), 32 * cfg.calib_batches), 32)]
            self.feeds = iter([dict(zip(names, [t.numpy() for t in _split(b, n_args)], strict=True))
                               for b in batches])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def _split(x: torch.Tensor, n_args: int) -> tuple[torch.Tensor, ...]:
    if n_args == 2:
        return ids_and_mask(x)
    return (x.float() if x.is_floating_point() else x,)


class Pt2Model(nn.Module):
    """A `.pt2` program loaded back with torch.export.load, as a modelzip model (one tensor in, one out)."""

    def __init__(self, path: Path, n_args: int, class_logits: bool):
        super().__init__()
        with _quiet_exporter():  # read as a buffer: the staged file's name does not end in .pt2 yet
            program = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()
        self.__dict__["program"] = program  # not a submodule: an exported module refuses .train()/.eval()
        self.n_args, self.outputs_class_logits = n_args, class_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(*_split(x, self.n_args))


# ---------------------------------------------------------------------------------------------------
# The command


@dataclass
class Written:
    """What `export_model` staged: the file, how it runs, and the step for the report."""

    path: Path
    runner: nn.Module
    step: Step


def export_model(loaded: Loaded, cfg: ExportConfig, output: Path, staged: Outputs, *,
                 calib: Dataset | None = None, tokenizer: Path | None = None) -> Written:
    """Export `loaded` into `output` (staged), run the written file on the example input at two batch sizes
    (two sequence lengths for token models) and refuse a float export that does not reproduce the model."""
    cfg.check_available()
    if cfg.format == "gguf":
        return export_gguf(loaded, cfg, output, staged, tokenizer)
    if loaded.manifest.input_shape is None:
        raise UsageError("no example input shape is known for this model", hint="pass --input-shape, e.g. 1,64")
    scheme = scheme_of(loaded.manifest)
    way = int8_way(cfg, scheme)
    notes = []
    if cfg.int8 == "auto" and way == "ort" and _smoothed(loaded.manifest):
        way = "qdq"  # ONNX Runtime's quantizer knows no smoothing: it rounds the outliers smoothing moved away
        notes.append("auto: smoothed dynamic int8 exported as qdq (ONNX Runtime's dynamic quantizer has no "
                     "smoothing; it measured cosine 0.967 to modelzip's model on smoothed MiniLM)")
    if way == "ort" and scheme == "static" and calib is None:
        raise UsageError("--int8 ort on a static int8 model calibrates ONNX Runtime's quantizer on data",
                         hint="pass --calib-data FILE (the data the model was calibrated on), or --int8 qdq")
    module = graph_module(loaded.model, way, cfg.format, notes)
    batch = 2 if cfg.dynamic_batch else loaded.manifest.input_shape[0]  # 2: a batch of 1 would be specialised
    args = example_args(loaded, batch)
    if tokens(loaded):
        module = _TokenGraph(module)
    class_logits = outputs_class_logits(loaded.model)
    t0 = time.perf_counter()
    program = _trace(module, args, loaded, cfg)

    def write(tmp: Path) -> None:
        if cfg.format == "pt2":
            buffer = io.BytesIO()  # a buffer: torch.export.save wants a name ending in .pt2, the staged one does not
            with _quiet_exporter():
                torch.export.save(program, buffer)
            tmp.write_bytes(buffer.getvalue())
            return
        if way != "ort":
            write_onnx(program, cfg, tmp, class_logits=class_logits, n_args=len(args))
            return
        # in the staging folder (files.Outputs): what a killed run leaves there goes with it
        with tempfile.TemporaryDirectory(dir=tmp.parent) as folder:
            float_path = Path(folder) / "float.onnx"
            write_onnx(program, cfg, float_path, class_logits=class_logits, n_args=len(args))
            with _quiet_exporter():
                ort_quantize(float_path, tmp, scheme, calib, cfg, len(args))

    written = staged.write(output, write)
    duration = round(time.perf_counter() - t0, 4)
    runner = (OnnxModel(output, written.read_bytes()) if cfg.format == "onnx"
              else Pt2Model(written, len(args), class_logits))
    checks = verify(loaded, runner, cfg, float_export=way is None)
    if way is not None and not (cfg.format == "onnx" and scheme == "weight-only int4"):  # (onnx_int4's notes)
        notes.append({"qdq": f"{scheme}: modelzip's own int8 weights and scales exported as "
                             "QuantizeLinear/DequantizeLinear (the numerics of modelzip's kernels)",
                      "ort": f"{scheme}: the float parent (dequantized weights) exported, then quantized by "
                             "ONNX Runtime's quantizer"
                             + (" on --calib-data" if scheme == "static" else "")}[way])
    after = {"format": cfg.format, "parameters": count_parameters(loaded.model), "bytes": written.stat().st_size,
             "int8": way, "scheme": scheme,
             "inputs": ["input_ids", "attention_mask"] if len(args) == 2 else ["input"], "checks": checks}
    step = Step(op="export", config=cfg.to_dict(), before={"parameters": count_parameters(loaded.model)},
                after=after, duration_s=duration, notes=notes)
    return Written(output, runner, step)


def export_gguf(loaded: Loaded, cfg: ExportConfig, output: Path, staged: Outputs, tokenizer: Path | None) -> Written:
    """A causal LM as GGUF (export/gguf.py), read back by the gguf reader (every tensor, its type) and loaded by
    transformers' GGUF loader, which runs it for the figures and the agreement check; its tokenizer, rebuilt
    from the file, must tokenize as the model's own."""
    from modelzip_cli.export import gguf as gguf_export

    config = dict(loaded.manifest.arch_kwargs.get("config") or {})
    gguf_export.family(loaded.model, config)
    folder = tokenizer or (loaded.path if loaded.path is not None and loaded.path.is_dir() else None)
    if folder is None:
        raise UsageError("--format gguf writes the tokenizer too: this checkpoint does not hold it",
                         hint="pass --tokenizer DIR (the Hugging Face directory the model came from)")
    scheme = scheme_of(loaded.manifest)
    gguf_type = gguf_export.resolve_type(cfg.gguf_type, scheme)
    t0 = time.perf_counter()
    plans = []
    written = staged.write(output, lambda tmp: plans.append(gguf_export.write_gguf(
        loaded.model, config, gguf_type, Path(folder), tmp, output.stem)))
    duration = round(time.perf_counter() - t0, 4)
    plan = plans[0]
    checks = [{"gguf_reader": gguf_export.read_back(written, plan)}]
    runner, _ = gguf_export.load_gguf(written)
    checks.append({"transformers": "AutoModelForCausalLM.from_pretrained(gguf_file=…) loaded it (dequantized)",
                   "tokenizer": gguf_export.check_tokenizer(written, Path(folder))})
    notes = [*plan.notes, "checked by the gguf reader and transformers' GGUF loader (dequantized to float32); "
             "llama-cpp-python builds only from source here, so llama.cpp itself did not run it"]
    after = {"format": "gguf", "gguf_type": gguf_type, "parameters": count_parameters(loaded.model),
             "bytes": written.stat().st_size, "int8": None, "scheme": scheme, "tensors": plan.how, "checks": checks}
    step = Step(op="export", config=cfg.to_dict(), before={"parameters": count_parameters(loaded.model)},
                after=after, duration_s=duration, notes=notes)
    return Written(output, runner, step)


def verify(loaded: Loaded, runner: nn.Module, cfg: ExportConfig, *, float_export: bool) -> list[dict]:
    """Run the exported file on the example input (batch 1 and 3, or the fixed batch; two sequence lengths for
    token models): max |Δ| against the PyTorch model each time. A float export off by more than
    FLOAT_TOLERANCE (relative) is refused: the file does not compute the model."""
    fixed = None if cfg.dynamic_batch else loaded.manifest.input_shape[0]
    batches = [fixed] if fixed else [1, 3]
    length = loaded.manifest.input_shape[-1]
    lengths = [length, max(2, length // 2)] if tokens(loaded) else [None]
    checks = []
    for b in batches:
        for n in lengths:
            x = as_data_input(example_args(loaded, b, n, seed=1))
            with torch.inference_mode(), int8.use_backend("plain"), int8.use_kernel("float"), \
                    wo_kernels.use_kernel("float"):
                ref = loaded.model(x).float()  # the numerics the graph holds (float activations, dequantized weights)
            try:
                out = runner(x).float()
            except Exception as exc:
                raise InputError(f"the exported file does not run on an input of shape {list(x.shape)}: "
                                 f"{first_line(exc, 200)}", hint="try --static-batch or another --opset") from None
            diff = float((ref - out).abs().max()) if ref.shape == out.shape else float("inf")
            checks.append({"shape": list(x.shape), "max_abs_diff": diff})
            limit = FLOAT_TOLERANCE * max(1.0, float(ref.abs().max()))
            if float_export and not diff <= limit:
                raise InputError(f"the exported file does not reproduce the model on an input of shape "
                                 f"{list(x.shape)}: max |Δ| {diff:.3g} > {limit:.3g}; nothing was written",
                                 hint="try --format pt2 or another --opset")
    return checks


def example_dataset(loaded: Loaded) -> Dataset:
    """The example input (EXAMPLE_SAMPLES samples) as a dataset, for the figures when no --eval-data is given."""
    x = as_data_input(example_args(loaded, EXAMPLE_SAMPLES, seed=2))
    return Dataset(inputs=x, targets=None, path=Path("(example input)"))


