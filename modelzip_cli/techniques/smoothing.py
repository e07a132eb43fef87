"""SmoothQuant (Xiao et al. 2023) for int8 activations, folded into the modules that write them.

A few input channels of a decoder's Linears carry activations tens or hundreds of times larger than the
rest; rounded to one int8 grid per token (or per tensor) they leave the others a handful of steps. Per input
channel scales s move them into the weight: (x / s) @ (W·diag(s))ᵀ = x @ Wᵀ, with s_k = max|x_k|^α /
max|W_:,k|^(1−α) (one s for all the Linears that read the same tensor: q, k and v; gate and up), α chosen
per group where the int8 outputs move least on calibration rows.

The 1/s is folded into what writes the tensor, so the int8 layers carry no extra tensor and no extra
multiply: a norm's weight (and bias: RMSNorm, LayerNorm and kin, checked on a probe that the norm's output
really scales by 1/s), or for a gated MLP's down projection the rows of its up projection (down reads
act(gate) · up, linear in up's output channels). A writer that is shared (a module called more than once per
forward, or a parameter tied to another) or a Linear whose weight is tied cannot take a scale: its group is
left to the caller (a per-layer smoothing tensor for dynamic int8, none for static). The folded model is
checked against the original in float on a calibration batch before anything is quantized; a difference
beyond float rounding undoes every fold.

Nothing of this is recorded as a structural edit: a fold only changes the values of tensors the checkpoint
stores anyway (norm weights, Linear weights before they are quantized), so a reload replays nothing new.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modelzip_cli.nn import int8
from modelzip_cli.pipeline import sequential
from modelzip_cli.techniques import awq

ALPHAS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # migration strengths tried per group; 0 = none
ROWS = 2048  # input rows per group kept to measure each strength's output error
FLOAT_TOLERANCE = 1e-4  # folded vs original logits, relative to the largest: float rounding only


@dataclass(eq=False)  # groups compare by identity (they hold tensors)
class Group:
    """The Linears that read one tensor, what that tensor looks like, and the module that writes it."""

    linears: list[str]
    absmax: torch.Tensor  # (K,) over every calibration row
    rows: torch.Tensor  # (M, K) sampled evenly from every batch
    producer: str | None = None  # where 1/s folds, or None
    why_not: str = ""  # why there is no producer, for the notes
    figures: dict = field(default_factory=dict)


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters reachable under more than one name (tied)."""
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    return {i for i, n in count.items() if n > 1}


@torch.no_grad()
def find_groups(model: nn.Module, names: list[str], batches: list, forward: Callable,
                generator: torch.Generator | None = None, rows: int = ROWS,
                progress: Callable[[], None] | None = None, shared: set[int] | None = None) -> list[Group]:
    """Run the calibration batches once and group the named Linears by the tensor they read, with its
    per-channel absolute maximum, sampled rows, and the module its scales can fold into. The rows of batch b
    are chosen by a generator seeded with `generator`'s seed + b: the same rows whether `model` is the whole
    model or one block of it (`by_block`). `shared`: ids of tied parameters, when `model` is part of a larger
    one."""
    writer: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) → (module, output kept alive this forward)
    calls: dict[str, int] = {}
    reads: dict[str, int] = {}  # Linear → its group's index
    current: list[tuple[torch.Tensor, int]] = []  # this forward's distinct inputs and their group
    groups: list[dict] = []
    per_batch = max(1, rows // max(1, len(batches)))
    first = [True]
    seed = generator.initial_seed() if generator is not None else 0
    batch = [0]

    def new_forward(*_):
        writer.clear()
        current.clear()

    def wrote(name: str, out: object) -> None:
        if first[0]:
            calls[name] = calls.get(name, 0) + 1
        if isinstance(out, torch.Tensor):
            writer[id(out)] = (name, out)

    def read(name: str, x: torch.Tensor) -> None:
        g = next((i for seen, i in current if seen is x), None)
        if g is None:
            g = reads.get(name)
            if g is None:
                g = len(groups)
                groups.append({"linears": [], "writer": writer.get(id(x), (None, None))[0], "absmax": None,
                               "rows": []})
            group = groups[g]
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (..., K) → (M, K)
            m = flat.abs().amax(0)
            group["absmax"] = m if group["absmax"] is None else torch.maximum(group["absmax"], m)
            pick = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed + batch[0]))[:per_batch]
            group["rows"].append(flat[pick])
            current.append((x, g))
        reads.setdefault(name, g)
        if name not in groups[g]["linears"]:
            groups[g]["linears"].append(name)

    handles = [model.register_forward_pre_hook(new_forward)]
    handles += [m.register_forward_hook(lambda m, a, out, n=n: wrote(n, out)) for n, m in model.named_modules() if n]
    handles += [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: read(n, a[0])) for n in names]
    try:
        for b, x in enumerate(batches):
            batch[0] = b
            forward(model, x)
            first[0] = False
            if progress is not None:
                progress()
    finally:
        for h in handles:
            h.remove()
        writer.clear()
        current.clear()
    shared = _shared_parameters(model) if shared is None else shared
    out = []
    for g in groups:
        group = Group(g["linears"], g["absmax"], torch.cat(g["rows"]))
        group.producer, group.why_not = _producer(model, group, g["writer"], calls, shared)
        out.append(group)
    return out


def _producer(model: nn.Module, group: Group, writer: str | None, calls: dict[str, int], shared: set[int]
              ) -> tuple[str | None, str]:
    """Where the group's 1/s can fold, or (None, why not)."""
    width = group.absmax.numel()
    tied = [n for n in group.linears if id(model.get_submodule(n).weight) in shared]
    if tied:
        return None, f"weight tied to another module ({', '.join(tied)})"
    candidate = None
    if writer is not None and awq.is_norm(model.get_submodule(writer), width):
        candidate = writer
    elif len(group.linears) == 1 and group.linears[0].endswith("down_proj"):  # gated MLP: act(gate) · up
        up = group.linears[0][: -len("down_proj")] + "up_proj"
        layer = dict(model.named_modules()).get(up)
        if isinstance(layer, nn.Linear) and layer.out_features == width:
            candidate = up
    if candidate is None:
        return None, "no norm or Linear writes its input"
    module = model.get_submodule(candidate)
    if calls.get(candidate, 0) > 1:
        return None, f"{candidate} runs more than once per forward"
    if any(id(p) in shared for p in module.parameters(recurse=False)):
        return None, f"{candidate} shares a parameter with another module"
    if not isinstance(module, nn.Linear) and not _scales_output(module, width):
        return None, f"{candidate}'s output does not scale with its weight"
    return candidate, ""


@torch.no_grad()
def _scales_output(norm: nn.Module, width: int) -> bool:
    """Whether dividing the norm's weight (and bias) by s divides its output by s (not so for a norm that
    computes with 1 + weight, or one that renormalizes after its weight)."""
    weight = norm.weight
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0), dtype=weight.dtype, device=weight.device)
    s = torch.linspace(0.5, 2.0, width, dtype=torch.float32, device=weight.device)
    before = norm(x).float()
    saved = {k: v.detach().clone() for k, v in norm.named_parameters(recurse=False)}
    awq.fold_into(norm, s)
    after = norm(x).float()
    for k, v in saved.items():
        getattr(norm, k).copy_(v)
    return bool(torch.allclose(after * s, before, rtol=1e-4, atol=1e-5 * float(before.abs().max())))


def scales(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scales (K,) for one group: the weights' column maxima over all of it."""
    w = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp_min(1e-5)  # (K,)
    return (absmax.float().clamp_min(1e-5) ** alpha / w ** (1 - alpha)).clamp(1e-4, 1e4)


Int8Output = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (M, K), float weight (N, K)) → (M, N)


def dynamic_output(act: str) -> Int8Output:
    """The output of a DynamicInt8Linear of weight w on x, run by the kernel the current backend picks for a
    call of that size (the numerics the layer will have)."""
    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        linear.weight.data = w
        return int8.DynamicInt8Linear.from_float(linear, act)(x)
    return run


def static_output(reduced: bool) -> Int8Output:
    """A StaticInt8Linear's output on x, its per-tensor input range calibrated on x itself (min and max)."""
    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, zp = int8.affine_qparams(float(x.min()), float(x.max()), reduced)
        q, w_scale = int8.quantize_weight(w)
        xq = torch.fake_quantize_per_tensor_affine(x, scale, zp, int8.AMIN, int8.AMAX)
        return xq @ (q.float() * w_scale[:, None]).T
    return run


def output_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None, run: Int8Output,
                 refs: list[torch.Tensor] | None = None) -> float:
    """Relative squared error, against the float outputs, of the int8 outputs of every weight reading x (M, K),
    smoothed by s (the layer reads x / s with weight W·diag(s)). `refs`: the float outputs x @ Wᵀ, when known."""
    xs = x if s is None else x / s
    err = norm = 0.0
    for i, w in enumerate(weights):
        w = w.detach().float()
        ref = refs[i] if refs is not None else x @ w.T  # (M, N)
        y = run(xs, w if s is None else w * s).float()
        err += float((y - ref).pow_(2).sum())
        norm += float(ref.pow(2).sum())
    return err / max(norm, 1e-30)


def best_alpha(group: Group, weights: list[torch.Tensor], run: Int8Output) -> tuple[float, torch.Tensor | None, float]:
    """(α, s or None for α = 0, relative output error) of the strength that keeps the group's int8 outputs
    closest to float on its calibration rows."""
    refs = [group.rows @ w.detach().float().T for w in weights]  # (M, N) each: the same for every α
    best = (0.0, None, math.inf)
    for alpha in ALPHAS:
        s = scales(group.absmax, weights, alpha) if alpha else None
        err = output_error(group.rows, weights, s, run, refs)
        if err < best[2]:
            best = (alpha, s, err)
    return best


@torch.no_grad()
def fold(model: nn.Module, group: Group, s: torch.Tensor) -> None:
    """1/s into the producer, s into every Linear of the group: the model computes the same in float."""
    awq.fold_into(model.get_submodule(group.producer), s)
    for n in group.linears:
        w = model.get_submodule(n).weight
        w.mul_(s[None, :].to(w.dtype))


@torch.no_grad()
def fold_groups(model: nn.Module, groups: list[Group], check: torch.Tensor, run: Int8Output
                ) -> tuple[list[Group], list[str]]:
    """Choose α for every group with a producer and fold its scales (groups whose producer is a Linear first:
    its rows then change before its own group's scales are chosen). Each fold is checked at once: the model
    must still compute `check` (one calibration sample) as before in float, else that fold is undone and the
    group left without producer. Returns the groups folded and the notes."""
    check = check[:1]
    folds = Folds()
    folds.fold(model, groups, lambda: _logits(model, check), run)
    return folds.folded, folds.notes()


@dataclass
class Folds:
    """The folds made so far, over one model or block after block."""

    folded: list[Group] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    worst: float = 0.0

    @torch.no_grad()
    def fold(self, model: nn.Module, groups: list[Group], output: Callable[[], torch.Tensor], run: Int8Output,
             prefix: str = "") -> None:
        """`fold_groups` on `model` (the whole model or one block), checked on what `output()` computes; the
        groups' names (and what is recorded) get `prefix`."""
        reference = output()
        scale = reference.abs().max().clamp_min(1e-30)
        for group in sorted((g for g in groups if g.producer), key=lambda g: not isinstance(
                model.get_submodule(g.producer), nn.Linear)):
            weights = [model.get_submodule(n).weight for n in group.linears]
            alpha, s, err = best_alpha(group, weights, run)
            group.figures = {"smoothing_alpha": alpha, "output_error": round(err, 6)}
            if s is None:
                continue
            touched = (group.producer, *group.linears)
            saved = {n: {k: v.detach().clone() for k, v in model.get_submodule(n).named_parameters(recurse=False)}
                     for n in touched}
            fold(model, group, s)
            diff = float((output() - reference).abs().max() / scale)
            if not diff <= FLOAT_TOLERANCE:  # something else reads the producer's output (a residual stream)
                for n, params in saved.items():
                    for k, v in params.items():
                        getattr(model.get_submodule(n), k).copy_(v)
                self.undone.append(prefix + group.producer)
                group.producer, group.why_not = None, "folding changed the float model's output"
                group.figures = {}
                continue
            self.worst = max(self.worst, diff)
            group.figures["smoothing_folded_into"] = prefix + group.producer
            self.folded.append(group)

    def notes(self) -> list[str]:
        notes = []
        if self.folded:
            into = sorted({g.figures["smoothing_folded_into"] for g in self.folded})
            notes.append(f"activation smoothing (SmoothQuant) folded into {len(into)} norms or Linears for "
                         f"{sum(len(g.linears) for g in self.folded)} layers, which keep no smoothing tensor; the "
                         f"folded model checked in float after each fold: largest change {self.worst:.1e} of the "
                         "largest output")
        if self.undone:
            notes.append("smoothing not folded where the float output changed (something else reads what they "
                         "write): " + ", ".join(self.undone))
        return notes


def by_block(model: nn.Module, names: list[str], batches: list, forward: Callable, generator: torch.Generator,
             run: Int8Output, *, fold: bool, unfolded: Callable[[str, nn.Module, Group], None] | None = None,
             progress=None, blocks: bool = True, offload: Path | None = None) -> tuple[list[Group], list[str], str]:
    """Smoothing for the named Linears, one block of the model's stack at a time (pipeline/sequential.py):
    each block's statistics (`find_groups`) are recorded on what the block receives, its folds made and checked
    on the block's own output for one sample, `unfolded(name, layer, group)` called for each Linear of a group
    left without a fold (a per-layer choice on that group's rows), and its rows dropped before the next block.
    Memory holds one block's statistics and one block boundary's activations; the statistics are those of a
    whole-model pass (a fold leaves the float outputs as they were). Layers outside the stack (or all, without
    one or without `blocks`) in one whole-model pass at the end. Returns the groups (names in full, rows
    dropped), the notes and how it ran."""
    shared = _shared_parameters(model)
    stack = sequential.blocks_of(model) if blocks else None
    folds = Folds()
    out: list[Group] = []
    done: set[str] = set()

    def handle(root: nn.Module, prefix: str, local: list[str], feed: list, fwd: Callable,
               output: Callable[[], torch.Tensor]) -> None:
        groups = find_groups(root, local, feed, fwd, generator, shared=shared)
        if fold:
            folds.fold(root, groups, output, run, prefix)
        for g in groups:
            if g not in folds.folded:
                for n in g.linears if unfolded is not None else ():
                    unfolded(prefix + n, root.get_submodule(n), g)
            g.linears = [prefix + n for n in g.linears]
            g.producer = prefix + g.producer if g.producer else g.producer
            # dropped: the next block's rows take their place (a new empty tensor: a slice would keep the storage)
            g.rows = g.rows.new_empty((0, g.rows.shape[-1]))
            out.append(g)

    def per_block(i: int, block: nn.Module, inputs: sequential.Inputs) -> None:
        prefix = stack.name(i) + "."
        local = [n.removeprefix(prefix) for n in names if n.startswith(prefix)]
        done.update(prefix + n for n in local)
        if local:
            args, kwargs = sequential.first_sample(inputs[0])
            handle(block, prefix, local, inputs, lambda b, inp: b(*inp[0], **inp[1]),
                   lambda: sequential.hidden(block(*args, **kwargs)).float())
        if progress is not None:
            progress()

    if stack is not None:
        outside = any(n not in done and not n.startswith(stack.prefix + ".") for n in names)
        sequential.calibrate(model, batches, forward, per_block, through_last=outside, offload=offload)
    rest = [n for n in names if n not in done]
    if rest:
        check = batches[0][:1]
        handle(model, "", rest, batches, forward, lambda: forward(model, check).float())
    if stack is None:
        how = "in one whole-model pass" + (" (no stack of repeated blocks found)" if blocks else "")
    else:
        how = f"block by block over the {len(stack.layers)} blocks of {stack.prefix}" + (
            f", {len(rest)} layers outside them in one whole-model pass" if rest else "")
    return out, folds.notes(), how


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float()  # modelzip's loaded models give one tensor (hf.py unwraps the logits)
