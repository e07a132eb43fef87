"""Weight-only int4/int8 modules (W4A16, W8A16) and round-to-nearest.

The stored format: integers (int4 packed two per byte, or int8), one float32 scale and one zero point per
group of `group_size` input columns. The layer computes with the kernel that `kernels.weight_only` chose
for this machine; replays build the same empty modules that the stored tensors then fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.errors import InputError
from modelzip_cli.kernels import choice, native
from modelzip_cli.kernels import weight_only as wo_kernels
from modelzip_cli.nn.packed import PackedWeights


@dataclass
class Quantized:
    """What GPTQ (or round-to-nearest) chose for one (out, in) weight."""

    ints: torch.Tensor  # (out, in) integers (int64, or int8 / uint8 from `rtn`): 0..15 for 4 bits, −127..127 for 8
    scales: torch.Tensor  # (out, groups) float32
    zero_points: torch.Tensor  # (out, groups) int64; 0 for 8 bits

    def to(self, device: torch.device) -> Quantized:
        return Quantized(self.ints.to(device), self.scales.to(device), self.zero_points.to(device))

    def dequantized(self, group_size: int) -> torch.Tensor:
        """(ints − zero point) · scale, (out, in) float32: group by group, so that the only temporary as large
        as the weight is the result (integers and zero points are exact in float32)."""
        cols = self.ints.shape[1]
        w = self.ints.float()  # the result, written in place
        for g, start in enumerate(range(0, cols, group_size)):
            part = w[:, start:start + group_size]
            part.sub_(self.zero_points[:, g:g + 1].float()).mul_(self.scales[:, g:g + 1])
        return w



def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` (out, g): int4 asymmetric over [min, max] ∪ {0}, int8 symmetric."""
    if bits == 8:
        return w.abs().amax(-1).clamp(min=1e-12) / 127, torch.zeros(w.shape[0], dtype=torch.int64, device=w.device)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    return scale, torch.clamp(torch.round(-lo / scale), 0, 15).to(torch.int64)



def to_ints(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers for `w` (out,) or (out, g) under per-row scale and zero point."""
    if w.ndim == 2:
        scale, zero = scale[:, None], zero[:, None]
    if bits == 8:
        return torch.clamp(torch.round(w / scale), -127, 127).to(torch.int64)
    return torch.clamp(torch.round(w / scale) + zero, 0, 15).to(torch.int64)



def rtn(weight: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """Round to nearest, group by group: the baseline GPTQ improves on."""
    w = weight.detach().float()
    out, cols = w.shape
    groups = math.ceil(cols / group_size)
    if groups > 1 and cols % group_size == 0:  # every group at once, the same arithmetic as below
        wg = w.reshape(out, groups, group_size)  # (out, groups, size)
        # One float temporary, rounded in place, then the narrowest integer type that holds the values (int8
        # for 8 bits, uint8 for 4): the same integers as int64 at an eighth of the memory (a 7B model's MLP
        # weight would otherwise take 360 MB per temporary)
        if bits == 8:
            scales = wg.abs().amax(-1).clamp(min=1e-12) / 127
            zeros = torch.zeros(out, groups, dtype=torch.int64, device=w.device)
            ints = torch.div(wg, scales[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        else:
            lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
            scales = ((hi - lo) / 15).clamp(min=1e-12)
            zeros = torch.clamp(torch.round(-lo / scales), 0, 15).to(torch.int64)
            ints = torch.div(wg, scales[..., None]).round_().add_(zeros[..., None]).clamp_(0, 15).to(torch.uint8)
        return Quantized(ints.reshape(out, cols), scales, zeros)
    ints = torch.empty(out, cols, dtype=torch.int64, device=w.device)
    scales = torch.empty(out, groups, device=w.device)
    zeros = torch.empty(out, groups, dtype=torch.int64, device=w.device)
    for g in range(groups):
        part = w[:, g * group_size:(g + 1) * group_size]
        scales[:, g], zeros[:, g] = group_params(part, bits)
        ints[:, g * group_size:(g + 1) * group_size] = to_ints(part, scales[:, g], zeros[:, g], bits)
    return Quantized(ints, scales, zeros)


NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what kernels/rtn.c reads, by its dtype code
NATIVE_MAX_GROUP = 1 << 14  # a group is widened on the C stack: at most 64 KB


class WeightOnlyLinear(PackedWeights, nn.Module):
    """A Linear whose weight is stored as int8, or int4 packed two per byte, with per-group scales. It runs
    on the kernel measured fastest here for its shape and the call's row count (`kernel_for`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int, *,
                 fill: bool = True):
        """`fill=False`: the stored tensors are left as allocated, for a caller that writes every value (saves a
        pass over a 7B model's memory)."""
        super().__init__()
        new = torch.zeros if fill else torch.empty
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if 0 < group_size < in_features else in_features
        groups = math.ceil(in_features / self.group_size)
        padded = groups * self.group_size
        cols = padded if bits == 8 else math.ceil(padded / 2)
        self.register_buffer("qweight", new(out_features, cols, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups) if fill else torch.empty(out_features, groups))
        self.register_buffer("zero_points", new(out_features, groups, dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scheme = f"int{bits} weight-only (group {self.group_size})"
        self._geo = wo_kernels.Geometry(bits, in_features, out_features, self.group_size, groups)
        self._kernels = wo_kernels.LayerKernels(self._geo)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int) -> WeightOnlyLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, fill=False)
        q._quantize_from(linear.weight)  # writes every stored value
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @classmethod
    def from_quantized(cls, linear: nn.Linear, q: Quantized, bits: int, group_size: int) -> WeightOnlyLinear:
        """The layer for integers chosen elsewhere (GPTQ), on this layer's groups."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        layer._store(q)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _quantize_from(self, weight: torch.Tensor) -> None:
        """Fill qweight, scales and zero points from a float (out, in) weight, rounding to nearest."""
        if not self._quantize_natively(weight):
            self._store(rtn(weight, self.bits, self.group_size))

    def _quantize_natively(self, weight: torch.Tensor) -> bool:
        """`rtn` and `_store` in one pass of modelzip's C code (kernels/rtn.c) over a float32 or bfloat16
        weight, written straight into the stored tensors: the same bits, without the float32 copy, the
        temporaries and the packing pass (a 4096 × 11008 bf16 weight on 2 threads: 0.023 s, torch 0.25 s). False
        where it does not apply (another dtype or device, groups that do not tile the width, no C compiler,
        a value that is not finite): then torch's `rtn` does it."""
        w, g = weight.detach(), self.group_size
        if w.device.type != "cpu" or w.dtype not in NATIVE_DTYPES or self.in_features % g or g % 2 \
                or g > NATIVE_MAX_GROUP or self.qweight.device.type != "cpu":
            return False
        lib = native.rtn()
        if lib is None:
            return False
        w = w.contiguous()
        rows, cols = w.shape
        dtype, threads = NATIVE_DTYPES.index(w.dtype), torch.get_num_threads()
        if self.bits == 4:
            nonzero = lib.rtn4(w.data_ptr(), dtype, rows, cols, g, self.qweight.data_ptr(), self.scales.data_ptr(),
                          self.zero_points.data_ptr(), threads)
        else:
            self.zero_points.zero_()
            nonzero = lib.rtn8(w.data_ptr(), dtype, rows, cols, g, self.qweight.data_ptr(), self.scales.data_ptr(),
                               threads)
        if nonzero < 0:
            return False
        q, zps = self.qweight, self.zero_points
        self._counted = (q, q._version, zps, zps._version, nonzero)  # weight_figures without another pass
        return True

    def _store(self, q: Quantized) -> None:
        """Write integers (out, in), scales and zero points (out, groups) into the stored layout: columns
        padded to whole groups (with the value a zero weight takes), int4 packed two per byte."""
        pad = self.scales.shape[1] * self.group_size - self.in_features
        if self.bits == 8:
            ints = F.pad(q.ints, (0, pad), value=0) if pad else q.ints
        else:
            ints = torch.cat([q.ints, q.zero_points[:, -1:].expand(-1, pad).to(q.ints.dtype)], dim=1) if pad else q.ints
        if self.bits == 8:
            self.qweight.copy_(ints.to(torch.int8))
        else:
            if ints.shape[1] % 2:
                ints = F.pad(ints, (0, 1))
            ints = ints.to(torch.uint8)
            self.qweight.copy_(ints[:, 0::2] | (ints[:, 1::2] << 4))  # two 4-bit values per byte
        self.scales.copy_(q.scales)
        self.zero_points.copy_(q.zero_points.to(torch.int8))

    def dequantized_weight(self) -> torch.Tensor:
        return self._dequantize(self.qweight, self.scales, self.zero_points)

    def weight_figures(self) -> tuple[list[int], int]:
        """Shape and non-zeros without dequantizing: a weight is zero where its integer equals its group's
        zero point (0 for int8; scales are positive), and padding columns hold that value."""
        rows, groups = self.scales.shape
        q, zps = self.qweight, self.zero_points
        counted = self.__dict__.get("_counted")
        if counted is not None and counted[0] is q and counted[2] is zps and counted[1] == q._version \
                and counted[3] == zps._version:  # counted as it was written, unchanged since
            return [self.out_features, self.in_features], counted[4]
        if self.bits == 4 and q.is_cpu and q.is_contiguous() and zps.is_contiguous() and zps.is_cpu \
                and q.shape[1] % groups == 0 \
                and (lib := native.rtn()) is not None:  # one pass in C, no temporaries (7 ms for 45 M weights)
            count = lib.count4(q.data_ptr(), zps.data_ptr(), rows, groups, q.shape[1] // groups,
                               torch.get_num_threads())
            return [self.out_features, self.in_features], int(count)
        zp = self.zero_points.to(self.qweight.dtype)[..., None]
        g = self.qweight.reshape(rows, groups, -1)  # a byte's two int4 values are in the same (even) group
        parts = [g] if self.bits == 8 else [g & 0x0F, g >> 4]
        return [self.out_features, self.in_features], sum(int(torch.count_nonzero(p != zp)) for p in parts)

    def _dequantize(self, qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
        """Float rows (R, in) from R stored rows: packed integers (R, cols), scales and zero points (R, groups)."""
        rows = qweight.shape[0]
        if self.bits == 8:
            ints = qweight.float()
        else:
            ints = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(rows, -1)
            ints = ints[:, : scales.shape[1] * self.group_size].float()
        g = ints.reshape(rows, -1, self.group_size)  # (R, groups, group)
        w = (g - zero_points.float()[..., None]) * scales.float()[..., None]
        return w.reshape(rows, -1)[:, : self.in_features]

    def _stored(self) -> wo_kernels.Stored:
        b = self._buffers
        return self._kernels.stored(b["qweight"], b["scales"], b["zero_points"], self.dequantized_weight, self.bias)

    def kernel_for(self, rows: int, dtype: torch.dtype = torch.float32) -> str:
        """The kernel a call on `rows` rows of `dtype` runs on (measured on first asking, then kept)."""
        return self._kernels.choose(self._geo, self._stored(), rows, dtype, self.bias)

    def kernel_notes(self) -> dict[str, str]:
        """kernel → why this layer could not run it (a kernel MODELZIP_WO_KERNEL forced)."""
        return dict(self._kernels.notes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the call bound for inputs of this size, dtype and use_kernel block (everything settled once), unless
        # autograd or a trace must see the dequantization; anything else goes through _forward
        # and the stored tensors unwritten since (their version counters: 0.3 µs of a decoding call's 11)
        k, b = self._kernels, self._buffers
        run = k.fast.get(x.numel())
        if run is not None and x.dtype == k.dtype and x.is_cpu and choice.current().weight_only == k.scope \
                and not torch.is_grad_enabled() and not wo_kernels.tracing() \
                and k.versions == wo_kernels.versions(b["qweight"], b["scales"], b["zero_points"], self.bias):
            return run(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        differentiable = torch.is_grad_enabled() and (x.requires_grad or self.bias is not None
                                                      and self.bias.requires_grad)
        if differentiable or wo_kernels.tracing() or x.numel() == 0 or not x.is_cpu or not self.qweight.is_cpu:
            # autograd, an export (the graph holds the stored integers and their dequantization), or not a CPU
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        return self._kernels.call(self._geo, self._stored(), self.bias, x)

    def __setattr__(self, name: str, value) -> None:
        if name in ("qweight", "scales", "zero_points", "bias") and "_kernels" in self.__dict__:
            self._kernels = wo_kernels.LayerKernels(self._geo)  # packed copies and bound calls follow the new tensor
            self.__dict__.pop("_counted", None)  # nor keep the old tensor alive
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: packed tensors must follow
        self._kernels = wo_kernels.LayerKernels(self._geo)
        self.__dict__.pop("_counted", None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernels = wo_kernels.LayerKernels(self._geo)
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme}"



class WeightOnlyEmbedding(WeightOnlyLinear):
    """An Embedding whose table is stored as WeightOnlyLinear stores a weight (one row per token); a lookup
    dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 padding_idx: int | None = None):
        super().__init__(embedding_dim, num_embeddings, False, bits, group_size)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.scheme = f"int{bits} weight-only embedding (group {self.group_size})"

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int) -> WeightOnlyEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, emb.padding_idx)
        q._quantize_from(emb.weight)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # (...,) → (M,)
        rows = self._dequantize(self.qweight[flat], self.scales[flat], self.zero_points[flat])  # (M, dim)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme}"



def check_embedding(emb: nn.Embedding) -> None:
    if emb.max_norm is not None:
        raise InputError("weight-only quantization of an Embedding with max_norm (renormalized at lookup) is not "
                         "supported", hint="leave it out with --exclude")
