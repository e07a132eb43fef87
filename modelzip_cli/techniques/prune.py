"""Pruning: magnitude (unstructured), wanda and sparsegpt (unstructured, on calibration data, block by block),
structured (layers physically shrink) and gradual (cubic schedule).

Magnitude pruning finds the global k-th smallest |w| without `torch.quantile` (which refuses more than
16M elements) and without concatenating the weights (which doubles memory): a histogram over chunks
narrows the value range, then the few values left are sorted exactly.

Structured pruning removes each layer's least important units, with Torch-Pruning's dependency graph
deciding what must shrink with them (next layer's inputs, BatchNorm, a flatten feeding a Linear), and whole
attention heads. Its pruning history is the edit the manifest records. Importance, when there is data (the
calibration data, else the training data; at most IMPORTANCE_ROWS samples): what the unit or head puts into
the layer that reads it — the variance of its activation there times the squared norm of the weights that
read it (for a head, trace(W_h·Cov_h·W_hᵀ) over its columns of the output projection) — and the mean it
carried is added to that layer's bias, so removing it keeps the expected output (FLAP, An et al. 2024).
Without data, or where no single reading Linear is found, the L2 norm of the unit's own weights.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelzip_cli import tokens
from modelzip_cli.checkpoint.edits import Edit, HeadsEdit, MagnitudeEdit, StructuredEdit, UnstructuredEdit
from modelzip_cli.checkpoint.format import Manifest
from modelzip_cli.checkpoint.layers import layer_table
from modelzip_cli.errors import UsageError
from modelzip_cli.nn import decoders
from modelzip_cli.nn.surgery import (
    attention_blocks,
    dependency_graph,
    head_channels,
    heads_row,
    quiet_pruning,
    remove_heads,
)
from modelzip_cli.pipeline import sequential
from modelzip_cli.pipeline.context import Context, null_progress
from modelzip_cli.pipeline.sequential import Hessian
from modelzip_cli.techniques import recover
from modelzip_cli.techniques.base import FineTune, MethodConfig, Op, Recover, Result, Selection, handler, register
from modelzip_cli.techniques.gptq import sparsegpt, wanda
from modelzip_cli.techniques.select import WEIGHTED, output_layer, select_modules, unsupported_layers

IMPORTANCE_ROWS = 256  # samples that measure unit and head importance
CHUNK = 1 << 22  # elements per temporary (16 MB of float32): bounds extra memory whatever the model size
BINS = 4096
GRAPH_SECONDS = 600  # a dependency-graph search that runs longer is given up with one line (it can run for hours)


class _PruneConfig(Recover, MethodConfig, Selection, FineTune):  # Recover first: its data needs win
    op: ClassVar[str] = "prune"
    ratio: float = Field(ge=0, lt=1)  # fraction of weights (magnitude) or units (structured) to remove


class MagnitudeConfig(_PruneConfig):
    """Zero the smallest |w|: one threshold over all selected weights (global), or the ratio in every layer."""

    method: ClassVar[str] = "magnitude"
    scope: Literal["global", "layer"] = "global"


class StructuredConfig(_PruneConfig):
    """Remove whole units (neurons, channels) by L2 norm; layers physically shrink. `uniform`: every decoder
    block keeps the same number of KV groups and MLP channels (units still ranked within each block), so that
    the result has a standard config (prune_decoder.py)."""

    method: ClassVar[str] = "structured"
    uniform: bool = False


class GradualConfig(_PruneConfig):
    """Reach the ratio over `steps` on a cubic schedule, fine-tuning between steps."""

    method: ClassVar[str] = "gradual"
    granularity: Literal["unstructured", "structured"] = "unstructured"
    scope: Literal["global", "layer"] = "global"  # unstructured granularity only
    steps: int = Field(5, ge=1, le=1000)  # (a billion steps never ends)
    uniform: bool = False  # structured granularity only: as StructuredConfig.uniform

    @model_validator(mode="after")
    def _uniform_is_structured(self) -> GradualConfig:
        if self.uniform and self.granularity != "structured":
            raise ValueError("--uniform applies to --granularity structured (whole units) only")
        return self


class WandaConfig(_PruneConfig):
    """Zero, in every output row of every layer, the weights with the least |w|·‖x‖ on calibration data,
    block by block (each block calibrated on the pruned blocks before it)."""

    method: ClassVar[str] = "wanda"
    calib_batches: int = Field(16, ge=1)
    calib_batch_size: int = Field(8, ge=1)

    def required_data(self) -> set[str]:
        return {"calib_data"} | super().required_data()


class SparseGPTConfig(WandaConfig):
    """Zero the weights whose removal costs the layer's output least and update the others to make up for
    them (SparseGPT: second-order, through the inverse input Hessian), block by block."""

    method: ClassVar[str] = "sparsegpt"
    damp: float = Field(0.01, gt=0, le=1)  # added to the Hessian's diagonal, as a share of its mean


class LayersConfig(_PruneConfig):
    """Remove whole blocks of a decoder, those that change their input least on calibration data (ShortGPT):
    `ratio` of them, or `blocks` of them."""

    method: ClassVar[str] = "layers"
    ratio: float = Field(0.0, ge=0, lt=1)  # fraction of blocks (0 with `blocks`)
    blocks: int | None = Field(None, ge=1)

    def required_data(self) -> set[str]:
        return {"calib_data"} | super().required_data()

    @model_validator(mode="after")
    def _ratio_or_blocks(self) -> LayersConfig:
        if (self.blocks is None) == (self.ratio == 0):
            raise ValueError("give one of ratio and blocks")
        return self


PruneConfig = MagnitudeConfig | StructuredConfig | GradualConfig | WandaConfig | SparseGPTConfig | LayersConfig


# ---------------------------------------------------------------------------------------------------
# Magnitude: the k-th smallest |w| over many tensors, in bounded memory


def _chunks(tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    for t in tensors:
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), CHUNK):
            yield flat[i:i + CHUNK]


def _count(tensors: list[torch.Tensor], pred: Callable[[torch.Tensor], torch.Tensor]) -> int:
    return sum(int(pred(c.abs()).sum()) for c in _chunks(tensors))


SAMPLE = 1 << 20  # |w| values sampled to bracket the k-th smallest before the one exact pass
SAMPLE_SIGMAS = 6  # bracket width either side, in binomial standard deviations of the sample's rank
KEEP_AT_MOST = 1 << 24  # values inside the bracket kept for the exact sort (64 MB); more: narrow by histograms


def _sample(tensors: list[torch.Tensor], total: int) -> torch.Tensor:
    """About SAMPLE values of |w|, every `step`-th element (an odd step: no alignment with rows of even width)."""
    step = max(1, total // SAMPLE) | 1
    out, offset = [], 0
    for c in _chunks(tensors):
        start = (-offset) % step
        out.append(c[start::step].abs().float())
        offset += c.numel()
    return torch.cat(out)


class _Scratch:
    """Buffers for one chunk's |w| and two masks, reused chunk after chunk (per dtype): no fresh temporaries
    per chunk, and counts by count_nonzero (a bool tensor's sum is several times slower)."""

    def __init__(self):
        self._of: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(|c|, mask, mask), views of the buffers sized to the chunk `c`."""
        if c.dtype not in self._of:
            self._of[c.dtype] = (torch.empty(CHUNK, dtype=c.dtype), torch.empty(CHUNK, dtype=torch.bool),
                                 torch.empty(CHUNK, dtype=torch.bool))
        a, m1, m2 = (b[:c.numel()] for b in self._of[c.dtype])
        torch.abs(c, out=a)
        return a, m1, m2


def _bracketed(tensors: list[torch.Tensor], k: int, total: int) -> tuple[float, int] | None:
    """The exact answer of `kth_magnitude` in one pass over the weights after a sample: the sample brackets the
    k-th smallest |w| in [lo, hi]; one pass counts the values below lo and keeps those inside, which are
    sorted. None when the bracket missed (heavy ties, an unlucky sample): the caller narrows by histograms."""
    sample = torch.sort(_sample(tensors, total)).values
    n = sample.numel()
    rank, spread = n * k / total, SAMPLE_SIGMAS * math.sqrt(n * (k / total) * (1 - k / total)) + 2
    i_lo, i_hi = math.floor(rank - spread), math.ceil(rank + spread)
    lo = float(sample[i_lo]) if i_lo >= 0 else 0.0
    hi = float(sample[i_hi]) if i_hi < n else math.inf
    below = kept = 0
    inside = []
    scratch = _Scratch()
    for c in _chunks(tensors):
        a, lt, window = scratch(c)
        torch.lt(a, lo, out=lt)
        below += int(torch.count_nonzero(lt))
        torch.le(a, hi, out=window)
        window.logical_xor_(lt)  # lo <= |w| <= hi (below lo implies below hi)
        inside.append(a[window.nonzero().view(-1)].float())
        kept += inside[-1].numel()
        if kept > KEEP_AT_MOST:
            return None
    values = torch.sort(torch.cat(inside)).values
    if not below < k <= below + values.numel():
        return None
    threshold = float(values[k - below - 1])
    smaller = below + int(torch.searchsorted(values, torch.tensor([threshold]), right=False))
    return threshold, k - smaller


def kth_magnitude(tensors: list[torch.Tensor], k: int) -> tuple[float, int]:
    """The k-th smallest |w| (1-based) over all tensors, and how many elements equal to it are among the k.

    Memory: one chunk at a time plus a sample and a histogram; never a copy of all weights. `tensors` may be
    anything with `numel()` and `detach()` returning the tensor (streaming.py reads them from disk).
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} out of range for {total} elements")
    found = _bracketed(tensors, k, total)
    if found is not None:
        return found
    lo, hi = 0.0, max(float(c.abs().max()) for c in _chunks(tensors))
    below = 0  # elements with |w| < lo
    in_range = total
    while in_range > (1 << 20) and hi > lo:
        hist = torch.zeros(BINS, dtype=torch.float64)
        for c in _chunks(tensors):
            hist += torch.histc(c.abs().float(), bins=BINS, min=lo, max=hi).double()
        j = int(torch.searchsorted(below + hist.cumsum(0), torch.tensor([float(k)], dtype=torch.float64)))
        j = min(j, BINS - 1)
        width = (hi - lo) / BINS
        # one bin either side absorbs float rounding at bin edges; exact counts below decide
        new_lo, new_hi = lo + max(j - 1, 0) * width, min(hi, lo + (j + 2) * width)
        new_below = _count(tensors, lambda a, v=new_lo: a < v)
        new_in = _count(tensors, lambda a, a_lo=new_lo, a_hi=new_hi: (a >= a_lo) & (a <= a_hi))
        if not (new_below < k <= new_below + new_in) or new_in >= in_range:
            break  # no progress (heavy ties): sort what is left
        lo, hi, below, in_range = new_lo, new_hi, new_below, new_in
    # What is left is counted per distinct value, never kept value by value: heavy ties (bf16 weights have a
    # few thousand distinct magnitudes near a median: a 7B model's bracket held hundreds of millions of values)
    # cost as much as their distinct values
    distinct, counts = _distinct_counts(a[(a >= lo) & (a <= hi)] for a in (c.abs() for c in _chunks(tensors)))
    cumulative = below + counts.cumsum(0)
    j = int(torch.searchsorted(cumulative, torch.tensor([k], dtype=torch.int64)))
    return float(distinct[j]), k - int(cumulative[j] - counts[j])


def _distinct_counts(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted distinct values of the tensors `parts` (magnitudes: no sign, no NaN) together, and how often
    each occurs. 16-bit floats are counted per bit pattern in one table of 32768 counts (a non-negative float's
    pattern sorts as its value), nothing else kept, whatever the number of parts (with a list of per-part
    unique values instead, the threshold pass of a 7B-shaped bf16 model peaked at 6.5 GB)."""
    table: torch.Tensor | None = None
    values: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    dtype = None
    for part in parts:
        dtype = part.dtype
        if dtype in (torch.bfloat16, torch.float16):
            n = torch.bincount(part.view(torch.int16).to(torch.int32), minlength=1 << 15)
            table = n if table is None else table.add_(n)
            continue
        u, n = torch.unique(part, return_counts=True)
        values.append(u)
        counts.append(n)
        if sum(v.numel() for v in values) > KEEP_AT_MOST:
            u, n = _merged(values, counts)
            values, counts = [u], [n]
    if table is not None:
        patterns = table.nonzero().view(-1)
        return patterns.to(torch.int16).view(dtype), table[patterns]
    return _merged(values, counts)


def _merged(values: list[torch.Tensor], counts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    u, where = torch.unique(torch.cat(values), return_inverse=True)
    return u, torch.zeros(u.numel(), dtype=torch.int64).index_add_(0, where, torch.cat(counts))


@torch.no_grad()
def zero_smallest(tensors: list[torch.Tensor], k: int) -> None:
    """Set exactly the k smallest-magnitude elements (ties broken in storage order) to zero, in place."""
    if k <= 0:
        return
    threshold, ties = kth_magnitude(tensors, k)
    for t in tensors:
        ties = zero_below(t, threshold, ties)


@torch.no_grad()
def zero_below(t: torch.Tensor, threshold: float, ties: int) -> int:
    """Zero |w| below `threshold` and the first `ties` equal to it, in storage order, in place. Returns the ties
    left for the tensors after this one (the streamed path calls it one tensor at a time)."""
    flat = t.view(-1)
    scratch = _Scratch()
    for i in range(0, flat.numel(), CHUNK):
        c = flat[i:i + CHUNK]
        a, m, _ = scratch(c)
        if ties > 0:  # before zeroing: |w| of the chunk as it was
            torch.eq(a, threshold, out=m)
            idx = m.nonzero().view(-1)[:ties]
        torch.lt(a, threshold, out=m)
        c.masked_fill_(m, 0)
        if ties > 0:
            c[idx] = 0
            ties -= idx.numel()
    return ties


def magnitude_prune(weights: dict[str, torch.Tensor], ratio: float, scope: str) -> None:
    if scope == "global":
        zero_smallest(list(weights.values()), round(ratio * sum(w.numel() for w in weights.values())))
    else:
        for w in weights.values():
            zero_smallest([w], round(ratio * w.numel()))


# ---------------------------------------------------------------------------------------------------
# Structured: remove whole units, with Torch-Pruning's dependency graph


def _units(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


ALIGN, ALIGN_FROM = 8, 128  # kept widths of layers this wide or wider: a multiple of ALIGN


def kept_units(n0: int, fraction: float) -> int:
    """How many of a layer's `n0` units stay after removing `fraction` of them. From ALIGN_FROM units up, and
    when n0 itself is aligned, the nearest multiple of ALIGN (a change of at most 4/128 = 3% of the layer):
    fp32 GEMMs run their vector width 8 at a time, and on this machine a 384→1075 Linear took 2.5× as long as
    384→1072 at 1536 rows."""
    kept = n0 - round(fraction * n0)
    if n0 >= ALIGN_FROM and n0 % ALIGN == 0:
        kept = max(ALIGN, ALIGN * round(kept / ALIGN))
    return kept


# ---------------------------------------------------------------------------------------------------
# Importance from data: the moments of what each reading layer receives


@dataclass
class Moments:
    """Running mean and (co)variance of a layer's input channels over real tokens (or pixels), in float64.
    `block` > 0 keeps the covariance within consecutive blocks of that many channels (attention heads)."""

    block: int = 0
    n: int = 0
    total: torch.Tensor | None = None  # (D,)
    square: torch.Tensor | None = None  # (D,), or (D // block, block, block)

    def add(self, x: torch.Tensor) -> None:  # (T, D)
        x = x.detach().double()
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.square = (torch.zeros(x.shape[1] // self.block, self.block, self.block, dtype=torch.float64)
                           if self.block else torch.zeros(x.shape[1], dtype=torch.float64))
        self.n += x.shape[0]
        self.total += x.sum(0)
        if self.block:
            xb = x.reshape(x.shape[0], -1, self.block)  # (T, H, size)
            self.square += torch.einsum("thi,thj->hij", xb, xb)
        else:
            self.square += x.pow(2).sum(0)

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def covariance(self) -> torch.Tensor:
        """(D,) variances, or (H, size, size) covariance blocks."""
        mu = self.mean()
        if self.block:
            mb = mu.reshape(-1, self.block)
            return self.square / self.n - torch.einsum("hi,hj->hij", mb, mb)
        return (self.square / self.n - mu.pow(2)).clamp_min(0)


def input_moments(model: nn.Module, inputs: torch.Tensor, readers: dict[str, int]) -> dict[str, Moments]:
    """name → Moments of the input of each named Linear/Conv (`readers`: name → covariance block size, 0 for
    variances) over `inputs`, on real tokens only where the inputs carry an attention mask."""
    from modelzip_cli.nn.surgery import run_with_hooks
    from modelzip_cli.pipeline.data import as_model_input, float_dtype

    moments = {name: Moments(block) for name, block in readers.items()}

    def record(name: str, module: nn.Module, args: tuple, mask: torch.Tensor | None) -> None:
        x = args[0]
        if isinstance(module, nn.Linear):
            if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.bool()]  # (T, D): padding tokens carry nothing the output keeps
            moments[name].add(x.reshape(-1, x.shape[-1]))
        else:  # (B, C, …): every position of every channel
            moments[name].add(x.transpose(1, -1).reshape(-1, x.shape[1]))

    model.eval()
    dtype = float_dtype(model)
    for i in range(0, inputs.shape[0], 32):
        batch = inputs[i:i + 32]
        mask = tokens.mask_of(batch)
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n, mask=mask: record(n, mod, args, mask)) for n in readers]
        run_with_hooks(model, as_model_input(batch, dtype), hooks)
    return moments


def _out_channels_fn(m: nn.Module):
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels


def _reader_weight(reader: nn.Module) -> torch.Tensor:
    """The reading layer's weight as (out, in channel, …) float64."""
    return reader.weight.detach().double()


@dataclass
class StructuredPruner:
    """Removes units from selected layers, and whole heads from selected attention modules, step by step;
    keeps the graph and each layer's original width."""

    model: nn.Module
    example: torch.Tensor
    layers: list[tuple[str, nn.Module]]
    data: torch.Tensor | None = None  # inputs whose activations rank units and heads (None: weight norms)
    left: dict[str, list[str]] = field(default_factory=dict)  # why → the layers left as they were
    progress: Callable = null_progress  # a bar over the dependency groups traced
    uniform: bool = False  # layers of one role (the same name but for block numbers) keep one width

    def __post_init__(self):
        selected = {n for n, _ in self.layers}
        blocks, left = attention_blocks(self.model, self.example)
        self.blocks = [b for b in blocks if all(b[x] in selected for x in ("q", "k", "v", "o"))]
        for name, why in left:
            self._leave(name, why)
        in_blocks = {b[x] for b in self.blocks for x in ("q", "k", "v", "o")}
        self.layers = [(n, m) for n, m in self.layers if n not in in_blocks]
        self.heads0 = [self._heads(b) for b in self.blocks]
        self.head_rows: list[list] = []
        self.graph = dependency_graph(self.model, self.example)
        self.original = {n: _units(m) for n, m in self.layers}
        self.names = {id(m): n for n, m in self.model.named_modules()}
        self.scored = {"activations": 0, "weight norms": 0}  # how many layers and attention modules each way

    def _heads(self, block: dict) -> int:
        return self.model.get_submodule(block["v"]).out_features // block["head_size"]

    def _leave(self, name: str, why: str) -> None:
        self.left.setdefault(why, []).append(name)

    def check(self, fraction: float) -> None:
        heads = {b["q"].rpartition(".")[0]: h for b, h in zip(self.blocks, self.heads0, strict=True)}
        widths = {**self.original, **heads}
        for name, n0 in widths.items():
            if round(fraction * n0) >= n0:
                raise UsageError(f"--ratio {fraction:g} would remove every unit or head of {name} ({n0})",
                                 hint="lower --ratio or --exclude that layer")

    def prune_to(self, fraction: float) -> None:
        """Remove heads and units until each selected attention module and layer has lost `fraction` of its
        original heads or units."""
        self.check(fraction)
        selected = {n for n, _ in self.layers}
        skipped = {n for names in self.left.values() for n in names}
        keep = self._kept(fraction)
        todo = [(name, m, _units(m), _units(m) - keep[name]) for name, m in self.layers if name not in skipped]
        todo = [t for t in todo if t[3] > 0]
        heads_keep = [h0 - round(fraction * h0) for h0 in self.heads0]
        if self.uniform:
            heads_keep = [min(heads_keep, default=0)] * len(heads_keep)
        heads_todo = [(b, self._heads(b) - k) for b, k in zip(self.blocks, heads_keep, strict=True)]
        heads_todo = [t for t in heads_todo if t[1] > 0]
        readers = {}
        start = time.monotonic()
        with self.progress("dependency groups", len(todo)) as bar:
            for done, (name, m, width, _) in enumerate(todo):
                if time.monotonic() - start > GRAPH_SECONDS:
                    raise UsageError(f"structured pruning gave up after {GRAPH_SECONDS} s tracing Torch-Pruning's "
                                     f"dependency groups ({done} of {len(todo)} layers done)",
                                     hint="select fewer layers with --include, or prune unstructured")
                with quiet_pruning():
                    group = self.graph.get_pruning_group(m, _out_channels_fn(m), list(range(width)))
                reason = self._blocker(group, selected)
                if reason and self.uniform and any(name in names and len(names) > 1
                                                   for names in self._roles().values()):
                    raise UsageError(f"--uniform: {name} cannot be pruned ({reason}) while the layers like it "
                                     "are, so their widths would differ", hint="drop --uniform")
                if reason:
                    self._leave(name, reason)
                else:
                    readers[name] = self._readers(group, width) if self.data is not None else []
                bar.advance()
        moments = self._moments(readers, [b for b, _ in heads_todo])
        for block, remove in heads_todo:
            stats = moments.get(block["o"])
            scores = self._head_scores(block) if stats is None else self._head_activity(block, stats)
            self.scored["weight norms" if stats is None else "activations"] += 1
            heads = torch.argsort(scores, stable=True)[:remove].tolist()
            if stats is not None:
                self._compensate_heads(block, stats, heads)
            remove_heads(self.model, block, heads)
            self.head_rows.append(heads_row(block, heads))
        for name, m, width, remove in todo:
            if name not in readers or _units(m) != width:
                continue  # left as it was, or already pruned with a layer whose width it shares (a residual add)
            reading = readers[name]
            if reading:
                score = sum(self._unit_activity(r, moments[n]) for n, r in reading)
            else:
                score = m.weight.detach().flatten(1).norm(dim=1)  # L2 norm of each unit's weights
            self.scored["activations" if reading else "weight norms"] += 1
            idxs = torch.argsort(score, stable=True)[:remove].tolist()
            for n, r in reading:
                self._compensate_units(r, moments[n], idxs)
            with quiet_pruning():
                self.graph.get_pruning_group(m, _out_channels_fn(m), idxs).prune()

    def _roles(self) -> dict[str, list[str]]:
        """Layers by their role in the model's stack of repeated blocks (decoders.blocks_of): the name with the
        block's number starred (encoder.layer.3.intermediate.dense → encoder.layer.*.intermediate.dense);
        a layer outside the stack is a role of its own."""
        stack = decoders.blocks_of(self.model)
        inside = re.compile(rf"{re.escape(stack.prefix)}\.\d+\.") if stack else None
        out: dict[str, list[str]] = {}
        for name in self.original:
            key = inside.sub(f"{stack.prefix}.*.", name, count=1) if inside and inside.match(name) else name
            out.setdefault(key, []).append(name)
        return out

    def _kept(self, fraction: float) -> dict[str, int]:
        """Units each layer keeps: the share of its own width, or (uniform) the fewest any layer of its role
        keeps."""
        keep = {n: kept_units(n0, fraction) for n, n0 in self.original.items()}
        if self.uniform:
            for names in self._roles().values():
                fewest = min(keep[n] for n in names)
                keep.update(dict.fromkeys(names, fewest))
        return keep

    def _readers(self, group, units: int) -> list[tuple[str, nn.Module]]:
        """The layers that read a layer's `units` one input channel each (what removing one cuts), from its
        pruning group over all units; [] when they cannot be told apart (a flatten, a grouped convolution)."""
        out = []
        for dep, _ in group:
            target = dep.target.module
            if not self.graph.is_in_channel_pruning_fn(dep.handler) or not isinstance(target, WEIGHTED):
                continue
            width = target.in_features if isinstance(target, nn.Linear) else target.in_channels
            if width != units or getattr(target, "groups", 1) != 1:
                return []
            out.append((self.names[id(target)], target))
        return out

    def _moments(self, readers: dict[str, list], blocks: list[dict]) -> dict[str, Moments]:
        wanted = {n: 0 for reading in readers.values() for n, _ in reading}
        wanted.update({b["o"]: b["head_size"] for b in blocks} if self.data is not None else {})
        return input_moments(self.model, self.data, wanted) if wanted else {}

    @staticmethod
    def _unit_activity(reader: nn.Module, stats: Moments) -> torch.Tensor:
        """Per input channel of `reader`: its variance times the squared norm of the weights that read it."""
        w = _reader_weight(reader)
        return (stats.covariance() * w.transpose(0, 1).flatten(1).pow(2).sum(1)).float()

    def _head_activity(self, block: dict, stats: Moments) -> torch.Tensor:
        """Per head: trace(W_h·Cov_h·W_hᵀ), the variance the head adds to the output projection's output."""
        w = _reader_weight(self.model.get_submodule(block["o"]))  # (out, H·size)
        wh = w.reshape(w.shape[0], -1, block["head_size"]).transpose(0, 1)  # (H, out, size)
        return torch.einsum("hoi,hij,hoj->h", wh, stats.covariance(), wh).float()

    @staticmethod
    def _compensate_units(reader: nn.Module, stats: Moments, idxs: list[int]) -> None:
        """Fold the removed channels' mean contribution into the reading Linear's bias (exact in expectation)."""
        if not isinstance(reader, nn.Linear) or reader.bias is None:
            return
        with torch.no_grad():
            shift = _reader_weight(reader)[:, idxs] @ stats.mean()[idxs]
            reader.bias.add_(shift.to(reader.bias.dtype))

    def _compensate_heads(self, block: dict, stats: Moments, heads: list[int]) -> None:
        self._compensate_units(self.model.get_submodule(block["o"]), stats,
                               head_channels(sorted(heads), block["head_size"]))

    def _head_scores(self, block: dict) -> torch.Tensor:
        """Each head's L2 norm over its rows of q, k, v and its columns of the output projection."""
        size = block["head_size"]
        rows = [self.model.get_submodule(block[x]).weight.detach().float() for x in ("q", "k", "v")]
        cols = self.model.get_submodule(block["o"]).weight.detach().float().t()
        per_head = [w.reshape(-1, size, w.shape[1]).pow(2).sum((1, 2)) for w in (*rows, cols)]
        return torch.stack(per_head).sum(0).sqrt()

    def _blocker(self, group, selected: set[str]) -> str | None:
        """Why removing this group's units would be wrong, or None. Tied widths (residual streams) shrink
        layers the user did not select; attention inputs would be cut across heads."""
        tied = set()
        param_names = {id(p): n for n, p in self.model.named_parameters()}
        for dep, _ in group:
            if not self.graph.is_out_channel_pruning_fn(dep.handler):
                continue
            target = dep.target.module
            if "ScaledDotProduct" in str(dep.target.grad_fn) or "Attention" in str(dep.target.grad_fn):
                return "their outputs feed attention heads, which unit pruning would cut across"
            if isinstance(target, nn.Parameter):
                tied.add(param_names.get(id(target), "a parameter"))
            elif isinstance(target, WEIGHTED) and self.names.get(id(target)) not in selected:
                tied.add(self.names.get(id(target), type(target).__name__))
        if tied:
            return (f"their width is tied to layers not selected (e.g. {sorted(tied)[0]}: a residual stream), "
                    "which would change too")
        return None

    @property
    def notes(self) -> list[str]:
        out = [f"{len(names)} layer(s) left as they were: {why} ({', '.join(names[:3])}"
               f"{', …' if len(names) > 3 else ''})" for why, names in self.left.items()]
        ranked = [f"{n} by {how}" for how, n in self.scored.items() if n]
        if ranked:
            out.append("units and heads ranked (layers and attention modules): " + ", ".join(ranked) + (
                f"; activations = what each adds to the layer that reads it, on {len(self.data)} samples, its mean "
                "folded into that layer's bias" if self.scored["activations"] else ""))
        if any(n0 >= ALIGN_FROM and n0 % ALIGN == 0 for n0 in self.original.values()):
            out.append(f"units kept in layers of {ALIGN_FROM}+ units: a multiple of {ALIGN} (matrix products run "
                       f"{ALIGN} wide), so the removed share may differ from --ratio by up to {ALIGN // 2} units")
        if self.blocks:
            kept = [self._heads(b) for b in self.blocks]
            out.append(f"attention heads: {sum(self.heads0) - sum(kept)} of {sum(self.heads0)} removed in "
                       f"{len(self.blocks)} attention modules (q, k, v and output projection together)")
        return out

    def history(self) -> list:
        return [[n, bool(out), [int(i) for i in idxs]] for n, out, idxs in self.graph.pruning_history()]

    def edits(self, ratio: float, **extra) -> list[Edit]:
        heads = [HeadsEdit(ratio=ratio, blocks=self.head_rows)] if self.head_rows else []
        return [*heads, StructuredEdit(ratio=ratio, **extra, history=self.history())]


# ---------------------------------------------------------------------------------------------------
# Methods


def _fine_tune(model: nn.Module, cfg: PruneConfig, ctx: Context, *, masks: dict | None, label: str,
               seed_offset: int = 0, teacher: recover.Teacher | None = None) -> list[dict]:
    after_step = None
    if masks:
        def after_step() -> None:  # keep pruned weights at zero while the others learn
            with torch.no_grad():
                for w, mask in masks.values():
                    w.mul_(mask)
    return recover.fine_tune(model, cfg, ctx, teacher=teacher, label=label, seed_offset=seed_offset,
                             after_step=after_step)


def _masks(weights: dict[str, torch.Tensor]) -> dict:
    return {n: (w, (w != 0).to(w.dtype)) for n, w in weights.items()}


def _selected_weights(model: nn.Module, cfg: PruneConfig) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in select_modules(model, include=cfg.include, exclude=cfg.exclude)}


def _structured_layers(model: nn.Module, cfg: PruneConfig, example: torch.Tensor | None) -> list:
    if example is None:
        raise UsageError("structured pruning traces the model and needs an example input",
                         hint="pass --input-shape (e.g. 1,64) or --data")
    head = output_layer(model, example)
    layers = [(n, m) for n, m in select_modules(model, include=cfg.include, exclude=cfg.exclude) if n != head]
    if not layers:
        raise UsageError("only the output layer is selected, and it keeps its size",
                         hint=unsupported_layers(model) or "select hidden layers with --include")
    return layers


def _is_structured(cfg: PruneConfig) -> bool:
    return isinstance(cfg, StructuredConfig) or (isinstance(cfg, GradualConfig) and cfg.granularity == "structured")


def plan(model: nn.Module, cfg: PruneConfig, example: torch.Tensor | None) -> list[str]:
    """Names of the modules this config would prune (for `chain --dry-run`)."""
    if _is_structured(cfg):
        return [n for n, _ in _structured_layers(model, cfg, example)]
    if isinstance(cfg, WandaConfig):
        return list(_llm_layers(model, cfg)[0])
    return list(_selected_weights(model, cfg))


ZEROES_ONLY = ("only zeroes weights: dense kernels run no faster; the file shrinks because zeros are stored as "
               "a bitmask")


def _label(cfg: PruneConfig) -> str:
    return "recover" if cfg.recover else "fine-tune"


@register(MagnitudeConfig)
def prune_magnitude(model: nn.Module, cfg: MagnitudeConfig, ctx: Context) -> Result:
    teacher = recover.prepare(model, cfg, ctx)  # the input model's outputs, before pruning
    weights = _selected_weights(model, cfg)
    magnitude_prune(weights, cfg.ratio, cfg.scope)
    before = teacher.measure(model) if teacher else None
    history = _fine_tune(model, cfg, ctx, masks=_masks(weights), label=_label(cfg), teacher=teacher)
    after, notes = recover.summary(teacher, model, history, before)
    edit = MagnitudeEdit(ratio=cfg.ratio, scope=cfg.scope, layers=list(weights))
    notes = [f"magnitude pruning {ZEROES_ONLY}", *filter(None, [unsupported_layers(model)]), *notes]
    return Result(model, [edit], notes=notes, after=after)


def _llm_layers(model: nn.Module, cfg: PruneConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The Linears an activation-aware method prunes, and those left alone by default: embeddings are not
    Linears, and a language model's output layer (`lm_head`, or a Linear tied to an Embedding) is named
    with --include to be pruned."""
    weights = {n: w for n, w in _selected_weights(model, cfg).items() if isinstance(model.get_submodule(n), nn.Linear)}
    if cfg.include is not None:
        return weights, []
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = [n for n, w in weights.items() if n.rsplit(".", 1)[-1] == "lm_head" or id(w) in tied]
    return {n: w for n, w in weights.items() if n not in head}, head


@register(WandaConfig, SparseGPTConfig)
def prune_activation_aware(model: nn.Module, cfg: WandaConfig, ctx: Context) -> Result:
    """wanda and sparsegpt: each Linear pruned on its input statistics, block by block (sequential.py)."""
    teacher = recover.prepare(model, cfg, ctx)
    weights, head = _llm_layers(model, cfg)
    if not weights:
        raise UsageError(f"{cfg.method} prunes Linear layers, and none is selected",
                         hint=unsupported_layers(model) or "select Linears with --include")

    def process(names: list[str], layers: list[nn.Module], hessian: Hessian) -> None:
        for layer in layers:  # one by one: SparseGPT picks its mask over a block of a layer's rows and columns
            new = (sparsegpt(layer.weight, hessian.h, cfg.ratio, damp=cfg.damp) if isinstance(cfg, SparseGPTConfig)
                   else wanda(layer.weight, hessian.h, cfg.ratio))
            layer.weight.data.copy_(new)  # in place: a loaded weight's memory map stays resident (quantize_gptq)

    with sequential.on_device(model, ctx.device):  # --device: calibration and updates where the weights are
        batches = sequential.calibration_batches(model, ctx.calib_data, cfg.calib_batches, cfg.calib_batch_size)
        how = sequential.per_layer(model, list(weights), batches, process, ctx.progress, cfg.method, ctx.offload)
    weights = {n: model.get_submodule(n).weight for n in weights}
    before = teacher.measure(model) if teacher else None
    history = _fine_tune(model, cfg, ctx, masks=_masks(weights), label=_label(cfg), teacher=teacher)
    after, notes = recover.summary(teacher, model, history, before)
    edit = UnstructuredEdit(method=cfg.method, ratio=cfg.ratio, layers=list(weights))
    what = ("the weights costing each layer's output least zeroed, the rest updated to make up for them"
            if isinstance(cfg, SparseGPTConfig) else "the least |w|·‖x‖ zeroed in every output row")
    notes = [f"{cfg.method}: {what}, on {sum(len(x) for x in batches)} calibration samples, {how}; it "
             f"{ZEROES_ONLY}", *notes]
    if head:
        notes.append(f"left dense as language-model outputs (name them with --include to prune): {', '.join(head)}")
    return Result(model, [edit], notes=notes, after=after)


def _importance_data(ctx: Context) -> torch.Tensor | None:
    """The inputs that rank units and heads: calibration data, else training data (IMPORTANCE_ROWS at most)."""
    data = recover.rows(ctx.calib_data or ctx.data, IMPORTANCE_ROWS, ctx.seed)
    return None if data is None else data.inputs


def _decoder_pruner(model: nn.Module, cfg: PruneConfig, ctx: Context):
    """The decoder-aware pruner (prune_decoder.py) when the model is a decoder of known layout, else None."""
    from modelzip_cli.techniques import prune_decoder

    return prune_decoder.pruner(model, cfg, ctx)


@register(StructuredConfig)
def prune_structured(model: nn.Module, cfg: StructuredConfig, ctx: Context) -> Result:
    decoder = _decoder_pruner(model, cfg, ctx)
    if decoder is not None:
        from modelzip_cli.techniques import prune_decoder

        return prune_decoder.prune_structured(model, cfg, ctx, decoder)
    pruner = StructuredPruner(model, ctx.example_input, _structured_layers(model, cfg, ctx.example_input),
                              _importance_data(ctx), progress=ctx.progress, uniform=cfg.uniform)
    teacher = recover.prepare(model, cfg, ctx)
    pruner.prune_to(cfg.ratio)
    notes = [*pruner.notes, f"structured pruning removed whole units: {len(pruner.history())} layer groups "
             "physically shrunk, so dense inference does less work"]
    before = teacher.measure(model) if teacher else None
    history = _fine_tune(model, cfg, ctx, masks=None, label=_label(cfg), teacher=teacher)
    after, more = recover.summary(teacher, model, history, before)
    return Result(model, pruner.edits(cfg.ratio), notes=notes + more, after=after)


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta 2017: s_t = s_f + (s_i − s_f)·(1 − t/n)³ for t = 1..n (the last one is s_f)."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


@register(GradualConfig)
def prune_gradual(model: nn.Module, cfg: GradualConfig, ctx: Context) -> Result:
    schedule = cubic_schedule(cfg.ratio, cfg.steps)
    teacher = recover.prepare(model, cfg, ctx)  # with --recover, every step fine-tunes against the input model
    structured = cfg.granularity == "structured"
    if structured:
        pruner = _decoder_pruner(model, cfg, ctx) or StructuredPruner(
            model, ctx.example_input, _structured_layers(model, cfg, ctx.example_input), _importance_data(ctx),
            progress=ctx.progress, uniform=cfg.uniform)
        pruner.check(cfg.ratio)
    else:
        weights = _selected_weights(model, cfg)
    history: list[dict] = []
    for t, target in enumerate(schedule, 1):
        if structured:
            pruner.prune_to(target)
        else:
            magnitude_prune(weights, target, cfg.scope)
        rows = _fine_tune(model, cfg, ctx, masks=None if structured else _masks(weights),
                          label=f"step {t}/{cfg.steps} → {target:.1%}", seed_offset=t, teacher=teacher)
        history += [{**r, "step": t, "target": round(target, 6)} for r in rows]
    after, more = recover.summary(teacher, model, history, None)  # recovery ran at every step: no "before"
    if structured:
        return Result(model, pruner.edits(cfg.ratio, schedule=schedule), notes=pruner.notes + more, after=after)
    edit = MagnitudeEdit(ratio=cfg.ratio, scope=cfg.scope, layers=list(weights), schedule=schedule)
    return Result(model, [edit], notes=[f"gradual unstructured pruning {ZEROES_ONLY}", *more], after=after)




def apply(model: nn.Module, cfg: PruneConfig, ctx: Context, manifest: Manifest) -> Result:
    """Prune `model` in place; the result's layer rows also say each layer's shape and size before."""
    before = {row["name"]: row for row in layer_table(model, with_bytes=False)}
    result = handler(cfg)(model, cfg, ctx)
    after = layer_table(model, with_bytes=False)
    result.layer_extra = {row["name"]: {"shape_before": before.get(row["name"], {}).get("shape"),
                                        "params_before": before.get(row["name"], {}).get("params")} for row in after}
    chosen = set(getattr(result.edits[0], "layers", []))
    selected = [r for r in after if r["name"] in chosen]
    if selected:
        nnz = sum(r["nonzero"] for r in selected)
        total = sum(math.prod(r["shape"]) for r in selected)  # the weight tensors (biases are not pruned)
        result.after["selected_sparsity"] = round(1 - nnz / max(1, total), 6)
    return result


OP = Op("prune", "pruned", apply, plan=plan, default_method="magnitude")
