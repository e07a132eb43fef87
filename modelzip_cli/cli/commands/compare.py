"""`modelzip compare`: models side by side on the same data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    MODEL_OPTIONS,
    RUN_OPTIONS,
    LatencyBatch,
    check_latency_batch,
    command,
    common_options,
    emit,
)


@command(MODEL_OPTIONS, RUN_OPTIONS)
def compare(
    models: Annotated[list[Path], typer.Argument(help="two or more checkpoints; the first is the reference")],
    data: Annotated[Path, typer.Option("--data", help="labelled data file")],
    batch_size: LatencyBatch = None,
    *, shared,
) -> None:
    """Size, parameters, accuracy, latency and agreement with the first model, side by side."""
    from modelzip_cli.commands.compare import compare_checkpoints

    check_latency_batch(batch_size)
    emit(compare_checkpoints(models, data, common_options(shared), batch_n=batch_size), shared)
