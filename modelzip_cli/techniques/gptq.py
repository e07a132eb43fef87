"""GPTQ and SparseGPT (Frantar et al. 2022, 2023), and Wanda's score (Sun et al. 2023).

GPTQ: integer weights chosen column by column so that the layer's output on the
calibration inputs moves least, each column's rounding error spread over the columns not yet quantized
through the inverse Hessian of the layer's input, H = 2·XᵀX / n.

The integers, scales and zero points are the weight-only format's (int4: 0..15 with a zero point per group,
int8: symmetric ±127), so a GPTQ layer is a `WeightOnlyLinear` that every loader and exporter already reads.
Groups are contiguous runs of `group_size` input columns in the stored order. Without `act_order` a group's
scale is chosen when its first column is reached, from the already-updated weights (the paper's way); with
`act_order` (columns taken in decreasing Hessian diagonal) every group's scale is fixed first from the
original weights ("static groups"), so the file's layout never depends on the order of work.

SparseGPT: the same column-by-column walk, zeroing instead of rounding: in each block of columns the
weights with the least w² / [H⁻¹]ᵢᵢ are pruned and the error is spread the same way. Wanda: a weight's score
is |w| times the norm of its input channel over the calibration set (√ of the Hessian's diagonal), and each
output row keeps its highest scores.
"""

from __future__ import annotations

import math

import torch

from modelzip_cli.nn.weight_only import Quantized, group_params


def _inverse_factor(h: torch.Tensor, w: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened H⁻¹ (in, in); inputs that were always zero made exact (in place
    on `h` and `w`)."""
    dead = torch.diag(h) == 0  # inputs that were always zero: any value there is exact
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(h.shape[0], device=h.device) * damp * torch.mean(torch.diag(h))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


# Columns whose pruning mask is chosen at once, from the weights as the updates of the columns before have left
# them (the paper's adaptive mask selection, Bs = 128 there on layers 768 to 12,288 wide). Chosen every 32: on
# the sample decoder, whose layers are 128 and 384 wide (128 is a whole row there: one mask, never adapted),
# held-out perplexity at 50 % +3.60 % with 128, +2.84 % 64, +2.55 % 32, +2.91 % 16; on the same architecture
# trained on ten times the text +33.9 % with 128, +30.2 % with 32; all-MiniLM-L6-v2 (384 and 1,536 wide)
# embedding cosine 0.9188 with 128, 0.9209 with 32.
MASK_BLOCK = 32


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, *, damp: float = 0.01,
              block: int = 128, mask_block: int = MASK_BLOCK) -> torch.Tensor:
    """SparseGPT of one (out, in) weight given its input Hessian: the new weight, with `ratio` of each run of
    `mask_block` columns zeroed and the other weights updated to keep the layer's output (updates applied
    lazily, `block` columns at a time)."""
    w = weight.detach().float().clone()
    out, cols = w.shape
    hinv = _inverse_factor(hessian.float().clone(), w, damp)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        prune = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % mask_block == 0:  # the next run's mask, from the weights as updated so far
                j = min(i + mask_block, i2 - i1)
                score = w1[:, i:j] ** 2 / d[None, i:j] ** 2  # (out, run): the output error pruning each costs
                # the run's share of the layer's int(out · cols · ratio) zeros, so that rounding never adds up
                k = int(out * (i1 + j) * ratio) - int(out * (i1 + i) * ratio)
                if k:
                    run = torch.zeros_like(score, dtype=torch.bool)
                    run.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
                    prune[:, i:j] = run
            q = torch.where(prune[:, i], torch.zeros_like(w1[:, i]), w1[:, i])
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def wanda(weight: torch.Tensor, hessian: torch.Tensor, ratio: float) -> torch.Tensor:
    """The weight with, in every output row, the `ratio` of weights with the least |w|·‖x‖ zeroed."""
    w = weight.detach().float().clone()
    score = w.abs() * torch.diag(hessian).clamp(min=0).sqrt()[None, :]  # (out, in); H's diagonal ∝ ‖x_j‖²
    k = int(w.shape[1] * ratio)
    if k:
        w.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, 0.0)
    return w


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, *, damp: float = 0.01,
         act_order: bool = False, block: int = 128) -> tuple[Quantized, float]:
    """GPTQ of one (out, in) weight given its input Hessian (in, in). Returns the integers and the summed
    squared output error the rounding left (the paper's loss, ½·Σ err²/d), a figure for the report."""
    q, loss = gptq_rows(weight, hessian, bits, group_size, damp=damp, act_order=act_order, block=block)
    return q, float(loss.sum())


def gptq_rows(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, *, damp: float = 0.01,
              act_order: bool = False, block: int = 128) -> tuple[Quantized, torch.Tensor]:
    """`gptq` with its loss per output row (out,). Rows never mix: the weights of Linears that read the same
    input (q, k and v) stacked into one run give each Linear what a run of its own would, for one walk."""
    w = weight.detach().float().clone()
    out, cols = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: any value there is exact
    h[dead, dead] = 1
    w[:, dead] = 0
    groups = math.ceil(cols / group_size)
    scales = torch.empty(out, groups, device=w.device)
    zeros = torch.empty(out, groups, dtype=torch.int64, device=w.device)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    if act_order:  # static groups, from the original weights in stored order
        for g in range(groups):
            scales[:, g], zeros[:, g] = group_params(w[:, g * group_size:(g + 1) * group_size], bits)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_factor(h, w, damp)  # (in, in)
    # The walk costs a dozen small ops per column, so it keeps them few: the integers are kept as floats in
    # the order of work and the loss is summed once a block (½·Σ e², e the column errors already kept).
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    order = perm.tolist()
    zero_f = zeros.float()
    work = torch.empty(out, cols, device=w.device)  # (out, in): integers, columns in the order of work
    if act_order:  # every column's scale and zero point known before the walk, in the order of work
        scale_w, zero_w = scales[:, perm // group_size], zero_f[:, perm // group_size]  # (out, in)
    loss = torch.zeros(out, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1).tolist()
        for i in range(i2 - i1):
            if act_order:
                scale, zero = scale_w[:, i1 + i], zero_w[:, i1 + i]
            else:
                col = order[i1 + i]  # the stored column this step quantizes
                g = col // group_size
                if col % group_size == 0:  # a group starts: its scale from the updated weights
                    scales[:, g], zeros[:, g] = group_params(
                        torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size], bits)
                    zero_f[:, g] = zeros[:, g]
                scale, zero = scales[:, g], zero_f[:, g]
            x = w1[:, i]
            q = torch.clamp(torch.round(x / scale) + zero, lo, hi)  # (out,) integers as floats (to_ints)
            work[:, i1 + i] = q
            e = (x - (q - zero) * scale) / d[i]  # (out,)
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)
            err1[:, i] = e
        loss += err1.pow(2).sum(1) / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    # int8 / uint8, not int64: a model's chosen integers are kept until its last block is done (8× the bytes)
    ints = torch.empty(out, cols, dtype=torch.int8 if bits == 8 else torch.uint8, device=w.device)
    ints[:, perm] = work.to(ints.dtype)
    return Quantized(ints, scales, zeros), loss
