"""Typed edits: every structural change a technique makes, as a class that owns its fields and its replay.

A technique returns `Edit` objects; the manifest stores them as plain data (`{"kind": ..., ...}`, `to_dict`).
Loading builds the architecture afresh, reads each stored edit back through its class (`parse`: strict
fields, checked before anything is replayed, since a manifest is an untrusted file) and replays them in
order before the stored tensors are loaded strictly. An edit kind's name appears only in its class; a new
kind is one class (subclassing `Edit` registers it). The surgery itself lives in `nn/` and is shared with the
techniques, so there is one implementation of each change.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from modelzip_cli.checkpoint.format import CORRUPT, Manifest, NonNegInt, describe_error
from modelzip_cli.errors import InputError, ModelzipError, first_line
from modelzip_cli.nn import int8
from modelzip_cli.nn.surgery import (
    dependency_graph,
    factorized,
    fold_batchnorm,
    plain_int8,
    quiet_pruning,
    remove_heads,
    replace_module,
    submodule,
)
from modelzip_cli.nn.weight_only import WeightOnlyEmbedding, WeightOnlyLinear, check_embedding


class Edit(BaseModel):
    """One recorded change. Subclasses set `kind` (the stored name) and override `replay` where the change
    rebuilds modules; an edit whose result lives in the tensors alone (zeros) replays as nothing."""

    model_config = ConfigDict(strict=True, extra="forbid")
    kind: ClassVar[str]
    shrinks: ClassVar[bool] = False  # layers lose units: the model declares fewer values than its config
    quantizes: ClassVar[bool] = False  # the model holds integer layers: float-only techniques refuse it
    meta_safe: ClassVar[bool] = True  # the replay only builds modules, so it runs on the meta device
    KINDS: ClassVar[dict[str, type[Edit]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Edit.KINDS[cls.kind] = cls

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        return model

    def scheme(self) -> str | None:
        """The quantization scheme this edit gives the model (export reads it), or None."""
        return None

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.model_dump(exclude_defaults=True)}

    @staticmethod
    def parse(data: dict, i: int = 1) -> Edit:
        """A stored edit read back through its class; errors name the edit and the field."""
        kind = data.get("kind")
        if kind not in Edit.KINDS:
            raise InputError(f"edit {i} of the manifest has unknown kind {kind!r}",
                             hint="the file was written by a newer modelzip, or is corrupt")
        try:
            return Edit.KINDS[kind].model_validate({k: v for k, v in data.items() if k != "kind"})
        except ValidationError as exc:
            raise InputError(f"edit {i} ({kind}) of the manifest: {describe_error(exc.errors()[0])}",
                             hint=CORRUPT) from None


def validated_edits(manifest: Manifest) -> list[Edit]:
    """Every edit of the manifest, checked against its class."""
    return [Edit.parse(edit, i) for i, edit in enumerate(manifest.edits, 1)]


def is_quantized(manifest: Manifest) -> bool:
    return any(Edit.KINDS.get(e.get("kind")) is not None and Edit.KINDS[e["kind"]].quantizes for e in manifest.edits)


def replay_edits(model: nn.Module, manifest: Manifest, edits: list[Edit] | None = None) -> nn.Module:
    """Apply `edits` (default: all the manifest's, validated), in order, to a freshly built model. Returns the
    (possibly new) model. An edit that does not fit the model is one line naming it."""
    for i, edit in enumerate(validated_edits(manifest) if edits is None else edits, 1):
        try:
            model = edit.replay(model, manifest)
        except ModelzipError as exc:
            raise type(exc)(f"edit {i} ({edit.kind}) of the manifest: {exc.message}", hint=exc.hint) from None
        except Exception as exc:  # a forged edit that the checks did not foresee
            raise InputError(f"edit {i} ({edit.kind}) of the manifest does not fit {manifest.arch}: "
                             f"{first_line(exc)}",
                             hint=CORRUPT) from None
    return model


# ---------------------------------------------------------------------------------------------------
# Pruning: magnitude zeros live in the tensors; structured pruning replays Torch-Pruning's history.


class StructuredEdit(Edit):
    kind: ClassVar[str] = "prune_structured"
    shrinks: ClassVar[bool] = True
    ratio: float = Field(ge=0, lt=1)
    history: list[list[Any]]  # Torch-Pruning's pruning history: [layer name, output side?, unit indices]
    schedule: list[float] | None = None

    @field_validator("history")
    @classmethod
    def _history_rows(cls, rows: list[list[Any]]) -> list[list[Any]]:
        for row in rows:
            if not (len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], bool) and isinstance(row[2], list)
                    and all(type(i) is int and i >= 0 for i in row[2])):
                raise ValueError("each row must be [layer name, true/false, [unit indices ≥ 0]]")
        return rows

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        return _replay_structured(model, self, manifest)


class MagnitudeEdit(Edit):
    """Zeros live in the tensors themselves; the edit is history only."""

    kind: ClassVar[str] = "prune_magnitude"
    ratio: float = Field(ge=0, lt=1)
    scope: Literal["global", "layer"]
    layers: list[str]
    schedule: list[float] | None = None



def _replay_structured(model: nn.Module, edit: StructuredEdit, manifest: Manifest) -> nn.Module:
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    for name, out_channels, idxs in edit.history:
        m = submodule(model, name, (nn.Module,), "module")
        dim = 0 if out_channels else 1  # output units, or input features
        width = next((t.shape[dim] for t in m.parameters(recurse=False) if t.ndim > dim), None)
        if width is not None and idxs and max(idxs) >= width:
            raise InputError(f"the pruning history removes unit {max(idxs)} of {name!r}, which has {width}",
                             hint=CORRUPT)
    graph = dependency_graph(model, manifest.example_input().to(device))
    with quiet_pruning():
        graph.load_pruning_history([tuple(h) for h in edit.history])
    return model


# Attention heads: q, k and v lose the same heads' output rows, the output projection the matching input
# columns. Found by names and shapes (the q/k/v Linears of one module, and the first Linear run after v that
# reads their width), so any family with separate projections works; fused or grouped projections are left.


class HeadsEdit(Edit):
    kind: ClassVar[str] = "prune_heads"
    shrinks: ClassVar[bool] = True
    ratio: float = Field(ge=0, lt=1)
    # every row: [q, k, v, o (qualified names), head size, [heads removed, indices among the heads then]]
    blocks: list[list[Any]]

    @field_validator("blocks")
    @classmethod
    def _rows(cls, rows: list[list[Any]]) -> list[list[Any]]:
        for row in rows:
            if not (len(row) == 6 and all(isinstance(x, str) for x in row[:4]) and type(row[4]) is int
                    and row[4] >= 1 and isinstance(row[5], list) and all(type(h) is int and h >= 0 for h in row[5])
                    and len(set(row[5])) == len(row[5])):
                raise ValueError("each row must be [q, k, v, o, head size ≥ 1, [distinct head indices ≥ 0]]")
        return rows


    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        return _replay_heads(model, self)


def _replay_heads(model: nn.Module, edit: HeadsEdit) -> nn.Module:
    for q, k, v, o, head_size, heads in edit.blocks:
        projections = [submodule(model, x, (nn.Linear,), "Linear") for x in (q, k, v)]
        out = submodule(model, o, (nn.Linear,), "Linear")
        width = projections[0].out_features
        if {p.out_features for p in projections} != {width} or out.in_features != width or width % head_size:
            raise InputError(f"{q}, {k}, {v} and {o} do not form attention heads of size {head_size}", hint=CORRUPT)
        if heads and (max(heads) >= width // head_size or len(heads) >= width // head_size):
            raise InputError(f"the edit removes heads {heads} of {q.rpartition('.')[0] or q}, which has "
                             f"{width // head_size}", hint=CORRUPT)
        remove_heads(model, {"q": q, "k": k, "v": v, "o": o, "head_size": head_size}, heads)
    return model


class UnstructuredEdit(Edit):
    """Wanda's zeros (and SparseGPT's updated weights) live in the tensors; the edit is history only."""

    kind: ClassVar[str] = "prune_unstructured"
    method: Literal["wanda", "sparsegpt"]
    ratio: float = Field(ge=0, lt=1)
    layers: list[str]


# ---------------------------------------------------------------------------------------------------
# Low rank: Linear(in→out) becomes Linear(in→r, no bias) → Linear(r→out)


class LowRankEdit(Edit):
    kind: ClassVar[str] = "lowrank"
    shrinks: ClassVar[bool] = True
    ranks: dict[str, Annotated[int, Field(ge=1)]]

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        for name, rank in self.ranks.items():
            m = submodule(model, name, (nn.Linear,), "Linear")
            if rank > min(m.in_features, m.out_features):  # never larger than the layer: it would only allocate
                raise InputError(f"rank {rank:,} of {name!r} exceeds its size {m.out_features}×{m.in_features}",
                                 hint=CORRUPT)
            replace_module(model, name, factorized(m.in_features, m.out_features, rank, m.bias is not None))
        return model


# ---------------------------------------------------------------------------------------------------
# Weight-only quantization: integer weights + scales + zero points, computed by a packed kernel
# (wo_kernels.py) chosen per layer shape by measurement, or against a cached dequantized weight.


class WeightOnlyEdit(Edit):
    kind: ClassVar[str] = "quantize_weight_only"
    quantizes: ClassVar[bool] = True
    modules: list[str]
    bits: Literal[4, 8]
    group_size: NonNegInt

    def scheme(self) -> str:
        return "weight-only" if self.bits == 8 else "weight-only int4"

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        for name in self.modules:
            m = submodule(model, name, (nn.Linear, nn.Embedding), "Linear or Embedding")
            if isinstance(m, nn.Embedding):
                check_embedding(m)
                replace_module(model, name, WeightOnlyEmbedding(m.num_embeddings, m.embedding_dim, self.bits,
                                                                self.group_size, m.padding_idx))
                continue
            replace_module(model, name, WeightOnlyLinear(m.in_features, m.out_features, m.bias is not None,
                                                         self.bits, self.group_size))
        return model


# ---------------------------------------------------------------------------------------------------
# int8 dynamic / static / QAT: modelzip's plain-int8 modules (int8.py) in place of the float layers


# BatchNorm folded into the convolution before it (static int8 of CNNs): one integer kernel instead of an
# int8 conv plus a float BatchNorm, and a smaller file. Exact in eval mode, up to float rounding.


class FoldEdit(Edit):
    kind: ClassVar[str] = "fold_batchnorm"
    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]]

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        fold_batchnorm(model, self.pairs, values=False)
        return model


class DynamicEdit(Edit):
    kind: ClassVar[str] = "quantize_dynamic"
    quantizes: ClassVar[bool] = True
    modules: list[str]
    activations: Literal[int8.ACTIVATIONS]
    smoothed: list[str] = []  # layers holding per-input-channel smoothing scales (activation outliers)

    @field_validator("smoothed")
    @classmethod
    def _smoothed_are_quantized(cls, names: list[str], info) -> list[str]:
        if set(names) - set(info.data.get("modules", [])):
            raise ValueError("every smoothed layer must be one of the edit's modules")
        return names

    def scheme(self) -> str:
        return "dynamic"

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        for name in self.modules:
            layer = submodule(model, name, (nn.Linear,), "Linear")
            replace_module(model, name, plain_int8(layer, "dynamic", self.activations,
                                                   smoothed=name in self.smoothed))
        return model


class StaticEdit(Edit):
    kind: ClassVar[str] = "quantize_static"
    quantizes: ClassVar[bool] = True
    modules: list[str]
    qat: bool = False
    observer: str = "minmax"  # how the input ranges were calibrated (a record; replays ignore it)
    reduced_range: bool = False
    folded: list[str] = []

    def scheme(self) -> str:
        return "static"

    def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
        for name in self.modules:
            layer = submodule(model, name, (nn.Linear, nn.Conv1d, nn.Conv2d), "Linear or Conv")
            replace_module(model, name, plain_int8(layer, "static", reduced_range=self.reduced_range))
        for name in self.folded:  # BatchNorms a first-wave file folded into the conv before them
            submodule(model, name, (nn.modules.batchnorm._BatchNorm,), "BatchNorm")
            replace_module(model, name, nn.Identity())
        return model
