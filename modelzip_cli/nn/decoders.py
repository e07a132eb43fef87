"""Decoder language models as stacks of blocks whose widths can shrink: surgery shared by structured pruning
of decoders and by the replay of its edits.

A block is found by the names transformers gives its layers, so Llama, Qwen2, Mistral, Gemma, Phi-3 and
GPT-2 kin work without a dependency graph:

- attention: separate `q_proj`/`k_proj`/`v_proj` + `o_proj`, fused `qkv_proj` + `o_proj` (Phi-3), or fused
  `c_attn` + `c_proj` (GPT-2, once its Conv1D layers are Linears). A KV group is one key/value head and the
  query heads that share it (grouped-query attention; one query head each in multi-head attention):
  removing it removes its rows of q, k and v and the matching columns of the output projection.
- MLP: `gate_proj`/`up_proj` + `down_proj` (SwiGLU), fused `gate_up_proj` + `down_proj` (Phi-3), or
  `c_fc` + `c_proj` (GPT-2): a channel is one row of each input projection and one column of the output one.

Removing whole KV groups keeps the query heads per KV head, so attention code that repeats keys per group
runs unchanged. transformers' `Conv1D` (a Linear stored transposed) becomes an `nn.Linear` here, so every
technique that handles Linears handles GPT-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Blocks:
    prefix: str  # qualified name of the ModuleList ("model.model.layers")
    layers: nn.ModuleList

    def name(self, i: int) -> str:
        return f"{self.prefix}.{i}"


def blocks_of(model: nn.Module, min_blocks: int = 2) -> Blocks | None:
    """The model's stack of repeated blocks: the longest ModuleList whose children are all of one class
    and each hold a weighted layer; None when there is none."""
    best: Blocks | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < min_blocks:
            continue
        kinds = {type(child) for child in module}
        weighted = all(any(getattr(m, "weight", None) is not None for m in child.modules()) for child in module)
        if len(kinds) == 1 and weighted and (best is None or len(module) > len(best.layers)):
            best = Blocks(name, module)
    return best


@dataclass
class Part:
    """The rows of `linear` from `offset` on that belong to one projection (q, k, v, gate or up)."""

    linear: str
    offset: int = 0


@dataclass
class Attention:
    module: str
    q: Part
    k: Part
    v: Part
    o: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads  # query heads per KV head

    def inputs(self) -> list[str]:
        return list(dict.fromkeys(p.linear for p in (self.q, self.k, self.v)))


@dataclass
class MLP:
    module: str
    parts: list[Part]  # gate and up (SwiGLU), or the one input projection
    down: str
    width: int

    def inputs(self) -> list[str]:
        return list(dict.fromkeys(p.linear for p in self.parts))


@dataclass
class Block:
    name: str
    attention: Attention | None
    mlp: MLP | None
    notes: list[str] = field(default_factory=list)


def _linear(m: nn.Module, attr: str) -> nn.Linear | None:
    x = getattr(m, attr, None)
    return x if isinstance(x, nn.Linear) else None


def _attention(name: str, m: nn.Module) -> Attention | None:
    head_dim = getattr(m, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        return None
    q, k, v, o = (_linear(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if q and k and v and o and q.out_features % head_dim == 0 and k.out_features == v.out_features:
        heads, kv = q.out_features // head_dim, k.out_features // head_dim
        return Attention(name, Part(f"{name}.q_proj"), Part(f"{name}.k_proj"), Part(f"{name}.v_proj"),
                         f"{name}.o_proj", heads, kv, head_dim) if kv and heads % kv == 0 else None
    qkv = _linear(m, "qkv_proj")
    kv = getattr(m, "num_key_value_heads", None)
    if qkv and o and isinstance(kv, int) and kv > 0 and o.in_features % head_dim == 0:
        heads = o.in_features // head_dim
        if heads % kv or qkv.out_features != (heads + 2 * kv) * head_dim:
            return None
        qn = f"{name}.qkv_proj"
        return Attention(name, Part(qn), Part(qn, heads * head_dim), Part(qn, (heads + kv) * head_dim),
                         f"{name}.o_proj", heads, kv, head_dim)
    c_attn, c_proj, split = _linear(m, "c_attn"), _linear(m, "c_proj"), getattr(m, "split_size", None)
    if c_attn and c_proj and isinstance(split, int) and not hasattr(m, "q_attn") and c_attn.out_features == 3 * split \
            and split % head_dim == 0:
        cn = f"{name}.c_attn"
        heads = split // head_dim
        return Attention(name, Part(cn), Part(cn, split), Part(cn, 2 * split), f"{name}.c_proj", heads, heads,
                         head_dim)
    return None


def _mlp(name: str, m: nn.Module) -> MLP | None:
    gate, up, down = (_linear(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
    if gate and up and down and gate.out_features == up.out_features == down.in_features:
        return MLP(name, [Part(f"{name}.gate_proj"), Part(f"{name}.up_proj")], f"{name}.down_proj", down.in_features)
    fused = _linear(m, "gate_up_proj")
    if fused and down and fused.out_features == 2 * down.in_features:
        n = f"{name}.gate_up_proj"
        return MLP(name, [Part(n), Part(n, down.in_features)], f"{name}.down_proj", down.in_features)
    fc, proj = _linear(m, "c_fc"), _linear(m, "c_proj")
    if fc and proj and fc.out_features == proj.in_features:
        return MLP(name, [Part(f"{name}.c_fc")], f"{name}.c_proj", proj.in_features)
    return None


def decoder_blocks(model: nn.Module) -> tuple[Blocks, list[Block]] | None:
    """The model's stack of blocks and, in each, its attention and MLP as above; None when the model has no
    stack or a block lacks either."""
    stack = blocks_of(model, min_blocks=1)  # one block is left after --method layers on two
    if stack is None:
        return None
    out = []
    for i, block in enumerate(stack.layers):
        prefix = stack.name(i)
        attn = mlp = None
        for sub, m in block.named_modules():
            name = f"{prefix}.{sub}" if sub else prefix
            attn = attn or _attention(name, m)
            mlp = mlp or _mlp(name, m)
        out.append(Block(prefix, attn, mlp))
    if not all(b.attention and b.mlp for b in out):
        return None  # a family whose blocks are only partly known here (an encoder's other MLP names)
    return stack, out


# ---------------------------------------------------------------------------------------------------
# Surgery: keep some rows of the input projections and the matching columns of the output projection


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def _keep(model: nn.Module, name: str, idx: list[int], dim: int, values: bool) -> None:
    """Keep rows (`dim` 0) or columns (1) `idx` of the Linear `name`: a new, smaller Linear in its place,
    holding the kept values (`values`) or left empty for a stored state to fill (a replay)."""
    old = model.get_submodule(name)
    w = old.weight
    shape = (len(idx), old.in_features) if dim == 0 else (old.out_features, len(idx))
    new = nn.Linear(shape[1], shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    if values:
        index = torch.tensor(idx, dtype=torch.long, device=w.device)
        new.weight.copy_(w.index_select(dim, index))
        if old.bias is not None:
            new.bias.copy_(old.bias if dim == 1 else old.bias.index_select(0, index))
    new.train(old.training)
    _replace(model, name, new)


def _rows(parts: Sequence[Part], kept: Sequence[Sequence[int]]) -> dict[str, list[int]]:
    """Linear name → its kept rows, from each part's kept rows (relative to the part's offset), parts of one
    fused Linear in the order of their offsets."""
    out: dict[str, list[int]] = {}
    for part, rows in sorted(zip(parts, kept, strict=True), key=lambda t: (t[0].linear, t[0].offset)):
        out.setdefault(part.linear, []).extend(part.offset + r for r in rows)
    return out


def _channels(units: Sequence[int], size: int) -> list[int]:
    return [u * size + i for u in units for i in range(size)]


def shrink_attention(model: nn.Module, attn: Attention, kv_kept: Sequence[int], values: bool = True) -> None:
    """Keep KV groups `kv_kept` (sorted indices) of `attn`: their key/value heads, their query heads."""
    kv_kept = sorted(kv_kept)
    q_heads = [g * attn.group + j for g in kv_kept for j in range(attn.group)]
    q_rows, kv_rows = _channels(q_heads, attn.head_dim), _channels(kv_kept, attn.head_dim)
    for name, rows in _rows([attn.q, attn.k, attn.v], [q_rows, kv_rows, kv_rows]).items():
        _keep(model, name, rows, 0, values)
    _keep(model, attn.o, q_rows, 1, values)
    module = model.get_submodule(attn.module)
    heads, kv = len(q_heads), len(kv_kept)
    # GPT-2 splits c_attn by split_size; its embed_dim stays the residual width
    for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv),
                        ("split_size", heads * attn.head_dim)):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)
    attn.heads, attn.kv_heads = heads, kv


def shrink_mlp(model: nn.Module, mlp: MLP, kept: Sequence[int], values: bool = True) -> None:
    """Keep channels `kept` (sorted indices) of `mlp`: rows of gate and up, columns of down."""
    kept = sorted(kept)
    for name, rows in _rows(mlp.parts, [kept] * len(mlp.parts)).items():
        _keep(model, name, rows, 0, values)
    _keep(model, mlp.down, kept, 1, values)
    module = model.get_submodule(mlp.module)
    if isinstance(getattr(module, "intermediate_size", None), int):
        module.intermediate_size = len(kept)
    mlp.width = len(kept)


def hf_config(model: nn.Module):
    """The transformers config inside `model` (the first module that has one), or None."""
    return next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)


def set_widths(model: nn.Module, blocks: list[Block]) -> dict:
    """Write the blocks' widths into the transformers config where every block has the same ones (the
    config holds one value for all layers); returns the keys written."""
    config = hf_config(model)
    if config is None:
        return {}
    written: dict = {}
    attn = [b.attention for b in blocks if b.attention]
    # GPT-2's attention derives its head size from the config's width and head count: its head count cannot
    # change there, and its modules carry their own (split_size)
    fixed = any(a.q.linear.endswith(".c_attn") for a in attn)
    if attn and not fixed and len({(a.heads, a.kv_heads) for a in attn}) == 1 and len(attn) == len(blocks):
        written.update(head_dim=attn[0].head_dim, num_attention_heads=attn[0].heads)
        if hasattr(config, "num_key_value_heads"):
            written["num_key_value_heads"] = attn[0].kv_heads
    mlps = [b.mlp for b in blocks if b.mlp]
    if mlps and len({m.width for m in mlps}) == 1 and len(mlps) == len(blocks) and (
            hasattr(config, "intermediate_size") or hasattr(config, "n_inner")):
        written["intermediate_size" if hasattr(config, "intermediate_size") else "n_inner"] = mlps[0].width
    for key, value in written.items():
        setattr(config, key, value)
    return written


# ---------------------------------------------------------------------------------------------------
# Whole blocks


def remove_blocks(model: nn.Module, stack: Blocks, removed: Sequence[int]) -> None:
    """Drop blocks `removed` from the stack; the others keep their order and are renumbered (`layer_idx`, which
    indexes the KV cache), and the config's layer count and per-layer types follow."""
    gone = set(removed)
    kept = [b for i, b in enumerate(stack.layers) if i not in gone]
    for new_idx, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx
    _replace(model, stack.prefix, nn.ModuleList(kept))
    config = hf_config(model)
    if config is not None:
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(stack.layers):
            config.layer_types = [t for i, t in enumerate(types) if i not in gone]
        config.num_hidden_layers = len(kept)


# ---------------------------------------------------------------------------------------------------
# transformers' Conv1D (GPT-2 and kin): a Linear stored transposed (weight (in, out), y = x·W + b)


def conv1d_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"
            and type(m).__module__.startswith("transformers") and isinstance(getattr(m, "weight", None), torch.Tensor)]


@torch.no_grad()
def conv1d_to_linear(model: nn.Module, names: Sequence[str], values: bool = True) -> None:
    """Each named Conv1D becomes the nn.Linear it computes (weight transposed, same bias); `values=False`
    builds them empty, for a stored state to fill."""
    for name in names:
        old = model.get_submodule(name)
        w = old.weight  # (in, out)
        new = nn.Linear(w.shape[0], w.shape[1], bias=getattr(old, "bias", None) is not None, device=w.device,
                        dtype=w.dtype)
        if values:
            new.weight.copy_(w.t())
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.train(old.training)
        _replace(model, name, new)
