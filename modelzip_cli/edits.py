"""Replayable module surgery: the modules techniques put in place, and the registry that rebuilds them.

Every structural change a technique makes is recorded in the manifest as a plain-data edit
(`{"kind": ..., ...}`). Loading builds the architecture afresh and replays the edits, in order, with the
functions registered here, before the stored tensors are loaded strictly. Techniques (a higher layer) use
the same surgery functions, so there is one implementation of each change.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from modelzip_cli import (
    int8,
    quant_backend,  # noqa: F401  (registers the optional torch.ao accelerator)
    wo_kernels,
)
from modelzip_cli.errors import InputError, ModelzipError, first_line
from modelzip_cli.format import CORRUPT, Manifest, NonNegInt, describe_error
from modelzip_cli.gptq import Quantized, rtn

ReplayFn = Callable[[nn.Module, dict, Manifest], nn.Module]
EDIT_REPLAYS: dict[str, ReplayFn] = {}
EDIT_SCHEMAS: dict[str, type[BaseModel]] = {}

# Every replay only builds modules (Torch-Pruning traces shapes only): the model a manifest describes is built
# on the meta device and checked against the stored tensors without allocating anything.
META_SAFE_EDITS = {"prune_magnitude", "prune_unstructured", "prune_structured", "prune_heads", "lowrank",
                   "quantize_weight_only", "quantize_dynamic", "quantize_static", "fold_batchnorm"}


class EditSchema(BaseModel):
    """The fields of one edit kind, checked before its replay (a manifest is read from an untrusted file)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    kind: str


def register_edit(kind: str, schema: type[EditSchema]) -> Callable[[ReplayFn], ReplayFn]:
    def decorate(fn: ReplayFn) -> ReplayFn:
        EDIT_REPLAYS[kind] = fn
        EDIT_SCHEMAS[kind] = schema
        return fn

    return decorate


def validated_edits(manifest: Manifest) -> list[dict]:
    """Every edit of the manifest checked against its kind's schema; errors name the edit and the field."""
    out = []
    for i, edit in enumerate(manifest.edits, 1):
        kind = edit.get("kind")
        if kind not in EDIT_REPLAYS:
            raise InputError(f"edit {i} of the manifest has unknown kind {kind!r}",
                             hint="the file was written by a newer modelzip, or is corrupt")
        try:
            out.append(EDIT_SCHEMAS[kind].model_validate(edit).model_dump())
        except ValidationError as exc:
            raise InputError(f"edit {i} ({kind}) of the manifest: {describe_error(exc.errors()[0])}",
                             hint=CORRUPT) from None
    return out


def replay_edits(model: nn.Module, manifest: Manifest, edits: list[dict] | None = None) -> nn.Module:
    """Apply `edits` (default: all the manifest's, validated), in order, to a freshly built model. Returns the
    (possibly new) model. An edit that does not fit the model is one line naming it."""
    for i, edit in enumerate(validated_edits(manifest) if edits is None else edits, 1):
        kind = edit["kind"]
        try:
            model = EDIT_REPLAYS[kind](model, edit, manifest)
        except ModelzipError as exc:
            raise type(exc)(f"edit {i} ({kind}) of the manifest: {exc.message}", hint=exc.hint) from None
        except Exception as exc:  # a forged edit that the checks below did not foresee
            raise InputError(f"edit {i} ({kind}) of the manifest does not fit {manifest.arch}: "
                             f"{first_line(exc)}",
                             hint=CORRUPT) from None
    return model


def to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a model's float tensors to `dtype` (a technique's result back to its input's dtype), except the
    scales of modelzip's quantized modules (int8, weight-only), which stay float32: they compute in float32
    and give their output in the input's dtype."""
    keep = [(m, name, b) for m in model.modules() if callable(getattr(m, "logical_weights", None))
            for name, b in m.named_buffers(recurse=False) if b.is_floating_point()]
    model.to(dtype)
    for m, name, b in keep:
        setattr(m, name, b)
    return model


def submodule(model: nn.Module, name: str, types: tuple[type, ...], what: str) -> nn.Module:
    """The submodule an edit names, which must exist and be one of `types`."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise InputError(f"there is no module {name!r} in the model", hint=CORRUPT) from None
    if not isinstance(m, types):
        raise InputError(f"module {name!r} is a {type(m).__name__}, not a {what}", hint=CORRUPT)
    return m


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ---------------------------------------------------------------------------------------------------
# Pruning: magnitude zeros live in the tensors; structured pruning replays Torch-Pruning's history.


@contextlib.contextmanager
def quiet_pruning() -> Iterator[None]:
    """Torch-Pruning prints and warns while tracing; keep the user's terminal clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def dependency_graph(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning's dependency graph: which layers must shrink together."""
    import torch_pruning as tp

    with quiet_pruning(), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


class StructuredEdit(EditSchema):
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


class MagnitudeEdit(EditSchema):
    ratio: float = Field(ge=0, lt=1)
    scope: Literal["global", "layer"]
    layers: list[str]
    schedule: list[float] | None = None


@register_edit("prune_structured", StructuredEdit)
def _replay_structured(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    for name, out_channels, idxs in edit["history"]:
        m = submodule(model, name, (nn.Module,), "module")
        dim = 0 if out_channels else 1  # output units, or input features
        width = next((t.shape[dim] for t in m.parameters(recurse=False) if t.ndim > dim), None)
        if width is not None and idxs and max(idxs) >= width:
            raise InputError(f"the pruning history removes unit {max(idxs)} of {name!r}, which has {width}",
                             hint=CORRUPT)
    graph = dependency_graph(model, manifest.example_input().to(device))
    with quiet_pruning():
        graph.load_pruning_history([tuple(h) for h in edit["history"]])
    return model


def run_with_hooks(model: nn.Module, example: torch.Tensor, hooks: list) -> None:
    """One forward pass on `example` (no gradients) with these hook handles in place; removed afterwards."""
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()


# Attention heads: q, k and v lose the same heads' output rows, the output projection the matching input
# columns. Found by names and shapes (the q/k/v Linears of one module, and the first Linear run after v that
# reads their width), so any family with separate projections works; fused or grouped projections are left.

QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
HEAD_COUNT_ATTRS = ("num_attention_heads", "n_heads", "num_heads", "heads")


def attention_blocks(model: nn.Module, example: torch.Tensor) -> tuple[list[dict], list[str]]:
    """The attention modules whose heads can be removed — `{"q", "k", "v", "o", "head_size"}` (qualified
    names) — and a note for each attention module found but left (fused or grouped projections)."""
    order: list[str] = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    run_with_hooks(model, example, [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
                                    for n, m in linears.items()])
    blocks, notes = [], []
    for name, m in model.named_modules():
        names = next((t for t in QKV_NAMES if all(isinstance(getattr(m, c, None), nn.Linear) for c in t)), None)
        if names is None:
            continue
        q, k, v = (f"{name}.{c}" if name else c for c in names)
        widths = {linears[x].out_features for x in (q, k, v)}
        head_size = getattr(m, "attention_head_size", None) or getattr(m, "head_dim", None)
        count = next((getattr(m, a) for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int)), None)
        if head_size is None and count and len(widths) == 1 and next(iter(widths)) % count == 0:
            head_size = next(iter(widths)) // count  # only a head count kept: the size follows
        if not isinstance(head_size, int) or len(widths) != 1 or next(iter(widths)) % head_size:
            notes.append(f"{name}: attention with grouped or unequal q/k/v widths left as it was")
            continue
        width = widths.pop()
        after = order[order.index(v) + 1:] if v in order else []
        o = next((x for x in after if x not in (q, k, v) and linears[x].in_features == width), None)
        if o is None:
            notes.append(f"{name}: no output projection found after {v}; its heads left as they were")
            continue
        blocks.append({"q": q, "k": k, "v": v, "o": o, "head_size": head_size})
    return blocks, notes


def head_channels(heads: list[int], head_size: int) -> list[int]:
    return [h * head_size + i for h in heads for i in range(head_size)]


def remove_heads(model: nn.Module, block: dict, heads: list[int]) -> None:
    """Remove `heads` (indices among the block's current heads) from q, k, v and the output projection, and
    lower the attention module's head count where it keeps one."""
    import torch_pruning as tp

    idxs = head_channels(sorted(heads), block["head_size"])
    with quiet_pruning():
        for x in ("q", "k", "v"):
            tp.prune_linear_out_channels(model.get_submodule(block[x]), idxs)
        tp.prune_linear_in_channels(model.get_submodule(block["o"]), idxs)
    attn = model.get_submodule(block["q"].rpartition(".")[0]) if "." in block["q"] else model
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, getattr(attn, attr) - len(heads))
    if isinstance(getattr(attn, "all_head_size", None), int):
        attn.all_head_size -= len(idxs)


class HeadsEdit(EditSchema):
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


def heads_row(block: dict, heads: list[int]) -> list:
    return [block["q"], block["k"], block["v"], block["o"], block["head_size"], sorted(heads)]


@register_edit("prune_heads", HeadsEdit)
def _replay_heads(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    for q, k, v, o, head_size, heads in edit["blocks"]:
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


class UnstructuredEdit(EditSchema):
    method: Literal["wanda", "sparsegpt"]
    ratio: float = Field(ge=0, lt=1)
    layers: list[str]


@register_edit("prune_unstructured", UnstructuredEdit)
def _replay_unstructured(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    return model  # zeros (and SparseGPT's updated weights) live in the tensors; the edit is history only


@register_edit("prune_magnitude", MagnitudeEdit)
def _replay_magnitude(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    return model  # zeros live in the tensors themselves; the edit is history only


# ---------------------------------------------------------------------------------------------------
# Low rank: Linear(in→out) becomes Linear(in→r, no bias) → Linear(r→out)


def factorized(in_features: int, out_features: int, rank: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))


class LowRankEdit(EditSchema):
    ranks: dict[str, Annotated[int, Field(ge=1)]]


@register_edit("lowrank", LowRankEdit)
def _replay_lowrank(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    for name, rank in edit["ranks"].items():
        m = submodule(model, name, (nn.Linear,), "Linear")
        if rank > min(m.in_features, m.out_features):  # never larger than the layer: it would only allocate
            raise InputError(f"rank {rank:,} of {name!r} exceeds its size {m.out_features}×{m.in_features}",
                             hint=CORRUPT)
        replace_module(model, name, factorized(m.in_features, m.out_features, rank, m.bias is not None))
    return model


# ---------------------------------------------------------------------------------------------------
# Weight-only quantization: integer weights + scales + zero points, computed by a packed kernel
# (wo_kernels.py) chosen per layer shape by measurement, or against a cached dequantized weight.


class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored as int8, or int4 packed two per byte, with per-group scales. It runs
    on the kernel measured fastest here for its shape and the call's row count (`kernel_for`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if 0 < group_size < in_features else in_features
        groups = math.ceil(in_features / self.group_size)
        padded = groups * self.group_size
        cols = padded if bits == 8 else math.ceil(padded / 2)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zero_points", torch.zeros(out_features, groups, dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scheme = f"int{bits} weight-only (group {self.group_size})"
        self._geo = wo_kernels.Geometry(bits, in_features, out_features, self.group_size, groups)
        self._kernels = wo_kernels.LayerKernels(self._geo)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int) -> WeightOnlyLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        q._quantize_from(linear.weight)
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
        self._store(rtn(weight, self.bits, self.group_size))

    def _store(self, q: Quantized) -> None:
        """Write integers (out, in), scales and zero points (out, groups) into the stored layout: columns
        padded to whole groups (with the value a zero weight takes), int4 packed two per byte."""
        pad = self.scales.shape[1] * self.group_size - self.in_features
        ints = F.pad(q.ints, (0, pad), value=0) if self.bits == 8 else \
            torch.cat([q.ints, q.zero_points[:, -1:].expand(-1, pad)], dim=1)
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
        return self._kernels.stored(b["qweight"], b["scales"], b["zero_points"], self.dequantized_weight)

    def kernel_for(self, rows: int, dtype: torch.dtype = torch.float32) -> str:
        """The kernel a call on `rows` rows of `dtype` runs on (measured on first asking, then kept)."""
        return self._kernels.choose(self._geo, self._stored(), rows, dtype, self.bias)

    def kernel_notes(self) -> dict[str, str]:
        """kernel → why this layer could not run it (a kernel MODELZIP_WO_KERNEL forced)."""
        return dict(self._kernels.notes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the call bound for inputs of this size, dtype and use_kernel block (everything settled once), unless
        # autograd or a trace must see the dequantization; anything else goes through _forward
        k = self._kernels
        run = k.fast.get(x.numel())
        if run is not None and x.dtype == k.dtype and wo_kernels.SCOPE[-1] == k.scope \
                and not torch.is_grad_enabled() and not wo_kernels.tracing():
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
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: packed tensors must follow
        self._kernels = wo_kernels.LayerKernels(self._geo)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernels = wo_kernels.LayerKernels(self._geo)
        super()._load_from_state_dict(*args, **kwargs)

    def logical_weights(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.dequantized_weight()}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

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


class WeightOnlyEdit(EditSchema):
    modules: list[str]
    bits: Literal[4, 8]
    group_size: NonNegInt


@register_edit("quantize_weight_only", WeightOnlyEdit)
def _replay_weight_only(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    for name in edit["modules"]:
        m = submodule(model, name, (nn.Linear, nn.Embedding), "Linear or Embedding")
        if isinstance(m, nn.Embedding):
            check_embedding(m)
            replace_module(model, name, WeightOnlyEmbedding(m.num_embeddings, m.embedding_dim, edit["bits"],
                                                            edit["group_size"], m.padding_idx))
            continue
        replace_module(model, name, WeightOnlyLinear(m.in_features, m.out_features, m.bias is not None,
                                                     edit["bits"], edit["group_size"]))
    return model


# ---------------------------------------------------------------------------------------------------
# int8 dynamic / static / QAT: modelzip's plain-int8 modules (int8.py) in place of the float layers


def plain_int8(layer: nn.Module, kind: str, activations: str = "per-token", reduced_range: bool = False,
               smoothed: bool = False) -> nn.Module:
    """An empty plain-int8 module shaped like the float `layer` (the stored tensors fill it)."""
    if kind == "dynamic":
        return int8.DynamicInt8Linear(layer.in_features, layer.out_features, layer.bias is not None, activations,
                                      layer.weight.dtype, smoothed)
    if isinstance(layer, nn.Linear):
        return int8.StaticInt8Linear(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.dtype,
                                     reduced_range)
    int8.check_conv(layer)
    return int8.StaticInt8Conv(layer.weight.ndim - 2, layer.in_channels, layer.out_channels, layer.kernel_size,
                               layer.stride, layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                               layer.weight.dtype, reduced_range)


# BatchNorm folded into the convolution before it (static int8 of CNNs): one integer kernel instead of an
# int8 conv plus a float BatchNorm, and a smaller file. Exact in eval mode, up to float rounding.

CONVS = (nn.Conv1d, nn.Conv2d)


def conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor, convs: set[str]) -> list[list[str]]:
    """[conv, batchnorm] for every BatchNorm that reads exactly the output of one of `convs` (and nothing
    else reads it first), found by running the example."""
    produced: dict[int, str] = {}
    pairs: list[list[str]] = []
    hooks = []
    for name, m in model.named_modules():
        if name in convs and isinstance(m, CONVS):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: produced.__setitem__(id(o), n)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.affine:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, i, n=name: pairs.append([produced[id(i[0])], n]) if id(i[0]) in produced else None))
    run_with_hooks(model, example, hooks)
    seen, unique = set(), []
    for conv, bn in pairs:  # a module run twice is paired once
        if conv not in seen and bn not in {b for _, b in unique}:
            seen.add(conv)
            unique.append([conv, bn])
    return unique


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[list[str]], values: bool = True) -> None:
    """Fold each BatchNorm into its conv (weight and bias; `values=False` only reshapes, for replays) and put
    an Identity where the BatchNorm was."""
    for conv_name, bn_name in pairs:
        conv = submodule(model, conv_name, CONVS, "Conv1d or Conv2d")
        bn = submodule(model, bn_name, (nn.modules.batchnorm._BatchNorm,), "BatchNorm")
        if bn.num_features != conv.out_channels:
            raise InputError(f"{bn_name} ({bn.num_features} features) does not follow {conv_name} "
                             f"({conv.out_channels} channels)", hint=CORRUPT)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        if values:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.ndim - 1)).to(conv.weight.dtype))
            conv.bias.copy_(((conv.bias - bn.running_mean) * scale + bn.bias).to(conv.bias.dtype))
        replace_module(model, bn_name, nn.Identity())


class FoldEdit(EditSchema):
    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]]


@register_edit("fold_batchnorm", FoldEdit)
def _replay_fold(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    fold_batchnorm(model, edit["pairs"], values=False)
    return model


class DynamicEdit(EditSchema):
    modules: list[str]
    activations: Literal[int8.ACTIVATIONS]
    smoothed: list[str] = []  # layers holding per-input-channel smoothing scales (activation outliers)

    @field_validator("smoothed")
    @classmethod
    def _smoothed_are_quantized(cls, names: list[str], info) -> list[str]:
        if set(names) - set(info.data.get("modules", [])):
            raise ValueError("every smoothed layer must be one of the edit's modules")
        return names


class StaticEdit(EditSchema):
    modules: list[str]
    qat: bool = False
    observer: str = "minmax"  # how the input ranges were calibrated (a record; replays ignore it)
    reduced_range: bool = False
    folded: list[str] = []


@register_edit("quantize_dynamic", DynamicEdit)
def _replay_dynamic(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    for name in edit["modules"]:
        layer = submodule(model, name, (nn.Linear,), "Linear")
        replace_module(model, name, plain_int8(layer, "dynamic", edit["activations"],
                                               smoothed=name in edit["smoothed"]))
    return model


@register_edit("quantize_static", StaticEdit)
def _replay_static(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    for name in edit["modules"]:
        layer = submodule(model, name, (nn.Linear, nn.Conv1d, nn.Conv2d), "Linear or Conv")
        replace_module(model, name, plain_int8(layer, "static", reduced_range=edit["reduced_range"]))
    for name in edit["folded"]:  # BatchNorms a first-wave file folded into the conv before them
        submodule(model, name, (nn.modules.batchnorm._BatchNorm,), "BatchNorm")
        replace_module(model, name, nn.Identity())
    return model
