"""One module per technique, and the registry that maps an op name to its config and function.

Importing this package also registers every edit kind's replay function with the checkpoint module.
Every technique function has the same shape:
    apply(model, config, ctx, manifest) -> (model, Step, the manifest that describes the new model)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from modelzip_cli.techniques import distill, lowrank, prune, quantize


@dataclass(frozen=True)
class Technique:
    config: type
    apply: Callable
    float_only: bool = True  # refuses an already-quantized model (quantize too: no double quantization)
    plan: Callable | None = None  # (model, config, example input) → names of the modules it would change


TECHNIQUES: dict[str, Technique] = {
    "prune": Technique(prune.PruneConfig, prune.apply, plan=prune.plan),
    "quantize": Technique(quantize.QuantizeConfig, quantize.apply, plan=quantize.plan),
    "lowrank": Technique(lowrank.LowRankConfig, lowrank.apply, plan=lowrank.plan),
    "distill": Technique(distill.DistillConfig, distill.apply),
}
