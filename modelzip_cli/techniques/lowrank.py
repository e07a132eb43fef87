"""Low-rank factorization: each selected Linear (out×in) becomes Linear(in→r, no bias) → Linear(r→out).

W ≈ U_r·diag(s_r)·V_rᵀ from a truncated SVD, split evenly: first = diag(√s_r)·V_rᵀ, second = U_r·diag(√s_r).
Large layers at a small rank use the seeded randomized SVD (`torch.svd_lowrank`); the rest the exact SVD.
"""

from __future__ import annotations

import heapq
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelzip_cli.checkpoint.edits import LowRankEdit
from modelzip_cli.checkpoint.format import Manifest
from modelzip_cli.errors import UsageError
from modelzip_cli.nn.surgery import factorized, replace_module
from modelzip_cli.pipeline.context import Context
from modelzip_cli.techniques import recover
from modelzip_cli.techniques.base import FineTune, MethodConfig, Op, Recover, Result, Selection, register
from modelzip_cli.techniques.select import matches, output_layer, select_modules

RANDOMIZED_MIN_DIM = 1024  # below this the exact SVD is fast enough
RANDOMIZED_MAX_FRACTION = 0.25  # randomized only when r ≤ this fraction of min(out, in)


class LowRankConfig(Recover, MethodConfig, Selection, FineTune):  # Recover first: its data needs win
    """Exactly one of rank_ratio, energy, params_ratio chooses each layer's rank."""

    op: ClassVar[str] = "lowrank"
    rank_ratio: float | None = Field(None, gt=0, le=1)  # r = ratio · min(out, in)
    energy: float | None = Field(None, gt=0, le=1)  # smallest r keeping this fraction of Σs²
    params_ratio: float | None = Field(None, gt=0, le=1)  # whole-model parameter budget, shared by energy
    svd: Literal["auto", "exact", "randomized"] = "auto"
    niter: int = Field(4, ge=0)  # randomized SVD power iterations
    oversample: int = Field(16, ge=0)  # randomized SVD extra columns

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankConfig:
        given = [f for f, v in (("--rank-ratio", self.rank_ratio), ("--energy", self.energy),
                                ("--params-ratio", self.params_ratio)) if v is not None]
        if len(given) != 1:
            raise UsageError("give exactly one of --rank-ratio, --energy, --params-ratio" +
                             (f" (got {', '.join(given)})" if given else ""))
        return self


def break_even(out_features: int, in_features: int) -> float:
    """Rank at which the two factors hold as many parameters as the dense weight."""
    return out_features * in_features / (out_features + in_features)


# ---------------------------------------------------------------------------------------------------
# Rank choice


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    cum = torch.cumsum(s.double() ** 2, 0)
    return int(torch.searchsorted(cum, energy * cum[-1] * (1 - 1e-12))) + 1


def _budget_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int) -> dict:
    """Share `budget` parameters among layers: every layer gets rank 1 first (a rank-0 layer would be a
    bias alone), then one more rank at a time goes to the layer whose next singular value keeps the most
    of its layer's energy per parameter spent."""
    ranks = {n: 1 for n in spectra}
    totals = {n: float((s.double() ** 2).sum()) for n, s in spectra.items()}
    spent = sum(sum(shapes[n]) for n in spectra)
    heap = [(-(float(s[1]) ** 2) / totals[n] / sum(shapes[n]), n) for n, s in spectra.items()
            if totals[n] > 0 and len(s) > 1]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        cost = sum(shapes[n])  # one more rank: one row of the first factor, one column of the second
        if spent + cost > budget:
            continue
        spent += cost
        ranks[n] += 1
        k = ranks[n]
        if k < len(spectra[n]):
            heapq.heappush(heap, (-(float(spectra[n][k]) ** 2) / totals[n] / sum(shapes[n]), n))
    return ranks


def choose_ranks(model: nn.Module, cfg: LowRankConfig, layers: list) -> tuple[dict[str, int], dict]:
    """Each selected layer's rank by the config's one rule, and the singular values computed on the way."""
    shapes = {n: (m.out_features, m.in_features) for n, m in layers}
    spectra: dict[str, torch.Tensor] = {}
    if cfg.energy is not None or cfg.params_ratio is not None:
        spectra = {n: torch.linalg.svdvals(m.weight.float()) for n, m in layers}
    if cfg.rank_ratio is not None:
        return {n: max(1, round(cfg.rank_ratio * min(shapes[n]))) for n in shapes}, spectra
    if cfg.energy is not None:
        return {n: _energy_rank(s, cfg.energy) for n, s in spectra.items()}, spectra
    total = sum(p.numel() for p in model.parameters())
    fixed = total - sum(m.weight.numel() for _, m in layers)  # everything that stays dense, biases included
    budget = int(cfg.params_ratio * total) - fixed
    if budget < sum(sum(s) for s in shapes.values()):
        raise UsageError(f"--params-ratio {cfg.params_ratio} leaves {max(budget, 0):,} parameters for the "
                         f"selected weights, less than rank 1 everywhere needs",
                         hint="raise --params-ratio or select fewer layers")
    return _budget_ranks(spectra, shapes, budget), spectra


# ---------------------------------------------------------------------------------------------------
# Factorization


def _svd(w: torch.Tensor, rank: int, cfg: LowRankConfig, seed: int) -> tuple[torch.Tensor, ...]:
    """(U_r, s_r, V_r, path) of the rank-r truncation of w."""
    small = min(w.shape)
    randomized = cfg.svd == "randomized" or (
        cfg.svd == "auto" and small >= RANDOMIZED_MIN_DIM and rank <= RANDOMIZED_MAX_FRACTION * small)
    if randomized:
        torch.manual_seed(seed)  # svd_lowrank draws its test matrix from the global generator
        u, s, v = torch.svd_lowrank(w, q=min(rank + cfg.oversample, small), niter=cfg.niter)
        return u[:, :rank], s[:rank], v[:, :rank], "randomized"
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].T, "exact"


def select(model: nn.Module, cfg: LowRankConfig, example: torch.Tensor | None) -> tuple[list, list[str]]:
    """The Linears to factorize, and notes on what was left out."""
    layers = select_modules(model, include=cfg.include, exclude=cfg.exclude, types=(nn.Linear,), what="Linear")
    head = output_layer(model, example) if example is not None else None
    if head and not (cfg.include and matches(head, cfg.include)) and len(layers) > 1:
        # A low-rank classifier head caps the logits to an r-dimensional subspace: keep it unless asked.
        return ([(n, m) for n, m in layers if n != head],
                [f"{head} (the output layer) left as it was; name it in --include to factorize it"])
    return layers, []


def plan(model: nn.Module, cfg: LowRankConfig, example: torch.Tensor | None) -> list[str]:
    return [n for n, _ in select(model, cfg, example)[0]]


@torch.no_grad()
def lowrank(model: nn.Module, cfg: LowRankConfig, ctx: Context) -> Result:
    layers, notes = select(model, cfg, ctx.example_input)
    teacher = recover.prepare(model, cfg, ctx)  # the input model's outputs, before factorizing
    shapes = {n: (m.out_features, m.in_features) for n, m in layers}
    ranks, spectra = choose_ranks(model, cfg, layers)

    rows, edit_ranks = [], {}
    for i, (name, m) in enumerate(layers):
        out_f, in_f = shapes[name]
        r = ranks[name]
        row = {"name": name, "type": "Linear", "shape": [out_f, in_f], "scheme": "float32",
               "params_before": m.weight.numel() + (out_f if m.bias is not None else 0), "rank": None,
               "energy_kept": 1.0, "relative_error": 0.0, "svd": None}
        if r >= break_even(out_f, in_f) or r >= min(out_f, in_f):
            notes.append(f"{name} ({out_f}×{in_f}) left as it was: rank {r} ≥ {break_even(out_f, in_f):.1f}, "
                         "where two factors would hold as many parameters as the dense weight")
            row.update(params=row["params_before"], bytes=row["params_before"] * m.weight.element_size())
            rows.append(row)
            continue
        w = m.weight.float()
        u, s, v, path = _svd(w, r, cfg, ctx.seed + i)
        root = s.sqrt()
        new = factorized(in_f, out_f, r, m.bias is not None).to(m.weight.dtype)
        new[0].weight.copy_(root[:, None] * v.T)  # (r, in)
        new[1].weight.copy_(u * root[None, :])  # (out, r)
        if m.bias is not None:
            new[1].bias.copy_(m.bias)
        approx = new[1].weight.float() @ new[0].weight.float()
        rel_err = float(torch.linalg.norm(w - approx) / torch.linalg.norm(w).clamp(min=1e-30))
        full = spectra.get(name)
        energy = (float((full[:r].double() ** 2).sum() / (full.double() ** 2).sum()) if full is not None
                  else 1 - rel_err ** 2)
        replace_module(model, name, new)
        edit_ranks[name] = r
        params = sum(p.numel() for p in new.parameters())
        row.update(rank=r, energy_kept=round(energy, 6), relative_error=round(rel_err, 6), svd=path,
                   params=params, bytes=params * m.weight.element_size())
        rows.append(row)
    if not edit_ranks:
        notes.append("no layer was factorized: every selected layer's rank is at or above its break-even")
    history, after = [], {}
    if edit_ranks:  # the factors train; layers left dense train too
        before = teacher.measure(model) if teacher else None
        history = recover.fine_tune(model, cfg, ctx, teacher=teacher,
                                    label="recover" if cfg.recover else "fine-tune")
        after, more = recover.summary(teacher, model, history, before)
        notes += more
    return Result(model, [LowRankEdit(ranks=edit_ranks)] if edit_ranks else [], notes=notes,
                  layers=rows, after=after)


def apply(model: nn.Module, cfg: LowRankConfig, ctx: Context, manifest: Manifest) -> Result:
    return lowrank(model, cfg, ctx)


register(LowRankConfig)(apply)
OP = Op("lowrank", "lowrank", apply, plan=plan)
