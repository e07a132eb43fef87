"""Pruning: magnitude (unstructured), structured (layers physically shrink) and gradual (cubic schedule).

Magnitude pruning finds the global k-th smallest |w| without `torch.quantile` (which refuses more than
16M elements) and without concatenating the weights (which doubles memory): a histogram over chunks
narrows the value range, then the few values left are sorted exactly.

Structured pruning ranks each layer's units by the L2 norm of their weights and removes the weakest,
with Torch-Pruning's dependency graph deciding what must shrink with them (next layer's inputs,
BatchNorm, a flatten feeding a Linear). Its pruning history is the edit the manifest records.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from modelzip_cli.checkpoint import Manifest, register_edit
from modelzip_cli.context import Context
from modelzip_cli.errors import UsageError
from modelzip_cli.measure import layer_table
from modelzip_cli.report import Step
from modelzip_cli.techniques.select import WEIGHTED, output_layer, select_modules

CHUNK = 1 << 22  # elements per temporary (16 MB of float32): bounds extra memory whatever the model size
BINS = 4096


@dataclass
class PruneConfig:
    ratio: float
    method: str = "magnitude"  # magnitude | structured | gradual
    scope: str = "global"  # magnitude: one threshold over all selected weights, or the ratio in every layer
    granularity: str = "unstructured"  # gradual: unstructured (magnitude) | structured
    steps: int = 5  # gradual: number of pruning steps
    finetune_epochs: int = 3  # with --data: after pruning (one-shot) or after each step (gradual)
    lr: float = 5e-4  # fine-tuning learning rate: lower than training, the weights are already good
    batch_size: int = 64
    include: list[str] | None = None
    exclude: list[str] | None = None

    def validate(self) -> PruneConfig:
        if not 0 <= self.ratio < 1:
            raise UsageError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.method not in PRUNERS:
            raise UsageError(f"unknown prune method {self.method!r}", hint="use " + ", ".join(PRUNERS))
        if self.scope not in {"global", "layer"}:
            raise UsageError(f"--scope must be global or layer, got {self.scope!r}")
        if self.granularity not in {"unstructured", "structured"}:
            raise UsageError(f"--granularity must be unstructured or structured, got {self.granularity!r}")
        if self.steps < 1:
            raise UsageError(f"--steps must be ≥ 1, got {self.steps}")
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs must be ≥ 0, got {self.finetune_epochs}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Magnitude: the k-th smallest |w| over many tensors, in bounded memory


def _chunks(tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    for t in tensors:
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), CHUNK):
            yield flat[i:i + CHUNK]


def _count(tensors: list[torch.Tensor], pred: Callable[[torch.Tensor], torch.Tensor]) -> int:
    return sum(int(pred(c.abs()).sum()) for c in _chunks(tensors))


def kth_magnitude(tensors: list[torch.Tensor], k: int) -> tuple[float, int]:
    """The k-th smallest |w| (1-based) over all tensors, and how many elements equal to it are among the k.

    Memory: one chunk at a time plus a histogram; never a copy of all weights.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} out of range for {total} elements")
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
    values = torch.cat([a[(a >= lo) & (a <= hi)] for a in (c.abs() for c in _chunks(tensors))])
    threshold = float(torch.sort(values).values[k - below - 1])
    ties = k - _count(tensors, lambda a: a < threshold)
    return threshold, ties


@torch.no_grad()
def zero_smallest(tensors: list[torch.Tensor], k: int) -> None:
    """Set exactly the k smallest-magnitude elements (ties broken in storage order) to zero, in place."""
    if k <= 0:
        return
    threshold, ties = kth_magnitude(tensors, k)
    for t in tensors:
        flat = t.view(-1)
        for i in range(0, flat.numel(), CHUNK):
            c = flat[i:i + CHUNK]
            a = c.abs()
            c[a < threshold] = 0
            if ties > 0:
                idx = (a == threshold).nonzero().flatten()[:ties]
                c[idx] = 0
                ties -= idx.numel()


def magnitude_prune(weights: dict[str, torch.Tensor], ratio: float, scope: str) -> None:
    if scope == "global":
        zero_smallest(list(weights.values()), round(ratio * sum(w.numel() for w in weights.values())))
    else:
        for w in weights.values():
            zero_smallest([w], round(ratio * w.numel()))


# ---------------------------------------------------------------------------------------------------
# Structured: remove whole units, with Torch-Pruning's dependency graph


@contextlib.contextmanager
def _quiet():
    """Torch-Pruning prints and warns while tracing; keep the user's terminal clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _dependency_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    with _quiet(), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def _units(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


@dataclass
class StructuredPruner:
    """Removes units from selected layers step by step; keeps the graph and each layer's original width."""

    model: nn.Module
    example: torch.Tensor
    layers: list[tuple[str, nn.Module]]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.graph = _dependency_graph(self.model, self.example)
        self.original = {n: _units(m) for n, m in self.layers}
        self.names = {id(m): n for n, m in self.model.named_modules()}
        self.skipped: set[str] = set()

    def check(self, fraction: float) -> None:
        for name, n0 in self.original.items():
            if round(fraction * n0) >= n0:
                raise UsageError(f"--ratio {fraction:g} would remove every unit of {name} ({n0} units)",
                                 hint="lower --ratio or --exclude that layer")

    def prune_to(self, fraction: float) -> None:
        """Remove units until each selected layer has lost `fraction` of its original units."""
        import torch_pruning as tp

        self.check(fraction)
        selected = {n for n, _ in self.layers}
        for name, m in self.layers:
            if name in self.skipped:
                continue
            n0, now = self.original[name], _units(m)
            remove = round(fraction * n0) - (n0 - now)
            if remove <= 0:
                continue
            score = m.weight.detach().flatten(1).norm(dim=1)  # L2 norm of each unit's weights
            idxs = torch.argsort(score, stable=True)[:remove].tolist()
            fn = tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels
            with _quiet():
                group = self.graph.get_pruning_group(m, fn, idxs)
            reason = self._blocker(group, selected)
            if reason:
                self.skipped.add(name)
                self.notes.append(f"{name} left as it was: {reason}")
                continue
            with _quiet():
                group.prune()

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
                return "its outputs feed attention heads, which unit pruning would cut across"
            if isinstance(target, nn.Parameter):
                tied.add(param_names.get(id(target), "a parameter"))
            elif isinstance(target, WEIGHTED) and self.names.get(id(target)) not in selected:
                tied.add(self.names.get(id(target), type(target).__name__))
        if tied:
            return (f"its width is tied to {', '.join(sorted(tied)[:4])} (not selected, e.g. a residual "
                    "stream), which would change too")
        return None

    def history(self) -> list:
        return [[n, bool(out), [int(i) for i in idxs]] for n, out, idxs in self.graph.pruning_history()]


@register_edit("prune_structured")
def _replay_structured(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    graph = _dependency_graph(model, manifest.example_input())
    with _quiet():
        graph.load_pruning_history([tuple(h) for h in edit["history"]])
    return model


@register_edit("prune_magnitude")
def _replay_magnitude(model: nn.Module, edit: dict, manifest: Manifest) -> nn.Module:
    return model  # zeros live in the tensors themselves; the edit is history only


# ---------------------------------------------------------------------------------------------------
# Methods


def _fine_tune(model: nn.Module, cfg: PruneConfig, ctx: Context, *, masks: dict | None, label: str,
               seed_offset: int = 0) -> list[dict]:
    from modelzip_cli.train import TrainConfig, train

    if ctx.data is None or cfg.finetune_epochs == 0:
        return []
    after_step = None
    if masks:
        def after_step() -> None:  # keep pruned weights at zero while the others learn
            with torch.no_grad():
                for w, mask in masks.values():
                    w.mul_(mask)
    tcfg = TrainConfig(epochs=cfg.finetune_epochs, lr=cfg.lr, batch_size=cfg.batch_size)
    return train(model, ctx.data, tcfg, ctx=ctx, description=label, seed_offset=seed_offset,
                 after_step=after_step)


def _masks(weights: dict[str, torch.Tensor]) -> dict:
    return {n: (w, (w != 0).to(w.dtype)) for n, w in weights.items()}


def _selected_weights(model: nn.Module, cfg: PruneConfig) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in select_modules(model, include=cfg.include, exclude=cfg.exclude)}


def _structured_layers(model: nn.Module, cfg: PruneConfig, ctx: Context) -> list[tuple[str, nn.Module]]:
    if ctx.example_input is None:
        raise UsageError("structured pruning traces the model and needs an example input",
                         hint="pass --input-shape (e.g. 1,64) or --data")
    head = output_layer(model, ctx.example_input)
    layers = [(n, m) for n, m in select_modules(model, include=cfg.include, exclude=cfg.exclude) if n != head]
    if not layers:
        raise UsageError("only the output layer is selected, and it keeps its size",
                         hint="select hidden layers with --include")
    return layers


def plan(model: nn.Module, cfg: PruneConfig, example: torch.Tensor | None) -> list[str]:
    """Names of the modules this config would prune (for `chain --dry-run`)."""
    if cfg.method == "structured" or (cfg.method == "gradual" and cfg.granularity == "structured"):
        return [n for n, _ in _structured_layers(model, cfg, Context(example_input=example))]
    return list(_selected_weights(model, cfg))


def prune_magnitude(model: nn.Module, cfg: PruneConfig, ctx: Context) -> tuple[list[dict], list[dict]]:
    weights = _selected_weights(model, cfg)
    magnitude_prune(weights, cfg.ratio, cfg.scope)
    history = _fine_tune(model, cfg, ctx, masks=_masks(weights), label="fine-tune")
    ctx.notes.append("magnitude pruning only zeroes weights: dense kernels run no faster; the file shrinks "
                     "because zeros are stored as a bitmask")
    return [{"kind": "prune_magnitude", "ratio": cfg.ratio, "scope": cfg.scope, "layers": list(weights)}], history


def prune_structured(model: nn.Module, cfg: PruneConfig, ctx: Context) -> tuple[list[dict], list[dict]]:
    pruner = StructuredPruner(model, ctx.example_input, _structured_layers(model, cfg, ctx))
    pruner.prune_to(cfg.ratio)
    ctx.notes.extend(pruner.notes)
    ctx.notes.append(f"structured pruning removed whole units: {len(pruner.history())} layer groups physically "
                     "shrunk, so dense inference does less work")
    history = _fine_tune(model, cfg, ctx, masks=None, label="fine-tune")
    return [{"kind": "prune_structured", "ratio": cfg.ratio, "history": pruner.history()}], history


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta 2017: s_t = s_f + (s_i − s_f)·(1 − t/n)³ for t = 1..n (the last one is s_f)."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def prune_gradual(model: nn.Module, cfg: PruneConfig, ctx: Context) -> tuple[list[dict], list[dict]]:
    schedule = cubic_schedule(cfg.ratio, cfg.steps)
    structured = cfg.granularity == "structured"
    if structured:
        pruner = StructuredPruner(model, ctx.example_input, _structured_layers(model, cfg, ctx))
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
                          label=f"step {t}/{cfg.steps} → {target:.1%}", seed_offset=t)
        history += [{**r, "step": t, "target": round(target, 6)} for r in rows]
    if structured:
        ctx.notes.extend(dict.fromkeys(pruner.notes))
        return [{"kind": "prune_structured", "ratio": cfg.ratio, "schedule": schedule,
                 "history": pruner.history()}], history
    ctx.notes.append("gradual unstructured pruning only zeroes weights: dense kernels run no faster; the file "
                     "shrinks because zeros are stored as a bitmask")
    return [{"kind": "prune_magnitude", "ratio": cfg.ratio, "scope": cfg.scope, "layers": list(weights),
             "schedule": schedule}], history


PRUNERS: dict[str, Callable[[nn.Module, PruneConfig, Context], tuple[list[dict], list[dict]]]] = {
    "magnitude": prune_magnitude,
    "structured": prune_structured,
    "gradual": prune_gradual,
}


def prune(model: nn.Module, cfg: PruneConfig, ctx: Context) -> tuple[nn.Module, Step, list[dict]]:
    """Prune `model` in place. Returns it, the step record, and the edits for the manifest."""
    cfg.validate()
    before = {row["name"]: row for row in layer_table(model)}
    edits, history = PRUNERS[cfg.method](model, cfg, ctx)
    after = layer_table(model)
    rows = [{**row, "shape_before": before.get(row["name"], {}).get("shape"),
             "params_before": before.get(row["name"], {}).get("params")} for row in after]
    selected = [r for r in after if r["name"] in set(edits[0].get("layers", []))]
    notes = list(ctx.notes)
    ctx.notes.clear()
    step = Step(op="prune", config=cfg.to_dict(), layers=rows, notes=notes)
    if selected:
        nnz = sum(r["nonzero"] for r in selected)
        total = sum(math.prod(r["shape"]) for r in selected)  # the weight tensors (biases are not pruned)
        step.after["selected_sparsity"] = round(1 - nnz / max(1, total), 6)
    if history:
        step.after["finetune_history"] = history
    return model, step, edits


def apply(model: nn.Module, cfg: PruneConfig, ctx: Context, manifest: Manifest) -> tuple[nn.Module, Step, Manifest]:
    model, step, edits = prune(model, cfg, ctx)
    return model, step, manifest.with_edits(edits)
