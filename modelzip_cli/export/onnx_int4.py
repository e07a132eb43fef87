"""int4 weight-only Linears in ONNX as ONNX Runtime's `com.microsoft::MatMulNBits`: the packed nibbles, scales
and zero points modelzip stores, handed over without rounding anything again.

modelzip's int4 layout (nn/weight_only.py's WeightOnlyLinear): per output row, integers 0..15 in groups of
`group_size` input columns (the last group padded with the zero point), two per byte, low nibble first, one
float32 scale and one zero point per group; w = (q − zero_point) · scale. MatMulNBits (bits 4) reads B as
(N, blocks, block_size / 2) bytes in the same nibble order, scales (N · blocks) and zero points packed two per
byte (low nibble the even block), the same formula. A block is `block_size` columns, a power of two of at least
16; a modelzip group that is a whole number of such blocks maps exactly (each block takes its group's scale and
zero point), so block_size is the largest power of two ≤ MAX_BLOCK that divides the group. A group size with no
such divisor (an odd width, say) cannot be cut into blocks: that layer is exported with its dequantized float
weight, as are int4 embedding tables (a lookup, not a product), and the export's notes say so.
"""

from __future__ import annotations

import torch
from torch import nn

from modelzip_cli.nn.weight_only import WeightOnlyEmbedding, WeightOnlyLinear

MAX_BLOCK = 256  # ONNX Runtime's CPU kernels take block sizes 16 … 256
MIN_BLOCK = 16


def block_size(group_size: int) -> int | None:
    """The largest power of two in [MIN_BLOCK, MAX_BLOCK] dividing `group_size`, or None."""
    b = MAX_BLOCK
    while b >= MIN_BLOCK:
        if group_size % b == 0:
            return b
        b //= 2
    return None


@torch.library.custom_op("modelzip::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 k: int, n: int, block: int) -> torch.Tensor:
    """x (..., K) @ the int4 weight (N, K)ᵀ: MatMulNBits in ONNX; here its arithmetic, for eager runs."""
    rows, blocks = packed.shape[0], packed.shape[1]
    ints = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(rows, blocks, block).float()  # (N, blocks, b)
    zp = torch.stack([zero_points & 0x0F, zero_points >> 4], dim=-1).reshape(rows, -1)[:, :blocks].float()
    w = ((ints - zp[..., None]) * scales.reshape(rows, blocks, 1)).reshape(rows, -1)[:, :k]  # (N, K)
    return x @ w.t()


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, k, n, block):
    return x.new_empty((*x.shape[:-1], n))


def _register_schema() -> None:
    """MatMulNBits' signature in onnx's schema registry (onnx knows only the standard domains; onnxscript builds
    a node from a registered schema). The part of ONNX Runtime's contrib schema modelzip writes: A, B, scales,
    zero_points; attributes K, N, bits, block_size."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T2")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], "activations and scales"),
                          ("T2", ["tensor(uint8)"], "packed nibbles")],
        attributes=[attr(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")])
    onnx.defs.register_schema(schema)


def translations() -> dict:
    """modelzip::matmul_nbits → com.microsoft::MatMulNBits (onnxscript, for torch's exporter)."""
    from onnxscript.values import Opset

    _register_schema()
    msft = Opset("com.microsoft", 1)

    def matmul(x, packed, scales, zero_points, k: int, n: int, block: int):
        return msft.MatMulNBits(x, packed, scales, zero_points, K=k, N=n, bits=4, block_size=block)

    return {torch.ops.modelzip.matmul_nbits.default: matmul}


class MatMulNBitsLinear(nn.Module):
    """Export-only twin of an int4 WeightOnlyLinear: its stored integers as MatMulNBits inputs."""

    def __init__(self, m: nn.Module, block: int):
        super().__init__()
        self.in_features, self.out_features, self.block = m.in_features, m.out_features, block
        groups = m.scales.shape[1]
        per_group = m.group_size // block  # blocks in one modelzip group
        blocks = groups * per_group
        n = m.out_features
        packed = m.qweight[:, : groups * m.group_size // 2].contiguous()  # (N, padded K / 2)
        self.register_buffer("packed", packed.reshape(n, blocks, block // 2).clone())  # (N, blocks, b/2) uint8
        scales = m.scales.float().repeat_interleave(per_group, dim=1)  # (N, blocks)
        self.register_buffer("scales", scales.reshape(-1).clone())  # (N · blocks,)
        zp = m.zero_points.to(torch.uint8).repeat_interleave(per_group, dim=1)  # (N, blocks), 0..15
        if blocks % 2:
            zp = torch.cat([zp, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
        self.register_buffer("zero_points", (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1).clone())  # (N · ⌈blocks/2⌉,)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = matmul_nbits(x.float(), self.packed, self.scales, self.zero_points, self.in_features,
                         self.out_features, self.block)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)


def float_twin(m: nn.Module) -> nn.Linear:
    """A float Linear holding `m`'s dequantized weight (a group size no block size divides)."""
    layer = nn.Linear(m.in_features, m.out_features, m.bias is not None)
    with torch.no_grad():
        layer.weight.copy_(m.dequantized_weight().float())
        if m.bias is not None:
            layer.bias.copy_(m.bias.float())
    return layer


def swap_int4(model: nn.Module, replace) -> list[str]:
    """Every int4 weight-only Linear of `model` (a copy) replaced in place by its MatMulNBits twin (or, when no
    block size fits its groups, a float Linear); the notes that say which."""
    fallback, blocks, tables = [], set(), []
    for name, m in list(model.named_modules()):
        if not isinstance(m, WeightOnlyLinear) or m.bits != 4:
            continue
        if isinstance(m, WeightOnlyEmbedding):  # a lookup, not a MatMul: the dequantized table
            replace(model, name, nn.Embedding.from_pretrained(m.dequantized_weight().float(), freeze=True,
                                                              padding_idx=m.padding_idx))
            tables.append(name)
            continue
        b = block_size(m.group_size)
        if b is None:
            replace(model, name, float_twin(m))
            fallback.append(f"{name} (group {m.group_size})")
        else:
            replace(model, name, MatMulNBitsLinear(m, b))
            blocks.add(b)
    notes = []
    if blocks:
        notes.append("int4 weight-only Linears as com.microsoft MatMulNBits (bits 4, block size "
                     + ", ".join(str(b) for b in sorted(blocks)) + "): modelzip's packed nibbles, scales and zero "
                     "points as stored")
    if fallback:
        notes.append(f"{len(fallback)} int4 layer(s) stored as float in the ONNX file: no power-of-two block of "
                     f"{MIN_BLOCK}–{MAX_BLOCK} columns divides their group size: " + ", ".join(fallback[:5]))
    if tables:
        notes.append(f"{len(tables)} int4 embedding table(s) stored as float in the ONNX file (MatMulNBits is a "
                     "matrix product, not a lookup): " + ", ".join(tables[:5]))
    return notes
