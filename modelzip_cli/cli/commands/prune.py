"""`modelzip prune`: magnitude, wanda, sparsegpt, structured, layers and gradual pruning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    CALIBRATION_OPTIONS,
    FINETUNE_OPTIONS,
    SELECT_OPTIONS,
    TRANSFORM_OPTIONS,
    Input,
    PlanFile,
    command,
    finetune_values,
    given,
    run_plan,
    technique,
)
from modelzip_cli.errors import UsageError


@command(SELECT_OPTIONS, FINETUNE_OPTIONS, CALIBRATION_OPTIONS, TRANSFORM_OPTIONS)
def prune(
    model: Input,
    ratio: Annotated[float | None, typer.Option("--ratio", help="fraction to remove, in [0, 1)")] = None,
    method: Annotated[str, typer.Option("--method", help="magnitude | wanda | sparsegpt | structured | "
                                        "layers | gradual")] = "magnitude",
    scope: Annotated[str | None, typer.Option("--scope", help="magnitude, gradual: global (one threshold) | "
                                              "layer (default global)")] = None,
    granularity: Annotated[str | None, typer.Option("--granularity", help="gradual: unstructured (magnitude) | "
                                                    "structured (default unstructured)")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="gradual: steps on the cubic schedule "
                                              "(default 5)")] = None,
    calib_data: Annotated[Path | None, typer.Option("--calib-data", help="wanda, sparsegpt: calibration data "
                                                    "(language-model windows: data text --pack); structured: "
                                                    "what ranks units and heads")] = None,
    calib_batches: Annotated[int | None, typer.Option("--calib-batches", help="wanda, sparsegpt: batches "
                                                      "(default 16)")] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", help="layers: how many blocks to remove (instead of "
                                               "--ratio)")] = None,
    uniform: Annotated[bool, typer.Option("--uniform", help="structured: keep one width in every block (the same "
                                          "heads and intermediate size), so export --format hf gives a standard "
                                          "config")] = False,
    plan: PlanFile = None,
    *, shared,
) -> None:
    """Remove weights (magnitude; wanda and sparsegpt on data), whole units (structured), whole decoder blocks
    (layers), or reach the ratio over steps (gradual)."""
    if plan is not None:
        return run_plan("prune", model, plan, shared, shared.data, given(ratio=ratio, scope=scope,
                                                                          granularity=granularity, steps=steps,
                                                                          uniform=uniform or None))
    if ratio is None and blocks is None:
        raise UsageError("prune needs --ratio R (or --plan PLAN)")
    values = given(ratio=ratio, scope=scope, granularity=granularity, steps=steps, calib_batches=calib_batches,
                   blocks=blocks, uniform=uniform or None, include=shared.include,
                   exclude=shared.exclude) | finetune_values(shared)
    technique("prune", method, model, shared, values, files={"data": shared.data, "calib_data": calib_data},
              gzip_output=True)
