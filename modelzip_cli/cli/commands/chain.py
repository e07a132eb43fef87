"""`modelzip chain`: the steps of a recipe in one process, with one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    CALIBRATION_OPTIONS,
    TRANSFORM_OPTIONS,
    Input,
    command,
    common_options,
    emit,
    progress_factory,
)


@command(CALIBRATION_OPTIONS, TRANSFORM_OPTIONS)
def chain(
    model: Input,
    recipe: Annotated[Path, typer.Option("--recipe", help="TOML or JSON recipe: \\[\\[steps]] with op and options")],
    data: Annotated[Path | None, typer.Option("--data", help="training data for steps that train or calibrate")] = None,
    keep_intermediate: Annotated[Path | None, typer.Option("--keep-intermediate",
                                                           help="also write each step's checkpoint here")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list each step's modules; change nothing")] = False,
    *, shared,
) -> None:
    """Run a recipe of steps (distill, prune, lowrank, quantize) in one process, with one report."""
    from modelzip_cli.commands.chain import check_data_needs_all, dry_run_report, parse_recipe, run_chain

    steps = parse_recipe(recipe)  # the whole recipe is checked before any weight is loaded
    check_data_needs_all(steps, data)
    opts = common_options(shared)
    if dry_run:
        emit(dry_run_report(model, steps, opts, data=data), shared)
        return
    emit(run_chain(model, steps, opts, data=data, recipe=recipe, progress=progress_factory(shared.quiet),
                   keep_intermediate=keep_intermediate), shared)
