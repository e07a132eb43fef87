"""AWQ (Lin et al. 2023): activation-aware scales before round-to-nearest weight-only quantization.

The input channels that carry large activations matter most, so each is scaled up in the weight (W·diag(s))
and down in what feeds it (x / s) — the product is unchanged, and the important channels get finer steps on
the integer grid. s = mean|x|^α per channel, with α chosen on calibration inputs where the quantized
layers' outputs move least; then each group's range is clipped where that keeps its outputs closer. The
1/s is folded into what produces the input: a norm's weight (and bias), or
for a gated MLP's down projection the rows of its up projection (down reads act(gate) · up, linear in up's
output channels). A Linear whose input has no such producer is rounded to nearest without scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelzip_cli.nn.weight_only import Quantized, rtn

ALPHAS = tuple(i / 20 for i in range(20))  # the grid AWQ searches: 0, 0.05, …, 0.95
ROWS = 4096  # input rows per group kept to measure each α on


@dataclass
class Group:
    """Linears that read one tensor, and the module that writes it (None: no way to fold a scale)."""

    producer: str | None
    linears: list[str]


def is_norm(module: nn.Module, width: int) -> bool:
    """A normalization whose per-channel weight of `width` can absorb 1/s (RMSNorm, LayerNorm and kin)."""
    weight = getattr(module, "weight", None)
    return ("Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.ndim == 1
            and weight.numel() == width)


def fold_into(producer: nn.Module, s: torch.Tensor) -> None:
    """Divide what `producer` writes by s per channel: a norm's weight and bias, or a Linear's output rows."""
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s[:, None].to(producer.weight.dtype))
        else:
            producer.weight.div_(s.to(producer.weight.dtype))
        bias = getattr(producer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))


def search(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group: int) -> tuple[torch.Tensor, float, float]:
    """(s, α, relative output error) of the α whose scaled, rounded weights keep the outputs on `x` (M, in)
    closest to the float ones, over all the weights that read x."""
    x = x.float()
    mean = x.abs().mean(0).clamp(min=1e-8)  # (in,)
    ref = [x @ w.float().T for w in weights]
    norm = sum(float(r.pow(2).sum()) for r in ref) or 1.0
    best = (torch.ones_like(mean), 0.0, float("inf"))
    for alpha in ALPHAS:
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (as AWQ does)
        err = 0.0
        for w, r in zip(weights, ref, strict=True):
            q = rtn(w.float() * s[None, :], bits, group).dequantized(group) / s[None, :]
            err += float((x @ q.T - r).pow(2).sum())
        if err < best[2] * (1 - 1e-9):
            best = (s, alpha, err)
    return best[0], best[1], best[2] / norm


CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # a group's range shrunk to 100 %, 95 %, …, 55 %
CLIP_ROWS = 512


def clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The weight with each row's range in each group shrunk by the ratio whose rounded group keeps that
    row's output on `x` (M, in) closest (AWQ's clipping search)."""
    w = weight.detach().float().clone()
    x = x[:: max(1, x.shape[0] // CLIP_ROWS)][:CLIP_ROWS].float()
    for start in range(0, w.shape[1], group):
        wg, xg = w[:, start:start + group], x[:, start:start + group]  # (out, g), (M, g)
        ref = xg @ wg.T  # (M, out)
        best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
        best = wg.clone()
        lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
        for ratio in CLIP_RATIOS:
            clipped = torch.minimum(torch.maximum(wg, lo * ratio), hi * ratio)
            q = rtn(clipped, bits, group).dequantized(group)
            err = (xg @ q.T - ref).pow(2).sum(0)  # (out,)
            better = err < best_err
            best[better], best_err[better] = clipped[better], err[better]
        w[:, start:start + group] = best
    return w


def scale_and_round(linears: dict[str, nn.Linear], producer: nn.Module | None, x: torch.Tensor | None, bits: int,
                    group_of: dict[str, int]) -> tuple[dict[str, Quantized], dict]:
    """Search and fold the scales of one group (when it has a producer and inputs), then round every Linear
    of it to nearest. Returns the integers per Linear and the figures for the report."""
    figures: dict = {}
    s = None
    if producer is not None and x is not None:
        group = min(group_of.values())
        s, alpha, err = search(x, [m.weight for m in linears.values()], bits, group)
        figures = {"awq_alpha": alpha, "awq_output_error": round(err, 6)}
        if alpha:
            fold_into(producer, s)
            with torch.no_grad():
                for m in linears.values():
                    m.weight.mul_(s[None, :].to(m.weight.dtype))
    out = {}
    for name, m in linears.items():
        w = m.weight if x is None else clip(m.weight, x / (s if figures.get("awq_alpha") else 1), bits,
                                             group_of[name])
        out[name] = rtn(w, bits, group_of[name])
        with torch.no_grad():  # the next blocks calibrate on the layer as it will be
            m.weight.copy_(out[name].dequantized(group_of[name]).to(m.weight.dtype))
    return out, figures
