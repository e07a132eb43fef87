"""The edits of decoder surgery (decoders.py), replayed on load: Conv1D layers turned Linear, KV groups and
MLP channels removed (each block's widths), whole blocks removed."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modelzip_cli import decoders
from modelzip_cli.edits import EditSchema, register_edit
from modelzip_cli.errors import InputError
from modelzip_cli.format import CORRUPT, Manifest

Positive = Annotated[int, Field(ge=1)]


class Conv1DEdit(EditSchema):
    modules: list[str]


@register_edit("conv1d_to_linear", Conv1DEdit)
def _replay_conv1d(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    found = set(decoders.conv1d_layers(model))
    missing = [n for n in edit["modules"] if n not in found]
    if missing:
        raise InputError(f"there is no Conv1D layer {missing[0]!r} in the model", hint=CORRUPT)
    decoders.conv1d_to_linear(model, edit["modules"], values=False)
    return model


class BlockWidths(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    block: str
    kv_heads: Positive | None = None  # KV groups kept (None: attention left as it was)
    intermediate: Positive | None = None  # MLP channels kept


class DecoderEdit(EditSchema):
    ratio: float = Field(ge=0, lt=1)
    importance: str
    blocks: list[BlockWidths]
    schedule: list[float] | None = None


def _block(model: nn.Module, name: str) -> decoders.Block:
    found = decoders.decoder_blocks(model)
    block = next((b for b in found[1] if b.name == name), None) if found else None
    if block is None:
        raise InputError(f"there is no decoder block {name!r} in the model", hint=CORRUPT)
    return block


@register_edit("prune_decoder", DecoderEdit)
def _replay_decoder(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    blocks = []
    for row in edit["blocks"]:
        block = _block(model, row["block"])
        if row["kv_heads"] is not None:
            if block.attention is None or row["kv_heads"] > block.attention.kv_heads:
                raise InputError(f"{row['block']}: {row['kv_heads']} KV groups kept, but it has "
                                 f"{block.attention.kv_heads if block.attention else 'no attention'}", hint=CORRUPT)
            decoders.shrink_attention(model, block.attention, range(row["kv_heads"]), values=False)
        if row["intermediate"] is not None:
            if block.mlp is None or row["intermediate"] > block.mlp.width:
                raise InputError(f"{row['block']}: {row['intermediate']} MLP channels kept, but it has "
                                 f"{block.mlp.width if block.mlp else 'no MLP'}", hint=CORRUPT)
            decoders.shrink_mlp(model, block.mlp, range(row["intermediate"]), values=False)
        blocks.append(block)
    found = decoders.decoder_blocks(model)
    decoders.set_widths(model, found[1] if found else blocks)
    return model


class BlocksEdit(EditSchema):
    stack: str
    removed: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    influence: list[float] | None = None  # each block's influence on the data, as measured (a record)


@register_edit("remove_blocks", BlocksEdit)
def _replay_blocks(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    found = decoders.decoder_blocks(model)
    stack = found[0] if found else None
    if stack is None or stack.prefix != edit["stack"]:
        raise InputError(f"the model has no stack of blocks {edit['stack']!r}", hint=CORRUPT)
    removed = sorted(set(edit["removed"]))
    if removed[-1] >= len(stack.layers) or len(removed) >= len(stack.layers):
        raise InputError(f"the edit removes blocks {removed} of {len(stack.layers)}", hint=CORRUPT)
    decoders.remove_blocks(model, stack, removed)
    return model
