"""Kernels for weight-only layers (W4A16, W8A16), chosen per layer shape by measurement on this machine.

The file format does not change: int8 weights, or int4 packed two per byte (low nibble first), per-group
float32 scales and int8 zero points, the weight padded to whole groups. A kernel packs those tensors into
its own layout the first time a layer runs (kept in memory, never stored) and computes the layer:

- vnni4: modelzip's own C kernel (wo4_vnni.c, built by the machine's C compiler on first use: native.py) on
  AVX-512 VNNI: the stored int4 bytes as they are (no copy), activations rounded to int8 per group of the
  layer's own group size (scale max|x| / 127, as llama.cpp's Q4 × Q8 dot products do), one vpdpbusd per 64
  weights. The rounding is finer than int8dyn's per row, and an outlier channel (LLM activations have them)
  coarsens only its own group's scale, not the whole row's: relative error about 5e-3 on Gaussian activations,
  the bf16 kernels' order (3e-3; tests allow 2e-2), so the probe may choose it (int8dyn only where forced).
  Groups of 32, 64 or a multiple of 128. At one row it reads
  half a byte per weight where torch's int4 kernel is bound by its unpacking (MLP at batch 1, 2 threads: see
  bench `int8`). A call takes the input as it is (any shape, the padded group's missing columns read as zeros
  in C) and allocates only its output: the small layers of a decoding step are bound by the call, not the
  product (576→192 on one row: 23 µs a call with a padding copy, reshapes and a scratch tensor, 11 µs without;
  the 30 × 576 decoder's decode went from 1.69× to 2.35× fp32, bench `llm`).
- vnni8: the same C file's int8 kernel: the stored int8 weights as they are, activations rounded to int8 per
  group as vnni4's and offset by 128 (vpdpbusd multiplies unsigned by signed bytes; the 128 · Σ q it adds is
  a per-(row, group) constant made at packing, so are the zero points' terms). Relative error about 6e-3
  (int8chan's 4e-3); groups of a multiple of 16, zero points allowed. MLP at batch 1: 3.4× fp32 where int8chan
  gave 2.3× (bench `int8`); the 30 × 576 decoder's decode 1.51× where it was 1.31×.
- int4pack: torch's packed int4 CPU kernel (`torch._weight_int4pack_mm_for_cpu`), bf16 activations. Its
  dequantization is (q − 8)·s + z, so z = (8 − zero point)·s. It takes groups of 32, 64, 128 or 256
  (a wider group is written as several of these with the same scale) and widths N divisible by 16.
- int8pack: torch's int8 weight kernel (`torch._weight_int8pack_mm`), bf16 activations. It takes one scale
  per output channel, so a grouped weight runs as one call per group, summed; groups of a multiple of 16.
  The probe chooses it only for per-channel weights (one call); a grouped one runs on it where forced.
- int8chan: the same kernel in one call, on a grouped int8 weight requantized at packing to one symmetric
  scale per output channel (the row's largest): each weight moves by at most half that scale, on top of
  its stored rounding (the int8 GEMV is 8–32 calls of int8pack in one: 2.1× fp32 where int8pack gave 1.1×).
- int8dyn: W8A8 from the W8A16 file: the weight as int8chan's (the stored integers where they are per
  channel already), activations rounded to int8 per row at run time, `torch._int_mm`. That rounding
  changes the numerics (relative error about 8e-3 on Gaussian activations; tests allow 2e-2), so it runs
  only where forced (`MODELZIP_WO_KERNEL=int8dyn`), never by the probe's choice.
- bf16: a dequantized bf16 copy of the weight (2 bytes per weight in memory), bf16 activations: where the
  CPU multiplies bf16 natively (AMX, AVX512-BF16) this beats fp32 once the product is compute-bound.
- float: a dequantized copy in the input's dtype (4 bytes per weight for fp32), the float layer's own
  speed: the fallback, never slower than float.

Tried and left out (measured on this Xeon with AVX-512 VNNI/BF16 and AMX, one thread, 4096×4096 at one row):
the CPU packing's inner_k_tiles (1, 2, 4, 8: the same speed, it is ignored); int4pack on float32
activations (0.1× fp32: the kernel's fp32 path is a slow loop); `_weight_int8pack_mm` on float32
activations (0.3×); `_int_mm` at one row (0.7–0.9×); oneDNN's `qlinear_pointwise` (as fast as int8pack
where it ran, no primitive for 576-wide layers); `_dyn_quant_matmul_4bit` (its x86 packing raises in torch
2.13); torch.ao's dynamic linear (3–5×, but quantized dtypes, which modelzip no longer uses).

A layer's call is bound once per input size, dtype and use_kernel block (`LayerKernels.call`), and rebound
when a stored tensor or the bias is replaced or written in place (version counters, `versions`): the packed
tensors, cast bias and padding settled, the forward is one dict lookup and the kernel (a digits MLP at one
row: 1.0× the float model, where a call that re-decided everything ran 0.6×).

The choice: a call's row count falls in a size class (ROW_CLASSES); for each (bits, shape, group, class,
dtype, bias) every kernel that can run the layer is timed on the layer's own weights (`_probe`), and the
fastest is kept if it beat float by MARGIN: for the process (`CHOICES`) and in a file of measurements keyed
by the machine (CPU model and flags, torch's CPU capability and oneDNN's/MKL's ISA limits, torch version,
core count, the C kernels' source), `$MODELZIP_CACHE_DIR/wo_kernels.json` (default ~/.cache/modelzip), so
that every process on one machine runs a layer on the same kernel and gives the same output bits. Delete the
file to measure again; where it cannot be written, each process measures.

The probe runs on one thread, timed by that thread's CPU time: on a machine whose cores other processes
keep busy, wall-clock and two-thread timings are dominated by waiting. The cost: such contention at run
time hurts most the kernel that makes the most calls (int8pack, one per group: 0.05× fp32 measured on
this shared 2-core machine while other jobs ran, 1.4× on one thread), which the probe does not see: so it
only chooses int8pack where that is one call.

`MODELZIP_WO_KERNEL=<name>` forces a kernel for a process (read when a layer first runs on a call size; a
layer it cannot run falls back to float, with a note); `available()` answers whether this torch has a
kernel that runs here. The bf16 kernels agree with the dequantize-and-matmul reference within bf16
rounding of the activations (relative error about 3e-3; tests allow 1e-2); float is exact.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from modelzip_cli.kernels import choice, native

KERNEL_ENV = "MODELZIP_WO_KERNEL"
KERNELS = ("vnni4", "vnni8", "int4pack", "int8pack", "int8chan", "int8dyn", "bf16", "float")
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 CPU kernel takes
# (largest row count of the class, rows the probe times it at): decoding one token, a few rows, a batch
ROW_CLASSES = ((2, 1), (32, 16), (None, 128))
PROBE_ROUNDS = 5  # interleaved rounds; the fastest time of each kernel counts (noise only adds time)
PROBE_BYTES, PROBE_COPIES = 64 << 20, 64  # the weight copies a few-row probe cycles through (see _copies)
# A kernel replaces float only when it measured this many times faster: a near tie under a busy machine's
# noise must not pick a kernel that is slower in fact, nor flip the choice (and its rounding) between runs.
MARGIN = 1.25
# How the probe decides (part of the machine's key in the file of measurements): a change to its rules must
# measure again, not reuse what the old rules chose. 3: a one-thread winner on many rows is confirmed on the
# process's threads. 4: vnni4 joined the kernels. 5: vnni8 did.
PROBE_VERSION = 5
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # inputs the bf16 kernels may round
TINY = torch.finfo(torch.float32).tiny  # the smallest activation step (nn/int8.py's per-token layers' EPS)


@dataclass(frozen=True)
class Geometry:
    """What a kernel needs to know of a layer: (bits, in, out, stored group size, groups)."""

    bits: int
    in_features: int
    out_features: int
    group_size: int
    groups: int

    @property
    def padded(self) -> int:
        return self.groups * self.group_size


@dataclass
class Stored:
    """A weight-only layer's stored tensors: qweight (N, cols), scales and zero points (N, groups)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    dequantize: Callable[[], torch.Tensor]  # → the float32 weight (N, in)


Runner = Callable[[torch.Tensor], torch.Tensor]  # x (..., in) → (..., out) in x's dtype, bias added


@dataclass(frozen=True)
class Kernel:
    name: str
    unsupported: Callable[[Geometry, Stored], str | None]  # why it cannot run this layer, or None
    pack: Callable[[Geometry, Stored], tuple]
    # (geometry, packed, bias (out,) or None, the inputs' dtype) → the layer's call, everything it can settle
    # before seeing an input settled once: a call does no lookup, cast or allocation it does not need
    bind: Callable[[Geometry, tuple, torch.Tensor | None, torch.dtype], Runner]
    # whether the probe may choose it for a layer; else it runs only where forced
    auto: Callable[[Geometry], bool] = lambda geo: True


def _int4_group(geo: Geometry) -> int | None:
    """The kernel's group size that tiles the stored group (same scale repeated), or None; one that also
    divides the layer's width where there is one (a 576-wide layer in groups of 128 runs as 9 groups of 64,
    with no padding to copy into each input)."""
    fits = [g for g in INT4_GROUPS if geo.group_size % g == 0]
    return next((g for g in fits if geo.in_features % g == 0), fits[0] if fits else None)


def _int4_width(geo: Geometry, g: int) -> int:
    """The width K the kernel multiplies: the layer's own where groups of g tile it, else the padded one."""
    return geo.in_features if geo.in_features % g == 0 else geo.padded


def _unpacked_int4(geo: Geometry, qweight: torch.Tensor) -> torch.Tensor:
    """(N, cols) packed bytes → (N, padded) integers 0..15, low nibble first."""
    ints = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)
    return ints[:, : geo.padded]


def _int4_unsupported(geo: Geometry, w: Stored) -> str | None:
    if geo.bits != 4:
        return "int4 only"
    if _int4_group(geo) is None:
        return f"group {geo.group_size} is not a multiple of 32 (the int4 kernel takes groups of 32 to 256)"
    if geo.out_features % 16:
        return f"width {geo.out_features} is not a multiple of 16 (the int4 kernel's tile)"
    return None


def _int4_pack(geo: Geometry, w: Stored) -> tuple:
    g = _int4_group(geo)
    width = _int4_width(geo, g)
    ints = _unpacked_int4(geo, w.qweight)[:, :width].to(torch.int32)  # (N, K)
    # inner_k_tiles (the second argument) is ignored by the CPU packing: 1, 2, 4 and 8 timed alike
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints.contiguous(), 1)
    repeat = geo.group_size // g
    s = w.scales.float().repeat_interleave(repeat, dim=1)[:, : width // g]  # (N, K / g)
    zp = w.zero_points.float().repeat_interleave(repeat, dim=1)[:, : width // g]
    # the kernel computes (q − 8)·s + z; modelzip's (q − zp)·s is that with z = (8 − zp)·s
    scales_and_zeros = torch.stack([s, (8 - zp) * s], dim=-1).transpose(0, 1)  # (K / g, N, 2)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous(), g, width


def _bias(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The bias to add to outputs of `dtype`: the parameter itself (detached) where the dtypes agree."""
    return None if bias is None else bias.detach().to(dtype)


def _flat(run: Callable[[torch.Tensor], torch.Tensor], width: int, out: int) -> Runner:
    """A 2-D kernel made to take any (..., width) input, as F.linear does."""
    def call(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return run(x)
        return run(x.reshape(-1, width)).reshape(*x.shape[:-1], out)  # (..., in) → (M, in) → (..., out)
    return call


def _int4_bind(geo: Geometry, packed: tuple, bias: torch.Tensor | None, dtype: torch.dtype) -> Runner:
    weight, scales_and_zeros, g, width = packed
    mm, bf16, b, pad = torch.ops.aten._weight_int4pack_mm_for_cpu, torch.bfloat16, _bias(bias, dtype), \
        (0, width - geo.in_features)

    def run(x: torch.Tensor) -> torch.Tensor:  # (M, in) → (M, out)
        xk = x.to(bf16) if pad[1] == 0 else F.pad(x, pad).to(bf16)  # (M, K)
        y = mm(xk if xk.is_contiguous() else xk.contiguous(), weight, g, scales_and_zeros).to(dtype)
        return y if b is None else y.add_(b)
    return _flat(run, geo.in_features, geo.out_features)


def _int8_unsupported(geo: Geometry, w: Stored) -> str | None:
    if geo.bits != 8:
        return "int8 only"
    if geo.group_size % 16:  # torch 2.13's kernel crashes on rows whose width is not a multiple of 16
        return f"group {geo.group_size} is not a multiple of 16 (the int8 kernel's block)"
    if w.zero_points.any():  # modelzip writes symmetric int8; a file may hold zero points the kernel has no term for
        return "zero points other than 0 (the int8 kernel's weights are symmetric)"
    return None


def _aligned(q: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy: a tensor read from a file may start at any byte, and the int8 kernel's loads
    need alignment (a weight loaded from safetensors crashed it where the same weight built in memory ran)."""
    return q.clone(memory_format=torch.contiguous_format)


def _int8_pack(geo: Geometry, w: Stored) -> tuple:
    q = w.qweight.reshape(geo.out_features, geo.groups, geo.group_size)  # (N, groups, G)
    return _aligned(q.transpose(0, 1)), w.scales.t().to(torch.bfloat16).contiguous()  # (groups, N, G), (groups, N)


def _int8_bind(geo: Geometry, packed: tuple, bias: torch.Tensor | None, dtype: torch.dtype) -> Runner:
    q, scales = packed
    mm, bf16, b, groups, pad = torch.ops.aten._weight_int8pack_mm, torch.bfloat16, _bias(bias, dtype), \
        geo.groups, (0, geo.padded - geo.in_features)

    def run(x: torch.Tensor) -> torch.Tensor:  # (M, in) → (M, out)
        xg = (F.pad(x, pad) if pad[1] else x).to(bf16).reshape(x.shape[0], groups, -1)  # (M, groups, G)
        xg = xg.transpose(0, 1).contiguous()  # (groups, M, G)
        y = mm(xg[0], q[0], scales[0]).to(dtype if groups == 1 else torch.float32)
        for i in range(1, groups):
            y += mm(xg[i], q[i], scales[i])
        y = y.to(dtype)
        return y if b is None else y.add_(b)
    return _flat(run, geo.in_features, geo.out_features)


def _int8chan_unsupported(geo: Geometry, w: Stored) -> str | None:
    if geo.bits != 8:
        return "int8 only"
    if geo.groups == 1:
        return "one group per row already: int8pack runs it as stored"
    return None


def _requantized(geo: Geometry, w: Stored) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored weight requantized to one symmetric int8 scale per output channel, (N, in) and (N,):
    |Δw| ≤ half that scale (the largest group scale of the row), on top of the stored rounding."""
    weight = w.dequantize()  # (N, in)
    s = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
    return torch.clamp(torch.round(weight / s[:, None]), -127, 127).to(torch.int8), s


def _int8chan_pack(geo: Geometry, w: Stored) -> tuple:
    q, s = _requantized(geo, w)
    # the kernel takes widths in blocks of 16 (torch 2.13 crashes on others): zero columns against zero inputs
    return _aligned(F.pad(q, (0, -geo.in_features % 16))), s.to(torch.bfloat16)


def _int8chan_bind(geo: Geometry, packed: tuple, bias: torch.Tensor | None, dtype: torch.dtype) -> Runner:
    q, scales = packed
    mm, bf16, b, pad = torch.ops.aten._weight_int8pack_mm, torch.bfloat16, _bias(bias, dtype), \
        (0, q.shape[1] - geo.in_features)

    def run(x: torch.Tensor) -> torch.Tensor:  # (M, in) → (M, out)
        xk = x.to(bf16) if pad[1] == 0 else F.pad(x.to(bf16), pad)  # (M, K)
        y = mm(xk if xk.is_contiguous() else xk.contiguous(), q, scales).to(dtype)
        return y if b is None else y.add_(b)
    return _flat(run, geo.in_features, geo.out_features)


def _int8dyn_unsupported(geo: Geometry, w: Stored) -> str | None:
    if geo.bits != 8:  # int4 layers keep their activations in float (int4pack, bf16, float)
        return "int8 only"
    if geo.in_features % 8 or geo.out_features % 8:
        return f"{geo.in_features}×{geo.out_features} is not a multiple of 8 (the int8 GEMM's block)"
    return None


def _int8dyn_pack(geo: Geometry, w: Stored) -> tuple:
    """Per-channel symmetric int8 (K, N) for `_int_mm`, from the stored weight (requantized as int8chan's
    unless it is per-channel int8 already: then exactly the stored integers), and its float32 scales."""
    if geo.groups == 1 and not w.zero_points.any():
        q, s = w.qweight[:, : geo.in_features], w.scales[:, 0].float()
    else:
        q, s = _requantized(geo, w)
    return _aligned(q.t()), s.float()


def _int8dyn_bind(geo: Geometry, packed: tuple, bias: torch.Tensor | None, dtype: torch.dtype) -> Runner:
    qt, w_scales = packed  # (K, N) int8, (N,)
    b = None if bias is None else bias.detach().float()
    int_mm = torch._int_mm

    def run(x: torch.Tensor) -> torch.Tensor:  # (M, in) → (M, out)
        rows = x.float()
        s = rows.abs().amax(dim=1, keepdim=True).clamp_(min=TINY).div_(127)  # (M, 1): one scale per token
        q = torch.round(rows / s).to(torch.int8)  # |q| ≤ 127
        y = int_mm(q, qt).float().mul_(s * w_scales)  # (M, N)
        y = y if b is None else y.add_(b)
        return y.to(dtype)
    return _flat(run, geo.in_features, geo.out_features)


# The widest group whose int32 sums cannot wrap: each of 16 lanes adds GS/16 (int8) or GS/32 (int4, two chains)
# products of at most 255·128 (vnni8's offset activations) or 15·127: a whole row of 1 M int8 columns as one group
VNNI_MAX_GROUP = {8: 1 << 20, 4: 1 << 24}
VNNI4_GROUPS = (32, 64)  # and any multiple of 128 (wo4_vnni.c: one masked load for 32 and 64, else 64 bytes)


def _vnni4_unsupported(geo: Geometry, w: Stored) -> str | None:
    if geo.bits != 4:
        return "int4 only"
    if geo.group_size not in VNNI4_GROUPS and geo.group_size % 128:
        return f"group {geo.group_size} is not 32, 64 or a multiple of 128"
    if geo.group_size > VNNI_MAX_GROUP[4]:
        return f"group {geo.group_size} is wider than {VNNI_MAX_GROUP[4]} (the kernel's int32 sums of a group)"
    return native.wo4_vnni()[1] or None  # the reason it cannot run here, or "" when it can


def _vnni4_pack(geo: Geometry, w: Stored) -> tuple:
    # the stored integers as they are (no copy of the weight), and each group's scale · zero point
    scales = w.scales.float().contiguous()
    return w.qweight.contiguous(), scales, (scales * w.zero_points.float()).contiguous()


def _vnni_runner(fn, geo: Geometry, constants: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
                 dtype: torch.dtype) -> Runner:
    """The call of a wo4_vnni.c kernel `fn` over the layer's packed `constants` (their addresses passed first).

    Any (..., in) input as it is: the C code reads the columns past `in` of a padded group as zeros, and the
    call costs a decoding step's small layers more than their product (576→192: 7 µs of 16), so it does
    nothing it need not: no padding copy, no reshape, one allocation."""
    k, width, n, g = geo.padded, geo.in_features, geo.out_features, geo.group_size
    b = None if bias is None else bias.detach().float().contiguous()
    addresses = tuple(t.data_ptr() for t in constants)
    b_address = None if b is None else b.data_ptr()
    threads, fp32 = torch.get_num_threads, torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != width:  # as F.linear would: C reads rows of `width` floats and nothing checks them
            raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({x.shape[-1]} inputs to a "
                               f"{width}-wide layer)")
        xf = x if x.dtype == fp32 else x.float()
        xf = xf if xf.is_contiguous() else xf.contiguous()
        y = torch.empty(*x.shape[:-1], n, dtype=fp32, device="cpu")  # what C writes, whatever torch's defaults
        if fn(*addresses, xf.data_ptr(), b_address, y.data_ptr(), xf.numel() // width, n, k, width, g, threads()):
            raise MemoryError(f"no memory for the int{geo.bits} kernel's activations")
        return y if dtype == fp32 else y.to(dtype)
    run.keep = (*constants, b)  # the addresses above stay valid as long as the call lives
    return run


def _vnni4_bind(geo: Geometry, packed: tuple, bias: torch.Tensor | None, dtype: torch.dtype) -> Runner:
    return _vnni_runner(native.wo4_vnni()[0], geo, packed, bias, dtype)  # qweight, scales, scale · zero point


VNNI8_GROUP = 16  # wo8_vnni rounds activations 16 at a time: groups of a multiple of 16


def _vnni8_unsupported(geo: Geometry, w: Stored) -> str | None:
    if geo.bits != 8:
        return "int8 only"
    if geo.group_size % VNNI8_GROUP:
        return f"group {geo.group_size} is not a multiple of {VNNI8_GROUP}"
    if geo.group_size > VNNI_MAX_GROUP[8]:
        return f"group {geo.group_size} is wider than {VNNI_MAX_GROUP[8]} (the kernel's int32 sums of a group)"
    return native.wo8_vnni()[1] or None


def _vnni8_pack(geo: Geometry, w: Stored) -> tuple:
    # the stored integers as they are; per (row, group) its scale, scale · 128 · Σ q (what the activations'
    # +128 offset adds: wo4_vnni.c) and scale · zero point
    scales = w.scales.float().contiguous()
    sums = w.qweight.reshape(geo.out_features, geo.groups, geo.group_size).sum(-1, dtype=torch.int64).float()
    return (w.qweight.contiguous(), scales, (scales * 128 * sums).contiguous(),
            (scales * w.zero_points.float()).contiguous())


def _vnni8_bind(geo: Geometry, packed: tuple, bias: torch.Tensor | None, dtype: torch.dtype) -> Runner:
    return _vnni_runner(native.wo8_vnni()[0], geo, packed, bias, dtype)  # qweight, scales, offsets, zero terms


def _bf16_bind(geo: Geometry, packed: tuple, bias: torch.Tensor | None, dtype: torch.dtype) -> Runner:
    weight, bf16, b = packed[0], torch.bfloat16, _bias(bias, dtype)

    def run(x: torch.Tensor) -> torch.Tensor:  # N-D as F.linear
        y = F.linear(x.to(bf16), weight).to(dtype)
        return y if b is None else y.add_(b)
    return run


def _float_bind(geo: Geometry, packed: tuple, bias: torch.Tensor | None, dtype: torch.dtype) -> Runner:
    # what the layer computed before it had kernels, bit for bit, with nothing else in the call
    return functools.partial(F.linear, weight=packed[0].to(dtype), bias=_bias(bias, dtype))


KERNEL_TABLE = {k.name: k for k in (
    Kernel("vnni4", _vnni4_unsupported, _vnni4_pack, _vnni4_bind),
    Kernel("vnni8", _vnni8_unsupported, _vnni8_pack, _vnni8_bind),
    Kernel("int4pack", _int4_unsupported, _int4_pack, _int4_bind),
    # one call per group: a busy machine's contention at run time puts a many-call kernel far behind what the
    # one-thread probe saw (MLP at 2 threads: 0.08× fp32 forced at batch 1; chosen on AVX2 at batch 64, 0.35×);
    # int8chan is its one-call form
    Kernel("int8pack", _int8_unsupported, _int8_pack, _int8_bind, auto=lambda geo: geo.groups == 1),
    Kernel("int8chan", _int8chan_unsupported, _int8chan_pack, _int8chan_bind),
    # W8A8: rounding activations is a numerics change the user asks for, not the probe's to make
    Kernel("int8dyn", _int8dyn_unsupported, _int8dyn_pack, _int8dyn_bind, auto=lambda geo: False),
    Kernel("bf16", lambda geo, w: None, lambda geo, w: (w.dequantize().to(torch.bfloat16),), _bf16_bind),
    Kernel("float", lambda geo, w: None, lambda geo, w: (w.dequantize(),), _float_bind),
)}


@functools.cache
def available(name: str) -> bool:
    """Whether torch has kernel `name` and it runs on this machine (a tiny call, once per process)."""
    geo = Geometry(4 if name in ("vnni4", "int4pack") else 8, 64, 16, 32, 2)
    cols = 32 if geo.bits == 4 else 64
    w = Stored(torch.zeros(16, cols, dtype=torch.uint8 if geo.bits == 4 else torch.int8), torch.ones(16, 2),
               torch.zeros(16, 2, dtype=torch.int8), lambda: torch.zeros(16, 64))
    kernel = KERNEL_TABLE[name]
    try:
        with torch.no_grad():
            y = kernel.bind(geo, kernel.pack(geo, w), None, torch.float32)(torch.ones(1, 64))
    except Exception:  # a torch without the op, or a build/CPU it does not run on
        return False
    return tuple(y.shape) == (1, 16) and bool(torch.isfinite(y).all())


def use_kernel(name: str) -> contextlib.AbstractContextManager:
    """Run weight-only layers on kernel `name` inside the block (e.g. "float": the reference numerics an
    exported graph reproduces), whatever they chose."""
    if name not in KERNELS:
        raise ValueError(f"unknown weight-only kernel {name!r}")
    return choice.use(weight_only=name)


def forced() -> str | None:
    """The kernel a use_kernel() block or MODELZIP_WO_KERNEL forces, or None (auto). An unknown name in the
    environment is ignored as auto. A layer reads the environment when it first runs on a call size."""
    if scoped := choice.current().weight_only:
        return scoped
    name = os.environ.get(KERNEL_ENV, "auto")
    return name if name in KERNELS else None


def row_class(rows: int) -> int:
    """The index in ROW_CLASSES of a call on `rows` rows."""
    for i, (top, _) in enumerate(ROW_CLASSES):
        if top is None or rows <= top:
            return i
    raise AssertionError("the last row class takes every size")


def candidates(geo: Geometry, w: Stored, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """The kernels that can run this layer on inputs of `dtype`, and why each other one cannot."""
    ok, why = [], {}
    for name, kernel in KERNEL_TABLE.items():
        reason = kernel.unsupported(geo, w)
        if reason is None and name != "float" and dtype not in FAST_DTYPES:
            reason = f"{dtype} inputs stay in their own precision"
        if reason is None and not available(name):
            reason = "not available in this torch or on this CPU"
        if reason is None:
            ok.append(name)
        else:
            why[name] = reason
    return ok, why


CACHE_ENV = "MODELZIP_CACHE_DIR"
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")  # what oneDNN's and MKL's kernels may use


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelzip"
    return Path(root) / "wo_kernels.json"


@functools.cache
def machine_key() -> str:
    """What a measurement holds for: the CPU (model and flags), the kernels torch runs on it (its capability:
    ATEN_CPU_CAPABILITY=avx2 makes an AVX-512 machine run AVX2 code; oneDNN's and MKL's own limits), torch's
    version, the core count, the probe's rules (PROBE_VERSION) and modelzip's own C kernels' source."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    cpu = [ln for ln in info if ln.startswith(("model name", "flags"))][:2]
    limits = [os.environ.get(v, "") for v in ISA_LIMITS]
    text = "|".join([*cpu, torch.backends.cpu.get_cpu_capability(), *limits, torch.__version__, str(os.cpu_count()),
                     f"probe {PROBE_VERSION}", native.sources_key()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(key: str, name: str) -> None:
    """Add one measured choice to the machine's file (best effort: a read-only home only costs re-measuring)."""
    data = _read_cache()
    mine = data.get(machine_key())
    data[machine_key()] = {**(mine if isinstance(mine, dict) else {}), key: name}
    path = cache_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except OSError:
        tmp.unlink(missing_ok=True)


def _remembered(key: str) -> str | None:
    mine = _read_cache().get(machine_key())
    name = mine.get(key) if isinstance(mine, dict) else None
    return name if name in KERNEL_TABLE else None


# (geometry, row class, dtype) → the kernel measured fastest on this machine, in this process
CHOICES: dict[tuple, str] = {}


_LIVE: weakref.WeakSet[LayerKernels] = weakref.WeakSet()  # the kernels of every weight-only layer alive here


def working_set() -> int:
    """Bytes of the float32 weights of every weight-only layer alive in this process: whether a layer's
    weights are still in cache when it runs again."""
    return sum(4 * k.geo.in_features * k.geo.out_features for k in list(_LIVE))


@functools.cache
def l2_bytes() -> int:
    """The CPU's L2 caches together (per core × cores), from sysfs; 1 MiB a core where it does not say."""
    per_core = 1 << 20
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                per_core = int(size.rstrip("KMB")) << (20 if size.endswith("M") else 10)
        except (OSError, ValueError):
            pass
    return per_core * (os.cpu_count() or 1)


def _copies(packed: tuple, rows: int, cold: bool) -> list[tuple]:
    """Copies of a packed weight to cycle through while timing, for a layer of a model too big for the L2
    caches (`cold`): there a layer's weights come from memory, not from a cache warmed by the call before
    (a 576×576 fp32 GEMV measured 23 µs cache-hot and 164 µs cycling through 60 copies; int4pack 28 and 24).
    In a model that fits (the digits MLP, 0.8 MB) the weights stay hot, where float wins small layers
    (64×512: int4pack 0.6× float hot, 1.3× cold). Few rows only: many rows are bound by arithmetic."""
    size = sum(t.numel() * t.element_size() for t in packed if isinstance(t, torch.Tensor))
    few = cold and rows < ROW_CLASSES[-1][1]
    count = max(1, min(PROBE_COPIES, PROBE_BYTES // max(size, 1))) if few else 1
    return [packed] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in packed)
                       for _ in range(count - 1)]


def _best_times(calls: dict[str, list[Runner]], x: torch.Tensor, threads: int, clock: Callable[[], float],
                rounds: int = PROBE_ROUNDS) -> dict[str, float]:
    """name → its fastest round's seconds a call, on `threads` threads timed by `clock`, interleaved rounds,
    each round a pass over the kernel's copies."""
    best = {name: float("inf") for name in calls}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for each in calls.values():  # warm-up: first calls allocate
                each[0](x)
            for _ in range(rounds):
                for name, each in calls.items():
                    t0 = clock()
                    for call in each:
                        call(x)
                    best[name] = min(best[name], (clock() - t0) / len(each))
    finally:
        torch.set_num_threads(old_threads)
    return best


def _probe(geo: Geometry, packs: dict[str, tuple], rows: int, dtype: torch.dtype, bias: torch.Tensor | None,
           cold: bool) -> str:
    """The fastest of `packs` on `rows` random rows, bias added as the layer adds it (free in float's
    product, a pass of its own after a packed kernel), if it beats float by MARGIN; else float. One thread
    (where a busy machine's noise is smallest: two threads wait for each other whenever either is
    descheduled), timed by the CPU time of that thread (the time it waited for a core does not count),
    interleaved rounds, the fastest round of each, each round a pass over copies.

    On many rows (arithmetic-bound), a winner other than float is then timed against float once more on the
    threads the process runs with (wall clock, the fastest round): a kernel that does not spread over threads
    as float's GEMM does wins on one thread and loses on two (int8chan at 128 rows on AVX2 kernels: chosen,
    and the MLP ran 0.72× fp32). It stays only if it is still faster there. Few rows are bound by reading
    the weights, where one thread's ranking held on two (confirming there moved 60 of a decoder's 210 layers
    to float, and its decode went from 1.68× to 1.47× fp32)."""
    x = torch.randn(rows, geo.in_features).to(dtype)
    calls = {name: [KERNEL_TABLE[name].bind(geo, each, bias, dtype) for each in _copies(packed, rows, cold)]
             for name, packed in packs.items()}
    best = _best_times(calls, x, 1, time.thread_time)
    fastest = min(best, key=best.get)
    if "float" not in best:
        return fastest
    if fastest == "float" or best[fastest] * MARGIN >= best["float"]:
        return "float"
    threads = torch.get_num_threads()
    if threads > 1 and rows >= ROW_CLASSES[-1][1]:  # many rows: bound by arithmetic, which threads share
        both = _best_times({fastest: calls[fastest], "float": calls["float"]}, x, threads, time.perf_counter)
        if both[fastest] >= both["float"]:
            return "float"
    return fastest


def tracing() -> bool:
    """Whether this call is being traced (torch.jit, torch.compile, torch.export): the graph should hold the
    stored integers and their dequantization, not a kernel's packed copy."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def versions(*tensors: torch.Tensor | None) -> tuple:
    """Each tensor's version counter (bumped by every write in place: `qweight.copy_(…)`), None for None or an
    inference tensor (which keeps no counter): a layer's packed copies and bound calls are rebuilt when these
    change, so a weight written in place is the weight that runs."""
    out = []
    for t in tensors:
        try:
            out.append(None if t is None else t._version)
        except RuntimeError:  # an inference tensor
            out.append(None)
    return tuple(out)


FAST_ENTRIES = 64  # input sizes a layer remembers the call of (generation without a KV cache grows its input)


class LayerKernels:
    """One weight-only layer's kernels: which runs each row class, the packed tensors, built at first use
    from the stored tensors and kept while those are the same tensors (a load, .to() or assignment clears
    it), and the bound calls: `fast` maps an input's element count to the call that runs it, for inputs of
    `dtype` under use_kernel block `scope`, so that a layer's forward is one lookup and the kernel."""

    def __init__(self, geo: Geometry, among: tuple[str, ...] | None = None):
        self.geo = geo
        # the only kernels this layer may run (None: every kernel, float the fallback). A W8A8 layer's are the
        # ones with its own numerics (int8 activations per row: vnni8 with one group a row, int8dyn); they are
        # chosen by the probe whatever their `auto`, never forced by MODELZIP_WO_KERNEL, and with none able
        # to run a call `choose` answers None (the layer computes it itself)
        self.among = among
        _LIVE.add(self)
        self._stored: Stored | None = None
        self.versions: tuple | None = None  # the stored tensors' and bias's version counters when they were taken
        self.packed: dict[str, tuple[Stored, tuple]] = {}  # kernel → (the stored tensors it was packed from, packed)
        self.chosen: dict[tuple, str | None] = {}  # (row class, dtype, forced kernel or None) → kernel
        self.notes: dict[str, str] = {}  # kernel forced but unusable → why
        self._forget_calls()

    def _forget_calls(self) -> None:
        self.bound: dict[tuple[str, torch.dtype], Runner] = {}
        self.modes: dict[tuple, dict[int, Runner]] = {}  # (dtype, scope) → {input numel → call}
        self.fast: dict[int, Runner] = {}
        self.dtype: torch.dtype | None = None
        self.scope: str | None = None

    def stored(self, qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
               dequantize: Callable[[], torch.Tensor], bias: torch.Tensor | None = None) -> Stored:
        """The layer's stored tensors, as one object kept while they are the same tensors, unwritten (packs and
        bound calls follow it; `versions` is what the layer's forward compares before a bound call)."""
        w, now = self._stored, versions(qweight, scales, zero_points, bias)
        if w is None or w.qweight is not qweight or w.scales is not scales or w.zero_points is not zero_points \
                or now != self.versions:
            w = self._stored = Stored(qweight, scales, zero_points, dequantize)
            self._forget_calls()
            self.versions = now
        return w

    def _pack(self, name: str, geo: Geometry, w: Stored) -> tuple:
        hit = self.packed.get(name)
        if hit is None or hit[0] is not w:
            with torch.inference_mode(False), torch.no_grad():
                hit = self.packed[name] = (w, KERNEL_TABLE[name].pack(geo, w))
        return hit[1]

    def choose(self, geo: Geometry, w: Stored, rows: int, dtype: torch.dtype, bias: torch.Tensor | None
               ) -> str | None:
        """The kernel for a call on `rows` rows of `dtype`: forced, else cached, else measured now (None: a
        layer limited to kernels of its own numerics that none of them can run)."""
        cls, want = row_class(rows), None if self.among else forced()
        if (cls, dtype, want) in self.chosen:
            return self.chosen[cls, dtype, want]
        ok, why = candidates(geo, w, dtype)
        if self.among is not None:
            ok = [n for n in ok if n in self.among]
            if not ok:
                self.chosen[(cls, dtype, want)] = None
                return None
        if want is not None:
            name = want if want in ok else "float"
            if want not in ok:
                self.notes[want] = why[want]
        else:
            cold = working_set() > l2_bytes()
            key = (geo, cls, dtype, bias is not None, cold, self.among)
            allowed = [n for n in ok if self.among is not None or KERNEL_TABLE[n].auto(geo)]
            text = "/".join(map(str, (*astuple(geo), cls, str(dtype).removeprefix("torch."),
                                      "bias" * (bias is not None), "cold" if cold else "hot",
                                      *(["among " + "+".join(self.among)] if self.among else []))))
            name = CHOICES.get(key) or _remembered(text)
            if name is None or name not in allowed:
                packs = {n: self._pack(n, geo, w) for n in allowed}
                name = _probe(geo, packs, ROW_CLASSES[cls][1], dtype, bias, cold)
                _remember(text, name)
                for loser in set(packs) - {name} - set(self.chosen.values()):
                    self.packed.pop(loser, None)  # keep only what runs
            CHOICES[key] = name
        self.chosen[(cls, dtype, want)] = name
        return name

    def call(self, geo: Geometry, w: Stored, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., out) in x's dtype, bias added; the call is kept in `fast` for the next input
        of this size."""
        dtype, scope = x.dtype, choice.current().weight_only
        name = self.choose(geo, w, x.numel() // geo.in_features, dtype, bias)
        run = self.bound.get((name, dtype))
        if run is None:
            run = self.bound[name, dtype] = KERNEL_TABLE[name].bind(geo, self._pack(name, geo, w), bias, dtype)
        if (dtype, scope) != (self.dtype, self.scope):
            self.fast = self.modes.setdefault((dtype, scope), {})
            self.dtype, self.scope = dtype, scope
        if len(self.fast) < FAST_ENTRIES:
            self.fast[x.numel()] = run
        return run(x)

    def __deepcopy__(self, memo) -> LayerKernels:
        return LayerKernels(self.geo, self.among)

    def __getstate__(self) -> dict:
        return {"geo": self.geo, "among": self.among}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["geo"], state.get("among"))
