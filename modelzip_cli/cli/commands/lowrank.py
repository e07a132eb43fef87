"""`modelzip lowrank`: truncated SVD of Linear layers."""

from __future__ import annotations

from typing import Annotated

import typer

from modelzip_cli.cli.options import (
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


@command(SELECT_OPTIONS, FINETUNE_OPTIONS, TRANSFORM_OPTIONS)
def lowrank(
    model: Input,
    rank_ratio: Annotated[float | None, typer.Option("--rank-ratio", help="r = R · min(out, in)")] = None,
    energy: Annotated[float | None, typer.Option("--energy", help="smallest r keeping E of Σs²")] = None,
    params_ratio: Annotated[float | None, typer.Option("--params-ratio",
                                                      help="whole-model parameter budget, shared by energy")] = None,
    svd: Annotated[str | None, typer.Option("--svd", help="auto | exact | randomized (default auto)")] = None,
    plan: PlanFile = None,
    *, shared,
) -> None:
    """Factorize Linear layers by truncated SVD into two smaller Linears."""
    if plan is not None:
        return run_plan("lowrank", model, plan, shared, shared.data,
                        given(rank_ratio=rank_ratio, energy=energy, params_ratio=params_ratio, svd=svd))
    values = given(rank_ratio=rank_ratio, energy=energy, params_ratio=params_ratio, svd=svd, include=shared.include,
                   exclude=shared.exclude) | finetune_values(shared)
    technique("lowrank", None, model, shared, values, files={"data": shared.data})
