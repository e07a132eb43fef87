"""The edits of decoder surgery (nn/decoders.py), replayed on load: Conv1D layers turned Linear, KV groups and
MLP channels removed (each block's widths), whole blocks removed."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modelzip_cli.checkpoint.edits import Edit
from modelzip_cli.checkpoint.format import CORRUPT, Manifest
from modelzip_cli.errors import InputError
from modelzip_cli.nn import decoders

Positive = Annotated[int, Field(ge=1)]


class Conv1DEdit(Edit):
    """transformers' Conv1D layers (GPT-2 and kin) as the nn.Linear they compute."""

    kind: ClassVar[str] = "conv1d_to_linear"
    modules: list[str]

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        found = set(decoders.conv1d_layers(model))
        missing = [n for n in self.modules if n not in found]
        if missing:
            raise InputError(f"there is no Conv1D layer {missing[0]!r} in the model", hint=CORRUPT)
        decoders.conv1d_to_linear(model, self.modules, values=False)
        return model


class BlockWidths(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    block: str
    kv_heads: Positive | None = None  # KV groups kept (None: attention left as it was)
    intermediate: Positive | None = None  # MLP channels kept


def _block(model: nn.Module, name: str) -> decoders.Block:
    found = decoders.decoder_blocks(model)
    block = next((b for b in found[1] if b.name == name), None) if found else None
    if block is None:
        raise InputError(f"there is no decoder block {name!r} in the model", hint=CORRUPT)
    return block


class DecoderEdit(Edit):
    """Each decoder block keeps its first `kv_heads` KV groups and `intermediate` MLP channels (the kept ones,
    moved to the front when pruned)."""

    kind: ClassVar[str] = "prune_decoder"
    shrinks: ClassVar[bool] = True
    ratio: float = Field(ge=0, lt=1)
    importance: str
    blocks: list[BlockWidths]
    schedule: list[float] | None = None

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        for row in self.blocks:
            block = _block(model, row.block)
            a, mlp = block.attention, block.mlp
            if row.kv_heads is not None:
                if a is None or row.kv_heads > a.kv_heads:
                    raise InputError(f"{row.block}: {row.kv_heads} KV groups kept, but it has "
                                     f"{a.kv_heads if a else 'no attention'}", hint=CORRUPT)
                decoders.shrink_attention(model, a, range(row.kv_heads), values=False)
            if row.intermediate is not None:
                if mlp is None or row.intermediate > mlp.width:
                    raise InputError(f"{row.block}: {row.intermediate} MLP channels kept, but it has "
                                     f"{mlp.width if mlp else 'no MLP'}", hint=CORRUPT)
                decoders.shrink_mlp(model, mlp, range(row.intermediate), values=False)
        found = decoders.decoder_blocks(model)
        if found:
            decoders.set_widths(model, found[1])
        return model


class BlocksEdit(Edit):
    """Whole blocks removed from a stack; the rest renumbered."""

    kind: ClassVar[str] = "remove_blocks"
    shrinks: ClassVar[bool] = True
    stack: str
    removed: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    influence: list[float] | None = None  # each block's influence on the data, as measured (a record)

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        found = decoders.decoder_blocks(model)
        stack = found[0] if found else None
        if stack is None or stack.prefix != self.stack:
            raise InputError(f"the model has no stack of blocks {self.stack!r}", hint=CORRUPT)
        removed = sorted(set(self.removed))
        if removed[-1] >= len(stack.layers) or len(removed) >= len(stack.layers):
            raise InputError(f"the edit removes blocks {removed} of {len(stack.layers)}", hint=CORRUPT)
        decoders.remove_blocks(model, stack, removed)
        return model
