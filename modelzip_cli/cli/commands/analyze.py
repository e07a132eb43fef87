"""`modelzip analyze`: per-layer sensitivity, and a plan that meets a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    MODEL_OPTIONS,
    RUN_OPTIONS,
    SELECT_OPTIONS,
    Force,
    Input,
    ReportPath,
    Seed,
    _options,
    command,
    common_options,
    emit,
    progress_factory,
)


@command(SELECT_OPTIONS, MODEL_OPTIONS, _options(report=(ReportPath, None), force=(Force, False), seed=(Seed, 0)),
         RUN_OPTIONS)
def analyze(
    model: Input,
    data: Annotated[Path, typer.Option("--data", help="data to score on (unlabelled is enough; with labels and "
                                       "--budget-accuracy-drop, accuracy) and to calibrate int8 on")],
    techniques: Annotated[str, typer.Option("--techniques", help="candidates per layer: int8, int4, prune:R, "
                                            "lowrank:R")] = "int8,int4,prune:0.3,prune:0.5,lowrank:0.5",
    samples: Annotated[int | None, typer.Option("--samples", help="samples each candidate is scored on (default "
                                                "32, or all up to 2048 with labels)")] = None,
    budget_fidelity: Annotated[float | None, typer.Option("--budget-fidelity", help="plan: keep the mean cosine "
                                                          "to the float model at least this")] = None,
    budget_accuracy_drop: Annotated[float | None, typer.Option("--budget-accuracy-drop", help="plan: lose at most "
                                                               "this many accuracy points (labelled data)")] = None,
    plan_out: Annotated[Path | None, typer.Option("--plan-out", help="write the plan (a chain recipe, .toml)")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a heat-map PNG of the losses")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="held-out data a plan's budget is judged on "
                                                   "(default: a seeded half of --data, the other half "
                                                   "choosing the plan)")] = None,
    *, shared,
) -> None:
    """Per-layer sensitivity to each candidate technique; with a budget, a plan that `chain` runs."""
    from modelzip_cli.commands.analyze import AnalyzeOptions, run_analyze

    if plot is not None:
        from modelzip_cli.measure.plot import require_matplotlib

        require_matplotlib()
    opts = AnalyzeOptions(data=data, techniques=techniques, include=shared.include, exclude=shared.exclude,
                          samples=samples, budget_fidelity=budget_fidelity,
                          budget_accuracy_drop=budget_accuracy_drop, plan_out=plan_out, report=shared.report,
                          plot=plot, force=shared.force, eval_data=eval_data)
    emit(run_analyze(model, opts, common_options(shared), progress_factory(shared.quiet)), shared)
