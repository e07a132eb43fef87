"""Plain-int8 quantized modules: int8 weights and float scales held as ordinary tensors.

Nothing here uses torch.ao or quantized dtypes: every buffer is a plain int8, int32 or float32 tensor,
so a state dict of these modules is what the checkpoint stores, and it loads on any torch that has
int8 tensors. Numerics, for every method:

- weights: int8, symmetric per output channel, range ±127 (zero point 0);
- dynamic activations: symmetric int8 per token (per row) or per tensor, scales computed at each call;
- static activations: affine int8 [-128, 127] per tensor, scale and zero point calibrated by an observer;
- QAT: the same static numerics simulated in float (straight-through estimator) while training.

How the integer product is computed is a kernel choice. `torch._int_mm` reaches oneDNN's int8 GEMM only
on CPUs with AVX512-VNNI; elsewhere ATen runs it as a scalar loop, 30–300× slower than an fp32 matmul
(measured on this project's AVX2 machine; see `_int_mm_out_cpu` in ATen's LinearAlgebra.cpp). There the
"float" kernel multiplies in fp32 against a dequantized copy of the weight, built once per module and
kept (4 bytes per weight in memory; the file stays int8):

- static and QAT keep their numerics exactly: the input is rounded to its calibrated int8 grid, then
  multiplied in float (exact while |accumulator| < 2**24, i.e. K ≤ 1040 at full range; rounded like any
  fp32 matmul beyond);
- dynamic leaves activations in float: without an int8 GEMM, rounding them at run time would cost time
  (several small ops per layer, 3× the fp32 latency of the digits MLP at batch 1) and accuracy, and buy
  nothing. Its results are then those of int8 weight-only quantization.

`MODELZIP_INT8_KERNEL=int_mm|float` overrides the choice for a process, `use_kernel()` inside one.

A dynamic per-token layer on the int_mm kernel computes its product with whichever of `_int_mm` and
modelzip's VNNI C kernel (vnni8 of kernels/weight_only.py, the whole row as one group: the same int8
activations, max|x| / 127 per row, the same integer sums) measured faster on this machine for the call's row
count: `_int_mm` is slow on one row (MLP at batch 1: 1.6× fp32 on `_int_mm`), where vnni8 reads the weight
once (see bench `int8`). Both round x / s to the same integers; their sums agree to float rounding.

Backends. "plain" runs only the kernels above. A module that can reach a faster int8 GEMM registers it
in kernels/torch_ao.py (torch.ao's fbgemm kernels, the only fast int8 GEMM on an AVX2
CPU, built from these same int8 tensors); "torch-ao" uses it for every layer it covers, "auto" (the
default) only for products large enough to gain from it (AUTO_MIN_MACS, AUTO_MIN_WEIGHTS: measured in
bench/bench_int8.py) and never for a per-token layer where the int8 kernel is `_int_mm` (a CPU with VNNI, or
MODELZIP_INT8_KERNEL=int_mm: fbgemm would round its activations per tensor, to 7 bits), and both fall back
to the plain kernels when it is missing or cannot be imported. `use_backend()` chooses.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import operator
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.errors import UsageError
from modelzip_cli.kernels import choice, torch_ao
from modelzip_cli.kernels import weight_only as wo_kernels
from modelzip_cli.kernels.native import count_nonzero
from modelzip_cli.nn.packed import PackedWeights

KERNEL_ENV = "MODELZIP_INT8_KERNEL"
KERNELS = ("auto", "int_mm", "float")
ACTIVATIONS = ("per-token", "per-tensor")  # dynamic activation granularity
PER_TOKEN_KERNELS = ("vnni8", "int8dyn")  # kernels/weight_only.py's with a per-token layer's exact numerics
WMAX = 127  # weights and dynamic activations: symmetric, -128 unused so that negation stays exact
AMIN, AMAX = -128, 127  # static activations: affine, full int8 range
EPS = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------------
# Kernel choice


@functools.cache
def int_mm_is_fast() -> bool:
    """Whether `torch._int_mm` on CPU runs oneDNN's int8 GEMM (AVX512-VNNI) rather than a scalar loop."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)  # the check ATen itself makes
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and vnni and vnni())


@functools.cache
def _default_kernel() -> str:
    name = os.environ.get(KERNEL_ENV, "auto")  # read once: forward passes must not pay for it
    if name not in KERNELS:
        raise UsageError(f"{KERNEL_ENV}={name!r} is not a kernel", hint="use " + ", ".join(KERNELS))
    if name == "auto":
        return "int_mm" if int_mm_is_fast() else "float"
    return name


def kernel() -> str:
    """The kernel int8 products run on now: "int_mm" (int8×int8→int32) or "float" (fp32, see above)."""
    return choice.current().int8_kernel or _default_kernel()


def use_kernel(name: str) -> contextlib.AbstractContextManager:
    """Run the int8 modules on `name` ("auto", "int_mm" or "float") inside the block."""
    if name not in KERNELS:
        raise UsageError(f"{name!r} is not an int8 kernel", hint="use " + ", ".join(KERNELS))
    return choice.use(int8_kernel=None if name == "auto" else name)


BACKENDS = ("auto", "plain", "torch-ao")
# Below these sizes an accelerated call's fixed cost loses to the fp32 matmul. Measured per layer on this
# project's AVX2 machine (1 thread, CPU time, torch.ao vs fp32): 64 rows × 64→512 (2.1M MACs) 0.13 vs 0.11 ms
# and 1 × 64→512 0.07 vs 0.015 ms, slower; 64 × 512→256 (8.4M MACs) 0.17 vs 0.28 ms and 1 × 1024→4096 (4.2M
# weights: fp32 is memory-bound at batch 1) 0.33 vs 2.1 ms, faster. Whole models: bench/results/int8.json.
AUTO_MIN_MACS = 4_000_000  # rows · in · out per call
AUTO_MIN_WEIGHTS = 1_000_000  # in · out


def backend() -> str:
    return choice.current().int8_backend


def use_backend(name: str) -> contextlib.AbstractContextManager:
    """Run the int8 modules on backend `name` (auto, plain or torch-ao) inside the block."""
    if name not in BACKENDS:
        raise UsageError(f"unknown int8 backend {name!r}", hint="use " + ", ".join(BACKENDS))
    return choice.use(int8_backend=name)


# ---------------------------------------------------------------------------------------------------
# Quantization arithmetic (plain tensor ops only)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 tensor shaped like w, float32 scales (out,))."""
    w = w.detach().float()
    scale = w.flatten(1).abs().amax(1).clamp_min(EPS) / WMAX  # (out,)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = torch.clamp(torch.round(w / scale.reshape(shape)), -WMAX, WMAX).to(torch.int8)
    return q, scale


def affine_qparams(lo: float, hi: float, reduced: bool = False) -> tuple[float, int]:
    """(scale, zero point) mapping [lo, hi] (widened to include 0, so that 0 is exact) onto [-128, 127], or
    with `reduced` onto [-128, -1]: 7 bits, what fbgemm's u8×s8 products need on a CPU without VNNI, where
    two 8-bit products overflow the int16 they are summed in (20 dB SQNR on the digits MLP's first layer).
    Values beyond the calibrated range then still have the rest of the int8 range before they clip."""
    top = AMIN + 127 if reduced else AMAX
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (top - AMIN), EPS)
    zero_point = int(min(top, max(AMIN, round(AMIN - lo / scale))))
    return scale, zero_point


def _row_scales(x: torch.Tensor, act: str) -> torch.Tensor:
    """Dynamic symmetric scales of a (M, K) float tensor: (M, 1) per token, or (1, 1) per tensor."""
    amax = x.abs().amax(1, keepdim=True) if act == "per-token" else x.abs().amax().reshape(1, 1)
    return amax.clamp_min(EPS) / WMAX


_MISSING = object()


class _Derived:
    """Float tensors derived from a module's buffers (dequantized weight, float bias, row sums, a kernel's
    packed copy), kept while those buffers are the same tensors, unwritten (a write in place, e.g.
    `qweight.copy_(...)`, bumps a tensor's version: rebuilt; load_state_dict and .to() also clear it); copies
    and pickles as empty."""

    def __init__(self):
        self.values: dict[str, tuple[tuple, tuple, object]] = {}  # name → (sources, their versions, value)
        # DynamicInt8Linear's bound per-token calls: (the kernel choice they were bound under, the LayerKernels
        # of its "per-token" value that holds them)
        self.fast: tuple | None = None

    def fresh(self, name: str, sources: tuple) -> object:
        """The value kept for `name` if it was made from these very tensors, unwritten since; else _MISSING."""
        hit = self.values.get(name)
        if hit is None or not all(map(operator.is_, hit[0], sources)) or hit[1] != wo_kernels.versions(*sources):
            return _MISSING
        return hit[2]

    def get(self, name: str, sources: tuple, build):
        value = self.fresh(name, sources)
        if value is _MISSING:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable with autograd later
                value = build()
            self.values[name] = (sources, wo_kernels.versions(*sources), value)
        return value

    def __deepcopy__(self, memo) -> _Derived:
        return _Derived()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


# ---------------------------------------------------------------------------------------------------
# Modules


class _Int8Weighted(PackedWeights, nn.Module):
    """int8 weight + per-channel scales + optional float bias, and the derived tensors kernels need."""

    scheme = "int8"

    def _init_weight(self, shape: tuple[int, ...], bias: bool, dtype: torch.dtype) -> None:
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(shape[0], dtype=torch.float32))
        self.register_parameter("bias", nn.Parameter(torch.zeros(shape[0], dtype=dtype), requires_grad=False)
                                if bias else None)
        self._derived = _Derived()

    def _copy_weight(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.qweight.copy_(q)
            self.weight_scale.copy_(scale)
            if bias is not None:
                self.bias.copy_(bias.detach())

    def float_params(self, keep: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 weight = qweight · scale, float32 bias), computed once and kept until the buffers change;
        without `keep`, computed and not kept (a kernel that packs its own copy: 4 bytes a weight saved)."""
        q, scale, bias = self._buffers["qweight"], self._buffers["weight_scale"], self._parameters["bias"]

        def build():
            w = q.float() * scale.float().reshape((-1,) + (1,) * (q.ndim - 1))
            return w, None if bias is None else bias.float()

        if not keep:
            with torch.no_grad():
                return build()
        return self._derived.get("float", (q, scale, bias), build)

    def dequantized_weight(self) -> torch.Tensor:
        return self.float_params()[0]

    def weight_figures(self) -> tuple[list[int], int]:
        """Shape and non-zeros from the integers (scales are positive): no float copy built or kept."""
        q = self._buffers["qweight"]
        return list(q.shape), count_nonzero(q)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight, for model code that reads a layer's `.weight` (its dtype, its shape)."""
        return self.float_params()[0]

    def accelerated(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The accelerated kernel for a call on `rows` rows, or None to run the plain kernels."""
        chosen = backend()
        if chosen == "plain":
            return None
        weights = self.in_features * self.out_features  # (Linear layers only call this)
        if chosen == "auto" and rows * weights < AUTO_MIN_MACS and weights < AUTO_MIN_WEIGHTS:
            return None
        if chosen == "auto" and getattr(self, "act", None) == "per-token" and kernel() == "int_mm":
            # torch.ao's dynamic kernel rounds activations per tensor, to 7 bits: where an int8 GEMM runs the
            # layer's own per-token numerics, auto keeps them (the sample decoder's W8A8: +0.52% perplexity on
            # fbgemm, +0.03% per token; and `_int_mm` / vnni8 were the faster at 64 rows and at one: bench `int8`)
            return None
        kinds = {DynamicInt8Linear: "dynamic", StaticInt8Linear: "static"}
        kind = kinds.get(type(self))
        if kind is None:
            return None
        sources = (self._buffers["qweight"], self._buffers["weight_scale"], self._parameters["bias"],
                   *(self._buffers.get(b) for b in ("input_scale", "input_zero_point")))
        return self._derived.get("torch-ao", sources, lambda: torch_ao.accelerate(self, kind))

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: derived tensors must follow
        self._derived = _Derived()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._derived = _Derived()
        super()._load_from_state_dict(*args, **kwargs)


class DynamicInt8Linear(_Int8Weighted):
    """Linear with int8 weights; with the int_mm kernel, activations quantized to int8 at each call, per
    token or per tensor."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "per-token",
                 dtype: torch.dtype = torch.float32, smoothed: bool = False):
        super().__init__()
        if act not in ACTIVATIONS:
            raise UsageError(f"unknown activation granularity {act!r}", hint="use " + " or ".join(ACTIVATIONS))
        self.in_features, self.out_features, self.act = in_features, out_features, act
        self._init_weight((out_features, in_features), bias, dtype)
        self.smoothed = smoothed
        if smoothed:  # x·diag(1/s) @ (W·diag(s))ᵀ = x @ Wᵀ: the stored int8 weight is W·diag(s) (smooth_scales)
            self.register_buffer("input_smooth", torch.ones(in_features, dtype=torch.float32))  # 1/s, (K,)
        self.scheme = f"int8 dynamic ({act} activations" + (", smoothed)" if smoothed else ")")

    @classmethod
    def from_float(cls, linear: nn.Linear, act: str = "per-token", smooth: torch.Tensor | None = None
                   ) -> DynamicInt8Linear:
        """`smooth`: per-input-channel scales s (K,) that move activation outliers into the weight."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, act, linear.weight.dtype,
                smoothed=smooth is not None)
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth.float()  # (N, K) · (K,): column k scaled by s_k
            with torch.no_grad():
                m.input_smooth.copy_(1 / smooth.float())
        m._copy_weight(*quantize_weight(w), linear.bias)
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer computes with: the stored W·diag(s) times diag(1/s) when smoothed."""
        if not self.smoothed:
            return self.float_params()[0]
        w, inv = self.float_params()[0], self._buffers["input_smooth"]
        return self._derived.get("effective", (w, inv), lambda: w * inv.float())

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a per-token call bound before for inputs of this size and dtype under this kernel choice, while the
        # stored tensors are the same and unwritten: one lookup and the kernel (a decoding step's small layers
        # are bound by the call: 4.5 µs a call above the kernel through the checks below, 1.5 µs this way)
        f = self._derived.fast
        if f is not None and f[0] is choice.current():
            run = f[1].fast.get(x.numel())
            if run is not None and x.dtype == f[1].dtype and x.is_cpu and not torch.is_grad_enabled() \
                    and not wo_kernels.tracing() \
                    and self._derived.fresh("per-token", self._per_token_sources()) is not _MISSING:
                return run(x * self.input_smooth.to(x.dtype) if self.smoothed else x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smoothed:  # (..., K) · (K,): the outliers divided out before the activations are quantized
            x = x * self.input_smooth.to(x.dtype)
        fast = self.accelerated(x.numel() // self.in_features)
        if fast is not None:
            return fast(x)
        if kernel() == "float":  # no int8 GEMM: activations stay float (see the module docstring)
            w, b = self.float_params()
            return F.linear(x, w, b) if x.dtype == torch.float32 else F.linear(x.float(), w, b).to(x.dtype)
        if self.act == "per-token" and x.is_cpu and x.numel() and not torch.is_grad_enabled() \
                and not wo_kernels.tracing():
            kernels, geo, stored = self._per_token_kernels()
            if kernels.choose(geo, stored, x.numel() // self.in_features, x.dtype, self.bias) is not None:
                y = kernels.call(geo, stored, self.bias, x)
                self._derived.fast = (choice.current(), kernels)
                return y
        rows = x.reshape(-1, self.in_features).float()  # (..., K) → (M, K)
        s = _row_scales(rows, self.act)  # (M, 1) or (1, 1)
        q = torch.round(rows / s).to(torch.int8)  # |q| ≤ 127
        y = torch._int_mm(q, self.qweight.t()).float() * (s * self.weight_scale.float())  # (M, N)
        y = y if self.bias is None else y + self.bias.float()
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _per_token_kernels(self) -> tuple[wo_kernels.LayerKernels, wo_kernels.Geometry, wo_kernels.Stored]:
        """The kernels that compute this layer's own numerics (int8 activations rounded per row, max|x| / 127,
        times the int8 weights): `_int_mm` (int8dyn) or modelzip's VNNI kernel with the whole row as one
        group (vnni8), whichever measured faster here for the call's row count (kernels/weight_only.py's
        probe: vnni8 at a few rows, where `_int_mm` is slow; see bench `int8`). Kept while the buffers (and
        the bias and smoothing, which its bound calls hold) are the same tensors, unwritten."""
        sources = self._per_token_sources()
        q, scale = sources[:2]

        def build():
            self._derived.fast = None  # bound calls of the kernels this replaces
            geo = wo_kernels.Geometry(8, self.in_features, self.out_features, self.in_features, 1)
            stored = wo_kernels.Stored(q, scale.float().reshape(-1, 1), torch.zeros(q.shape[0], 1, dtype=torch.int8),
                                       lambda: self.float_params()[0])
            return wo_kernels.LayerKernels(geo, among=PER_TOKEN_KERNELS), geo, stored
        return self._derived.get("per-token", sources, build)

    def _per_token_sources(self) -> tuple:
        b = self._buffers
        return b["qweight"], b["weight_scale"], self._parameters["bias"], b.get("input_smooth")

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme}"


class _StaticInput(_Int8Weighted):
    """Calibrated affine int8 input: one scale and zero point for the whole activation tensor."""

    def _init_input(self, reduced_range: bool) -> None:
        self.reduced_range = reduced_range  # calibrated to 7 bits (see affine_qparams): safe for fbgemm
        self.scheme = "int8 static (per-tensor activations" + (", 7-bit range)" if reduced_range else ")")
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))

    def _copy_input(self, scale: float, zero_point: int) -> None:
        with torch.no_grad():
            self.input_scale.fill_(scale)
            self.input_zero_point.fill_(zero_point)

    def input_qparams(self) -> tuple[float, int]:
        return float(self.input_scale), int(self.input_zero_point)

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """The float values the int8 input stands for: (clamp(round(x/s) + zp) − zp)·s."""
        scale, zp = self.input_qparams()
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, AMIN, AMAX)


class StaticInt8Linear(_StaticInput):
    """Linear with int8 weights and a calibrated int8 input (per-tensor scale and zero point)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 reduced_range: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight((out_features, in_features), bias, dtype)
        self._init_input(reduced_range)

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: float, input_zero_point: int,
                   weight: tuple[torch.Tensor, torch.Tensor] | None = None, reduced_range: bool = False
                   ) -> StaticInt8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, reduced_range)
        m._copy_weight(*(weight or quantize_weight(linear.weight)), linear.bias)
        m._copy_input(input_scale, input_zero_point)
        return m

    def _row_sums(self) -> torch.Tensor:
        """Σ_k qweight[n, k] as int32 (N,): the zero-point correction of the integer product."""
        q = self._buffers["qweight"]
        return self._derived.get("row_sums", (q,), lambda: q.sum(1, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.accelerated(x.numel() // self.in_features)
        if fast is not None:
            return fast(x)
        if kernel() == "float":
            return F.linear(self.fake_quant_input(x), *self.float_params()).to(x.dtype)
        scale, zp = self.input_qparams()
        rows = self.fake_quant_input(x.reshape(-1, self.in_features))  # (..., K) → (M, K)
        q = (torch.round(rows / scale) + zp).to(torch.int8)  # the integers the float kernel rounds to, exactly
        acc = torch._int_mm(q, self.qweight.t()) - zp * self._row_sums()  # (M, N): Σ (q − zp)·w
        y = acc.float() * (scale * self.weight_scale.float())
        y = y if self.bias is None else y + self.bias.float()
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme}"


class StaticInt8Conv(_StaticInput):
    """Conv1d/Conv2d with int8 weights and a calibrated int8 input, computed from the int8 weights in float.

    (im2col + `_int_mm` would need the unfolded input materialized as int8 and a zero-point-padded
    border; on CPUs where `_int_mm` is fast it is left for later, see the module docstring.)
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 stride: tuple[int, ...], padding: tuple[int, ...] | str, dilation: tuple[int, ...], groups: int,
                 bias: bool = True, dtype: torch.dtype = torch.float32, reduced_range: bool = False):
        super().__init__()
        if dims not in (1, 2):
            raise UsageError(f"int8 convolution supports Conv1d and Conv2d, not {dims}-d")
        self.dims, self.in_channels, self.out_channels = dims, in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), padding
        self.dilation, self.groups = tuple(dilation), groups
        self._init_weight((out_channels, in_channels // groups, *self.kernel_size), bias, dtype)
        self._init_input(reduced_range)

    @classmethod
    def from_float(cls, conv: nn.Conv1d | nn.Conv2d, input_scale: float, input_zero_point: int,
                   weight: tuple[torch.Tensor, torch.Tensor] | None = None, reduced_range: bool = False
                   ) -> StaticInt8Conv:
        check_conv(conv)
        m = cls(conv.weight.ndim - 2, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None, conv.weight.dtype, reduced_range)
        m._copy_weight(*(weight or quantize_weight(conv.weight)), conv.bias)
        m._copy_input(input_scale, input_zero_point)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        w, b = self.float_params()
        y = conv(self.fake_quant_input(x), w, b, self.stride, self.padding, self.dilation, self.groups)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {self.scheme}"


def check_conv(conv: nn.Module) -> None:
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise UsageError(f"int8 convolution supports zero padding only, not {conv.padding_mode!r}",
                         hint="exclude this layer with --exclude")


# ---------------------------------------------------------------------------------------------------
# Observers: the range of a layer's input over calibration (or QAT) batches


class MinMaxObserver(nn.Module):
    """Running min and max over every batch seen (ema=None), or their moving average (QAT)."""

    def __init__(self, ema: float | None = None, reduced: bool = False):
        super().__init__()
        self.ema, self.reduced = ema, reduced
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.detach().float().aminmax()
        if self.ema is None or not self.seen():
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
        else:
            self.min_val.lerp_(lo, self.ema)
            self.max_val.lerp_(hi, self.ema)
        return x

    def seen(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    def qparams(self) -> tuple[float, int]:
        return affine_qparams(float(self.min_val), float(self.max_val), self.reduced)


class PercentileObserver(nn.Module):
    """The mean over batches of each batch's low and high percentiles: clips rare outliers."""

    def __init__(self, percentile: float = 99.99, reduced: bool = False):
        super().__init__()
        self.q, self.reduced = percentile / 100, reduced
        self.register_buffer("lo_sum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("hi_sum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("batches", torch.tensor(0))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().flatten()
        if flat.numel() > 1 << 24:  # torch.quantile's limit: subsample evenly
            flat = flat[:: flat.numel() // (1 << 24) + 1]
        lo, hi = torch.quantile(flat, torch.tensor([1 - self.q, self.q]))
        self.lo_sum += lo
        self.hi_sum += hi
        self.batches += 1
        return x

    def seen(self) -> bool:
        return int(self.batches) > 0

    def qparams(self) -> tuple[float, int]:
        n = int(self.batches)
        return affine_qparams(float(self.lo_sum) / n, float(self.hi_sum) / n, self.reduced)


class MSEObserver(nn.Module):
    """The range, shrunk from the min and max seen, whose int8 rounding of the values seen moves them least
    (mean squared error over a sample of every batch): clips rare outliers only where that pays."""

    SAMPLE = 1 << 14  # values kept per batch
    RATIOS = 40  # shrink ratios tried, 1.0 down to 0.1

    def __init__(self, reduced: bool = False):
        super().__init__()
        self.reduced = reduced
        self.minmax = MinMaxObserver(reduced=reduced)
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.minmax(x)
        flat = x.detach().float().flatten()
        self.samples.append(flat[:: max(1, flat.numel() // self.SAMPLE)].cpu())
        return x

    def seen(self) -> bool:
        return self.minmax.seen()

    def qparams(self) -> tuple[float, int]:
        values = torch.cat(self.samples)
        lo, hi = float(self.minmax.min_val), float(self.minmax.max_val)
        best = (math.inf, affine_qparams(lo, hi, self.reduced))
        for ratio in torch.linspace(1.0, 0.1, self.RATIOS).tolist():
            scale, zp = affine_qparams(lo * ratio, hi * ratio, self.reduced)
            err = float((torch.fake_quantize_per_tensor_affine(values, scale, zp, AMIN, AMAX) - values).pow(2).mean())
            if err < best[0]:
                best = (err, (scale, zp))
        return best[1]


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


# ---------------------------------------------------------------------------------------------------
# QAT: float weights trained through fake quantization (straight-through estimator)


class _FakeQuant:
    """Mixin for a float layer whose input and weight pass through the static int8 numerics while it trains."""

    scheme = "int8 fake-quant (QAT)"
    observer: MinMaxObserver

    def __init__(self, *args, ema: float = 0.01, reduced: bool = False, **kwargs):
        super().__init__(*args, **kwargs)  # the torch layer's own constructor, next in the MRO
        self.observer = MinMaxObserver(ema=ema, reduced=reduced)
        self.observe = True  # False freezes the input range (the last fine-tuning epochs)

    @classmethod
    def from_float(cls, layer: nn.Module, ema: float = 0.01, reduced: bool = False):
        if isinstance(layer, nn.Linear):
            m = cls(layer.in_features, layer.out_features, layer.bias is not None, ema=ema, reduced=reduced,
                    device=layer.weight.device, dtype=layer.weight.dtype)
        else:
            check_conv(layer)
            m = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation, layer.groups, layer.bias is not None, ema=ema, reduced=reduced,
                    device=layer.weight.device,
                    dtype=layer.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(layer.weight)
            if layer.bias is not None:
                m.bias.copy_(layer.bias)
        return m

    def float_twin(self) -> nn.Module:
        """The same layer as a plain torch module (for a layer that saw no data)."""
        twin = copy.deepcopy(self)
        del twin.observer, twin.observe
        twin.__class__ = next(base for base, fq in FAKE_QUANT.items() if isinstance(self, fq))
        return twin


class FakeQuantLinear(_FakeQuant, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_fake_quant_input(self, x), fake_quant_weight(self.weight), self.bias)


class _FakeQuantConv(_FakeQuant):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(_fake_quant_input(self, x), fake_quant_weight(self.weight), self.bias)


class FakeQuantConv1d(_FakeQuantConv, nn.Conv1d):
    pass


class FakeQuantConv2d(_FakeQuantConv, nn.Conv2d):
    pass


FAKE_QUANT = {nn.Linear: FakeQuantLinear, nn.Conv1d: FakeQuantConv1d, nn.Conv2d: FakeQuantConv2d}


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-channel symmetric int8 fake quantization; gradients pass straight through (inside the range)."""
    scale = w.detach().flatten(1).abs().amax(1).float().clamp_min(EPS) / WMAX  # (out,)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WMAX, WMAX)


def _fake_quant_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if module.training and module.observe:
        module.observer(x)
    if not module.observer.seen():  # nothing observed yet: no range to quantize to
        return x
    scale, zp = module.observer.qparams()
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, AMIN, AMAX)


# ---------------------------------------------------------------------------------------------------
# Whole-model transforms: module names in, the same model (changed in place) out


OBSERVER = "int8_observer"  # the attribute prepare_static gives each layer it calibrates


def _observe_input(layer: nn.Module, args: tuple) -> None:
    """Forward pre-hook: the layer stays itself (model code may read its .weight or .stride), its input is seen."""
    getattr(layer, OBSERVER)(args[0])


QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _layer(model: nn.Module, name: str, types: tuple[type, ...]) -> nn.Module:
    m = model.get_submodule(name)
    if not isinstance(m, types):
        raise UsageError(f"layer {name!r} is a {type(m).__name__}; int8 supports "
                         + ", ".join(t.__name__ for t in types))
    return m


def quantize_dynamic(model: nn.Module, names: list[str], act: str = "per-token") -> nn.Module:
    """Replace each named Linear by a DynamicInt8Linear."""
    for name in names:
        _replace(model, name, DynamicInt8Linear.from_float(_layer(model, name, (nn.Linear,)), act))
    return model


def prepare_static(model: nn.Module, names: list[str], observer: str = "minmax", reduced: bool = False) -> nn.Module:
    """Wrap each named Linear/Conv in an observer; run calibration batches through the model next.
    `reduced`: 7-bit activation ranges (see affine_qparams)."""
    if observer not in OBSERVERS:
        raise UsageError(f"unknown observer {observer!r}", hint="use " + ", ".join(OBSERVERS))
    for name in names:
        layer = _layer(model, name, QUANTIZABLE)
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            check_conv(layer)
        setattr(layer, OBSERVER, OBSERVERS[observer](reduced=reduced))
        layer._int8_hook = layer.register_forward_pre_hook(_observe_input)
    return model


def prepare_qat(model: nn.Module, names: list[str], reduced: bool = False) -> nn.Module:
    """Replace each named Linear/Conv by its fake-quant twin (same float weights); fine-tune next."""
    for name in names:
        layer = _layer(model, name, QUANTIZABLE)
        fake_quant = next(fq for base, fq in FAKE_QUANT.items() if isinstance(layer, base))
        _replace(model, name, fake_quant.from_float(layer, reduced=reduced))
    return model


def freeze_observers(model: nn.Module) -> None:
    """QAT's last epochs: stop updating input ranges and BatchNorm statistics. (`model.train()` puts BatchNorm
    back in training mode: call this at the start of every frozen epoch.)"""
    for m in model.modules():
        if isinstance(m, _FakeQuant):
            m.observe = False
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _qat_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight and scales that `fake_quant_weight(w)` stands for, exactly."""
    w = w.detach()
    scale = w.flatten(1).abs().amax(1).float().clamp_min(EPS) / WMAX  # as fake_quant_weight computes it
    shape = (-1,) + (1,) * (w.ndim - 1)
    return torch.round(fake_quant_weight(w).float() / scale.reshape(shape)).to(torch.int8), scale


def convert(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Observed (prepare_static) and fake-quant (prepare_qat) layers → static int8 layers. Returns the model and
    the names of the layers that saw no data (left in float: they have no input range)."""
    unseen = []
    for name, m in list(model.named_modules()):
        if hasattr(m, OBSERVER):
            observer = getattr(m, OBSERVER)
            m._int8_hook.remove()
            del m._int8_hook, m._modules[OBSERVER]
            layer, weight = m, None
        elif isinstance(m, _FakeQuant):
            observer, layer, weight = m.observer, m.float_twin(), _qat_weight(m.weight)
        else:
            continue
        if not observer.seen():
            unseen.append(name)
            _replace(model, name, layer)
            continue
        scale, zp = observer.qparams()
        cls = StaticInt8Linear if isinstance(layer, nn.Linear) else StaticInt8Conv
        _replace(model, name, cls.from_float(layer, scale, zp, weight, observer.reduced))
    return model, unseen


KERNEL_NAMES_NOTE = ("torch-ao: torch.ao's fbgemm int8 GEMM; int_mm: torch._int_mm; vnni8: modelzip's AVX-512 "
                     "VNNI kernel, the same per-token numerics as int_mm; float: fp32 matmul on the int8 weights")


def kernels_for(model: nn.Module, rows: int) -> dict[str, str]:
    """name → the kernel each plain-int8 layer runs for a call on `rows` rows, under the current backend."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, DynamicInt8Linear) and m.act == "per-token" and m.accelerated(rows) is None \
                and kernel() == "int_mm":
            kernels, geo, stored = m._per_token_kernels()
            chosen = kernels.choose(geo, stored, rows, torch.float32, m.bias)
            out[name] = "vnni8" if chosen == "vnni8" else "int_mm"
        elif isinstance(m, DynamicInt8Linear | StaticInt8Linear):
            out[name] = "torch-ao" if m.accelerated(rows) is not None else kernel()
        elif isinstance(m, _Int8Weighted):
            out[name] = "float"
    return out


def modules_of(model: nn.Module) -> dict[str, str]:
    """name → scheme of every plain-int8 module in the model."""
    return {n: m.scheme for n, m in model.named_modules() if isinstance(m, _Int8Weighted)}
