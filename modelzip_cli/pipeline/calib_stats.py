"""Calibration inputs of named Linears — each input channel's |x| maximum and a sample of input rows — collected
block by block (sequential.py), for searches that run per layer on what that layer receives (SmoothQuant's
migration strength).

Memory holds one block's statistics and the activations of one block boundary, never every layer's inputs at
once; each block's layers are handed to `use` as soon as that block has run, then dropped. The blocks are run
as they are (float): the statistics are those a whole-model pass records, batch for batch. Layers outside the
stack (an output head) are recorded in one whole-model pass at the end, only when there are any.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from modelzip_cli.pipeline import sequential


@dataclass
class LayerInputs:
    absmax: torch.Tensor | None = None  # (K,) over every calibration row
    rows: list[torch.Tensor] = field(default_factory=list)  # (m, K) per batch, sampled


class _Recorder:
    """Forward pre-hooks on the named layers: each call adds its |x| maxima and `per_batch` of its rows, chosen
    by a permutation from `generator()` (a fresh seeded generator: the same rows whatever the order of calls)."""

    def __init__(self, model: nn.Module, names: list[str], per_batch: int, generator: Callable[[], torch.Generator]):
        self.seen: dict[str, LayerInputs] = {}
        self.per_batch, self.generator = per_batch, generator
        self.handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: self._add(n, args[0]))
                        for n in names]

    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])  # (..., K) → (M, K)
        entry = self.seen.setdefault(name, LayerInputs())
        m = x.abs().amax(0)
        entry.absmax = m if entry.absmax is None else torch.maximum(entry.absmax, m)
        entry.rows.append(x[torch.randperm(x.shape[0], generator=self.generator())[:self.per_batch]])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_inputs(model: nn.Module, names: list[str], batches: list[torch.Tensor], per_batch: int,
                 generator: Callable[[], torch.Generator], use: Callable[[str, torch.Tensor, torch.Tensor], None],
                 progress, *, by_block: bool = True) -> str:
    """`use(name, absmax (K,), rows (M, K))` for every named layer a batch reached, block by block (or, without
    `by_block` or a stack of blocks, in one whole-model pass). Returns how it ran, for the notes."""
    stack = sequential.blocks_of(model) if by_block else None
    done: set[str] = set()

    def hand_over(recorder: _Recorder) -> None:
        for n, entry in recorder.seen.items():
            use(n, entry.absmax, torch.cat(entry.rows))
        recorder.seen.clear()

    with progress("calibrate", (len(stack.layers) if stack else 0) + 1) as bar, torch.no_grad():
        if stack is not None:
            inputs = sequential.first_inputs(model, stack, batches, sequential.forward)
            for i, block in enumerate(stack.layers):
                mine = [n for n in names if n.startswith(stack.name(i) + ".")]
                recorder = _Recorder(model, mine, per_batch, generator)
                try:
                    inputs = sequential.run_block(block, inputs)
                finally:
                    recorder.remove()
                hand_over(recorder)
                done.update(mine)
                bar.advance()
            del inputs
        rest = [n for n in names if n not in done]
        if rest:
            recorder = _Recorder(model, rest, per_batch, generator)
            try:
                for x in batches:
                    sequential.forward(model, x)
            finally:
                recorder.remove()
            hand_over(recorder)
        bar.advance()
    if stack is None:
        return "in one whole-model pass" + ("" if by_block else " (asked for)") + \
            (" (no stack of repeated blocks found)" if by_block else "")
    outside = f"; {len(rest)} layers outside it in one whole-model pass" if rest else ""
    return f"layer by layer over the {len(stack.layers)} blocks of {stack.prefix}{outside}"
