"""Structured pruning of decoder language models, without a dependency graph (decoders.py finds the parts):

- `structured` removes, in every block, the same share of KV groups (a key/value head with its query heads)
  and of MLP channels (gate, up and down together), so the config's head counts and intermediate size
  stay one value for all layers and the output still loads as the family it was. Units are ranked, when
  there is data, by what they put into the projection that reads them — E[x_c²]·‖W[:, c]‖² summed over a
  unit's input channels of the output projection (o_proj, down_proj), the structured form of Wanda's
  |w|·‖x‖ — else by the L2 norm of their weights. Blocks that start with different widths each lose the share
  of their own; `--uniform` instead keeps one count in every block (the narrowest block's), ranking units within
  each block, and refuses (exit 2, before any work) a selection or a family whose widths could not then be
  one config value: some blocks' attention or MLP selected and not others', or GPT-2's attention (its config
  derives the head size from the head count).
- `layers` removes whole blocks, those that change their input least on calibration data (ShortGPT's block
  influence, Men et al. 2024: 1 − cos(block input, block output), averaged over real tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from modelzip_cli import tokens
from modelzip_cli.checkpoint.decoder_edits import BlocksEdit, DecoderEdit
from modelzip_cli.errors import UsageError
from modelzip_cli.nn import decoders
from modelzip_cli.pipeline.context import Context
from modelzip_cli.pipeline.data import as_model_input, float_dtype
from modelzip_cli.techniques.base import Result, register
from modelzip_cli.techniques.prune import (
    GradualConfig,
    LayersConfig,
    StructuredConfig,
    _fine_tune,
    _importance_data,
    _label,
    input_moments,
    kept_units,
)
from modelzip_cli.techniques.recover import prepare, summary
from modelzip_cli.techniques.select import select_modules

BATCH = 8  # calibration windows per forward pass


def decoder_layout(model: nn.Module, cfg: StructuredConfig | GradualConfig | LayersConfig):
    """(stack, blocks) of a decoder language model, each block's attention and MLP kept only where all their
    Linears are selected (--include / --exclude); None when the model is not one."""
    found = decoders.decoder_blocks(model)
    if found is None:
        return None
    selected = {n for n, _ in select_modules(model, include=cfg.include, exclude=cfg.exclude)}
    stack, blocks = found
    for b in blocks:
        if b.attention and not {*b.attention.inputs(), b.attention.o} <= selected:
            b.attention = None
        if b.mlp and not {*b.mlp.inputs(), b.mlp.down} <= selected:
            b.mlp = None
    return stack, blocks


class DecoderPruner:
    """Removes KV groups and MLP channels, the same number in every block, step by step (gradual)."""

    def __init__(self, model: nn.Module, blocks: list[decoders.Block], data: torch.Tensor | None,
                 uniform: bool = False):
        self.model, self.blocks, self.data, self.uniform = model, blocks, data, uniform
        self.kv0 = {b.name: b.attention.kv_heads for b in blocks if b.attention}
        self.width0 = {b.name: b.mlp.width for b in blocks if b.mlp}
        self.heads0 = {b.name: b.attention.heads for b in blocks if b.attention}
        self.config_keys: dict = {}
        if not self.kv0 and not self.width0:
            raise UsageError("no attention or MLP of a decoder block is selected",
                             hint="check --include / --exclude")
        if uniform:
            self._check_uniform()

    def _check_uniform(self) -> None:
        """--uniform: every block's attention and MLP selected, or none of them; no GPT-2 attention."""
        for what, widths in (("attention", self.kv0), ("MLP", self.width0)):
            if 0 < len(widths) < len(self.blocks):
                raise UsageError(f"--uniform: the selection prunes the {what} of {len(widths)} of "
                                 f"{len(self.blocks)} blocks, so their widths would differ",
                                 hint="select every block's " + what + " (--include / --exclude), or drop --uniform")
        if any(b.attention.q.linear.endswith(".c_attn") for b in self.blocks if b.attention):
            raise UsageError("--uniform: GPT-2's config cannot hold fewer attention heads of the same size",
                             hint="prune its MLPs only (--include '*mlp*'), or drop --uniform")

    def check(self, fraction: float) -> None:
        for name, kv in self.kv0.items():
            if round(fraction * kv) >= kv:
                raise UsageError(f"--ratio {fraction:g} would remove every KV group of {name} ({kv})",
                                 hint="lower --ratio, or --exclude that block's attention")

    def _targets(self, fraction: float) -> tuple[dict, dict]:
        """KV groups and MLP channels each block keeps: the share of its own, or (uniform) the fewest any
        block keeps, in every block."""
        kv = {n: kv - round(fraction * kv) for n, kv in self.kv0.items()}
        width = {n: kept_units(w, fraction) for n, w in self.width0.items()}
        if self.uniform:
            kv = dict.fromkeys(kv, min(kv.values(), default=0))
            width = dict.fromkeys(width, min(width.values(), default=0))
        return kv, width

    def _activity(self) -> dict[str, torch.Tensor]:
        """Per output projection (o_proj, down_proj): E[x_c²]·‖W[:, c]‖² of each input channel."""
        readers = {b.attention.o: 0 for b in self.blocks if b.attention} | {b.mlp.down: 0 for b in self.blocks
                                                                             if b.mlp}
        moments = input_moments(self.model, self.data, readers)
        out = {}
        for name, m in moments.items():
            if m.n == 0:
                continue
            w = self.model.get_submodule(name).weight.detach().double()
            out[name] = (m.square / m.n * w.pow(2).sum(0)).float()  # (in,)
        return out

    def prune_to(self, fraction: float) -> None:
        self.check(fraction)
        kv_keep, width_keep = self._targets(fraction)
        activity = self._activity() if self.data is not None else {}
        for b in self.blocks:
            a, mlp = b.attention, b.mlp
            if a and a.kv_heads > kv_keep[b.name]:
                score = self._group_scores(a, activity.get(a.o))
                kept = torch.argsort(score, descending=True, stable=True)[:kv_keep[b.name]].tolist()
                decoders.shrink_attention(self.model, a, kept)
            if mlp and mlp.width > width_keep[b.name]:
                score = self._channel_scores(mlp, activity.get(mlp.down))
                kept = torch.argsort(score, descending=True, stable=True)[:width_keep[b.name]].tolist()
                decoders.shrink_mlp(self.model, mlp, kept)
        self.config_keys = decoders.set_widths(self.model, self.blocks)
        self.importance = "activations" if activity else "weight norms"

    def _weights(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight.detach().float()

    def _group_scores(self, a: decoders.Attention, activity: torch.Tensor | None) -> torch.Tensor:
        """One score per KV group: its query channels' activity in o_proj, or the L2 norm of all its weights."""
        per_q = a.group * a.head_dim  # o_proj input channels of one KV group
        if activity is not None:
            return activity.reshape(a.kv_heads, per_q).sum(1)
        o = self._weights(a.o).pow(2).sum(0).reshape(a.kv_heads, per_q).sum(1)  # (kv,)
        total = o
        for part, width in ((a.q, per_q), (a.k, a.head_dim), (a.v, a.head_dim)):
            w = self._weights(part.linear)[part.offset:part.offset + a.kv_heads * width]
            total = total + w.pow(2).sum(1).reshape(a.kv_heads, width).sum(1)
        return total.sqrt()

    def _channel_scores(self, mlp: decoders.MLP, activity: torch.Tensor | None) -> torch.Tensor:
        if activity is not None:
            return activity
        total = self._weights(mlp.down).pow(2).sum(0)  # (width,)
        for part in mlp.parts:
            total = total + self._weights(part.linear)[part.offset:part.offset + mlp.width].pow(2).sum(1)
        return total.sqrt()

    @property
    def notes(self) -> list[str]:
        out = []
        if self.kv0:
            kv = {b.name: b.attention.kv_heads for b in self.blocks if b.attention}
            removed = sum(self.kv0.values()) - sum(kv.values())
            heads = sum(self.heads0.values()) - sum(b.attention.heads for b in self.blocks if b.attention)
            out.append(f"attention: {removed} of {sum(self.kv0.values())} KV groups removed ({heads} query heads) "
                       f"in {len(kv)} blocks, q, k, v and the output projection together"
                       + ("" if removed else "; the ratio rounds to none of a block's "
                          f"{next(iter(self.kv0.values()))} KV groups"))
        if self.width0:
            now = sum(b.mlp.width for b in self.blocks if b.mlp)
            out.append(f"MLP: {sum(self.width0.values()) - now} of {sum(self.width0.values())} channels removed "
                       f"in {len(self.width0)} blocks (input projections' rows and the output projection's "
                       "columns together)")
        how = ("activations: E[x²]·‖w‖² of each unit's channels into the output projection, on "
               f"{len(self.data)} samples" if self.importance == "activations" else "the L2 norm of their weights")
        out.append(f"units ranked by {how}; no dependency graph traced")
        if self.config_keys:
            out.append("config updated: " + ", ".join(f"{k}={v}" for k, v in self.config_keys.items()))
        else:
            out.append("blocks differ in width: the config keeps the input's values; the edit records each block's")
        return out

    def edits(self, ratio: float, **extra) -> list[DecoderEdit]:
        rows = [{"block": b.name, "kv_heads": b.attention.kv_heads if b.attention else None,
                 "intermediate": b.mlp.width if b.mlp else None} for b in self.blocks if b.attention or b.mlp]
        return [DecoderEdit(ratio=ratio, importance=self.importance, blocks=rows, **extra)]


def pruner(model: nn.Module, cfg: StructuredConfig | GradualConfig, ctx: Context) -> DecoderPruner | None:
    layout = decoder_layout(model, cfg)
    return None if layout is None else DecoderPruner(model, layout[1], _importance_data(ctx), cfg.uniform)


def prune_structured(model: nn.Module, cfg: StructuredConfig, ctx: Context, dp: DecoderPruner) -> Result:
    teacher = prepare(model, cfg, ctx)
    dp.prune_to(cfg.ratio)
    before = teacher.measure(model) if teacher else None
    history = _fine_tune(model, cfg, ctx, masks=None, label=_label(cfg), teacher=teacher)
    after, more = summary(teacher, model, history, before)
    notes = [*dp.notes, "structured pruning removed whole KV groups and MLP channels: layers physically shrink, "
             "so dense inference does less work"]
    return Result(model, dp.edits(cfg.ratio), notes=notes + more, after=after)


# ---------------------------------------------------------------------------------------------------
# Whole blocks (ShortGPT)


@torch.no_grad()
def block_influence(model: nn.Module, layers: nn.ModuleList, inputs: torch.Tensor, progress) -> list[float]:
    """Per block: 1 − cos(input hidden state, output hidden state), averaged over real tokens of `inputs`."""
    total = torch.zeros(len(layers), dtype=torch.float64)
    count = torch.zeros(len(layers), dtype=torch.float64)
    state: dict = {}

    def pre(i: int, args: tuple, kwargs: dict) -> None:
        state[i] = args[0] if args else kwargs["hidden_states"]

    def post(i: int, out) -> None:
        h_out = out[0] if isinstance(out, tuple | list) else out
        cos = torch.nn.functional.cosine_similarity(state.pop(i).double(), h_out.double(), dim=-1)  # (B, L)
        keep = state.get("mask")
        cos = cos[keep.bool()] if keep is not None and keep.shape == cos.shape else cos.reshape(-1)
        total[i] += (1 - cos).sum()
        count[i] += cos.numel()

    hooks = []
    for i, block in enumerate(layers):
        hooks.append(block.register_forward_pre_hook(lambda m, a, k, i=i: pre(i, a, k), with_kwargs=True))
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: post(i, o)))
    dtype = float_dtype(model)
    try:
        with progress("block influence", (len(inputs) + BATCH - 1) // BATCH) as bar:
            for j in range(0, len(inputs), BATCH):
                batch = inputs[j:j + BATCH]
                state["mask"] = tokens.mask_of(batch)  # (B, L) or None
                model(as_model_input(batch, dtype))
                bar.advance()
    finally:
        for h in hooks:
            h.remove()
    return (total / count.clamp_min(1)).tolist()


@register(LayersConfig)
def remove_layers(model: nn.Module, cfg: LayersConfig, ctx: Context) -> Result:
    stack = decoders.decoder_blocks(model)
    if stack is None:
        raise UsageError("--method layers removes whole blocks of a stack of repeated blocks, and this model has none",
                         hint="use --method structured")
    stack = stack[0]
    n = len(stack.layers)
    remove = cfg.blocks if cfg.blocks is not None else round(cfg.ratio * n)
    if remove >= n:
        raise UsageError(f"removing {remove} of the {n} blocks of {stack.prefix} would leave none",
                         hint="lower --ratio or --blocks")
    if remove == 0:
        raise UsageError(f"--ratio {cfg.ratio:g} of the {n} blocks of {stack.prefix} rounds to none",
                         hint="raise --ratio, or name a count with --blocks N")
    data = _importance_data(ctx)
    teacher = prepare(model, cfg, ctx)
    model.eval()
    influence = block_influence(model, stack.layers, data, ctx.progress)
    removed = sorted(torch.argsort(torch.tensor(influence), stable=True)[:remove].tolist())
    decoders.remove_blocks(model, stack, removed)
    before = teacher.measure(model) if teacher else None
    history = _fine_tune(model, cfg, ctx, masks=None, label=_label(cfg), teacher=teacher)
    after, more = summary(teacher, model, history, before)
    shown = ", ".join(f"{i} ({influence[i]:.3g})" for i in removed)
    notes = [f"layers: {len(removed)} of {n} blocks of {stack.prefix} removed, those whose output differs least "
             f"from their input (block influence 1 − cos, on {len(data)} samples): {shown}; blocks "
             f"renumbered, config num_hidden_layers={n - len(removed)}", *more]
    edit = BlocksEdit(stack=stack.prefix, removed=removed, influence=[round(x, 6) for x in influence])
    return Result(model, [edit], notes=notes, after=after)
