"""Layer-by-layer calibration: a model's repeated blocks (a decoder's or encoder's layers) taken one at a
time, each calibrated on the outputs of the blocks before it as they are after compression.

Memory holds the model, one block's statistics and the activations of one block boundary for the
calibration set, never every layer's inputs at once. The inputs of the first block are caught by a
forward pre-hook that stops the model there; every later block takes the previous block's outputs with
the same keyword arguments (attention mask, position embeddings). A model with no such stack is
calibrated in one whole-model pass instead (`blocks_of` returns None and the caller says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


class _Caught(Exception):
    """Raised by the pre-hook on the first block: the model need not run past it."""


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


Inputs = list[tuple[tuple, dict]]  # per calibration batch: the block's positional and keyword arguments


def _clean(kwargs: dict) -> dict:
    """A block's keyword arguments without a KV cache: calibration passes must not grow one."""
    out = dict(kwargs)
    if "past_key_values" in out:
        out["past_key_values"] = None
    if "past_key_value" in out:
        out["past_key_value"] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def first_inputs(model: nn.Module, blocks: Blocks, batches: Iterable, forward: Callable) -> Inputs:
    """The arguments the first block receives for each calibration batch (`forward(model, batch)` runs the
    model)."""
    seen: Inputs = []

    def catch(module, args, kwargs):
        seen.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), _clean(kwargs)))
        raise _Caught

    handle = blocks.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                forward(model, batch)
            except _Caught:
                pass
    finally:
        handle.remove()
    return seen


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: Inputs) -> Inputs:
    """The next block's arguments: this block's outputs in place of the hidden states, same keywords."""
    nxt: Inputs = []
    for args, kwargs in inputs:
        if args:
            out = _hidden(block(*args, **kwargs))
            nxt.append(((out, *args[1:]), kwargs))
        else:
            out = _hidden(block(**kwargs))
            nxt.append(((), {**kwargs, "hidden_states": out}))
    return nxt


def calibrate(model: nn.Module, batches: list, forward: Callable,
              per_block: Callable[[int, nn.Module, Inputs], None],
              progress: Callable[[int, int], None] | None = None) -> Blocks | None:
    """Run `per_block(i, block, inputs)` on each block in order, then pass the inputs through the block as
    `per_block` left it. Returns the stack, or None when the model has none (nothing was run)."""
    blocks = blocks_of(model)
    if blocks is None:
        return None
    inputs = first_inputs(model, blocks, batches, forward)
    for i, block in enumerate(blocks.layers):
        per_block(i, block, inputs)
        inputs = run_block(block, inputs)
        if progress is not None:
            progress(i + 1, len(blocks.layers))
    return blocks


def forward(model: nn.Module, x: torch.Tensor) -> object:
    return model(x)


def calibration_batches(model: nn.Module, data, batches: int, batch_size: int) -> list[torch.Tensor]:
    """The first `batches` batches of a calibration dataset, where the model is."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return [x.to(device) for i, (x, _, _) in enumerate(data.batches(batch_size)) if i < batches]


class Hessians:
    """Forward hooks that add each named Linear's inputs to its Hessian (gptq.Hessian). Linears fed the very
    same tensor (q, k and v; gate and up) share one Hessian, added to once per forward of `root`."""

    def __init__(self, root: nn.Module, layers: dict[str, nn.Module]):
        self.of: dict[str, Hessian] = {}
        self.current: list[tuple[torch.Tensor, Hessian]] = []  # this forward's inputs, kept alive to compare
        self.handles = [root.register_forward_pre_hook(lambda *_: self.current.clear())]
        self.handles += [layer.register_forward_pre_hook(lambda m, args, n=n: self._seen(n, args[0]))
                         for n, layer in layers.items()]

    def _seen(self, name: str, x: torch.Tensor) -> None:
        for seen, h in self.current:
            if seen is x:
                self.of.setdefault(name, h)
                return
        h = self.of.setdefault(name, Hessian(x.shape[-1], x.device))
        h.add(x)
        self.current.append((x, h))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.current.clear()


def per_layer(model: nn.Module, names: list[str], batches: list[torch.Tensor],
              process: Callable[[str, nn.Module, Hessian], None], progress, label: str) -> str:
    """Accumulate each named layer's input Hessian on the calibration batches and hand it to
    `process(name, layer, hessian)`, which changes the layer in place: block by block, each block on the
    outputs of the blocks before it as `process` left them; layers outside the stack (or every layer, when
    the model has none) in one whole-model pass at the end. Layers no batch reached are not processed.
    Returns how it ran, for the notes."""

    def run(root: nn.Module, layer_names: list[str], feed: Callable[[], object]) -> None:
        layers = {n: model.get_submodule(n) for n in layer_names}
        hessians = Hessians(root, layers)
        try:
            with torch.no_grad():
                feed()
        finally:
            hessians.remove()
        for n, layer in layers.items():
            if n in hessians.of:
                with torch.no_grad():
                    process(n, layer, hessians.of[n])

    stack = blocks_of(model)
    done: set[str] = set()
    with progress(label, (len(stack.layers) if stack else 0) + 1) as bar:
        def per_block(i: int, block: nn.Module, inputs: Inputs) -> None:
            mine = [n for n in names if n.startswith(stack.name(i) + ".")]
            run(block, mine, lambda: run_block(block, inputs))
            done.update(mine)

        if stack is not None:
            calibrate(model, batches, forward, per_block, progress=lambda *_: bar.advance())
        rest = [n for n in names if n not in done]
        if rest:
            run(model, rest, lambda: [forward(model, x) for x in batches])
        bar.advance()
    if stack is None:
        return "in one whole-model pass (no stack of repeated blocks found)"
    return f"layer by layer over the {len(stack.layers)} blocks of {stack.prefix}"


class Hessian:
    """H = 2/n · Σ xᵀx over every input row seen, kept as a running mean (float32, on the input's device)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(columns, columns, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
        n = x.shape[0]
        self.h *= self.rows / (self.rows + n)
        self.rows += n
        x = x * math.sqrt(2 / self.rows)
        self.h += x.T @ x
