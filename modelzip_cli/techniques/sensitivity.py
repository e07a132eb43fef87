"""Per-layer sensitivity: what compressing one layer alone costs the whole model, and which layers to leave
float so that the whole model keeps a fidelity.

Loss is measured end to end, on real inputs, against the float model's own outputs: 1 − mean cosine, or,
with labels, accuracy points lost. A candidate layer is swapped into the float model in place of the
original (nothing is copied but that one layer) and swapped back after the measurement.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from modelzip_cli.measure.metrics import fidelity, outputs_class_logits
from modelzip_cli.nn.surgery import replace_module
from modelzip_cli.pipeline.run import predict


@contextlib.contextmanager
def swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[nn.Module]:
    """`model` with `module` in place of its submodule `name` inside the block."""
    original = model.get_submodule(name)
    replace_module(model, name, module)
    try:
        yield model
    finally:
        replace_module(model, name, original)


class Scorer:
    """Loss of a model against a reference model's outputs on fixed inputs: 1 − mean cosine, or accuracy
    points lost when `targets` are given (the same figure `--max-accuracy-drop` gates on)."""

    def __init__(self, reference: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None):
        self.inputs, self.targets = inputs, targets
        self.reference = predict(reference, inputs)  # (N, ...) float
        self.class_logits = outputs_class_logits(reference)
        self.base_accuracy = self._accuracy(self.reference) if targets is not None else None

    def _accuracy(self, outputs: torch.Tensor) -> float:
        return float((outputs.argmax(1) == self.targets).float().mean())

    @property
    def unit(self) -> str:
        return "accuracy points" if self.targets is not None else "1 - cosine"

    def loss(self, model: nn.Module) -> float:
        out = predict(model, self.inputs)
        if self.targets is not None:
            return (self.base_accuracy - self._accuracy(out)) * 100
        return 1 - fidelity(self.reference, out, class_logits=self.class_logits)["cosine_mean"]

    def cosine(self, model: nn.Module) -> float:
        return fidelity(self.reference, predict(model, self.inputs), class_logits=self.class_logits)["cosine_mean"]


def layer_losses(reference: nn.Module, layers: dict[str, nn.Module], scorer: Scorer, bar=None) -> dict[str, float]:
    """name → loss of the reference model with that one layer replaced by `layers[name]`."""
    out = {}
    for name, module in layers.items():
        with swapped(reference, name, module):
            out[name] = scorer.loss(reference)
        if bar is not None:
            bar.advance(layer=name)
    return out


def keep_float(quantized: nn.Module, reference: nn.Module, names: list[str], losses: dict[str, float],
               scorer: Scorer, min_fidelity: float) -> tuple[list[str], float]:
    """The fewest of `names`, most costly first (by `losses`), to put back in float so that `quantized` reaches
    `min_fidelity` (mean cosine against the reference on the scorer's inputs). Changes `quantized` in place;
    returns (names put back in float, the cosine reached). Fidelity rises (nearly) monotonically as layers go
    back to float, so the count is found by bisection: about log2(len(names)) + 1 measurements."""
    order = sorted(names, key=lambda n: -losses[n])
    int_modules = {n: quantized.get_submodule(n) for n in order}

    def set_float(k: int) -> None:
        for i, n in enumerate(order):
            replace_module(quantized, n, copy.deepcopy(reference.get_submodule(n)) if i < k else int_modules[n])

    def reach(k: int) -> float:
        set_float(k)
        return scorer.cosine(quantized)

    reached = {0: reach(0), len(order): 1.0}  # all float: the reference itself
    lo, hi = 0, len(order)  # invariant: reached[lo] < min_fidelity ≤ reached[hi]
    if reached[0] >= min_fidelity:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        reached[mid] = reach(mid)
        lo, hi = (mid, hi) if reached[mid] < min_fidelity else (lo, mid)
    set_float(hi)
    return order[:hi], reached[hi]
