"""`modelzip eval`: accuracy, loss or perplexity, latency and size of one model on data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    MODEL_OPTIONS,
    RUN_OPTIONS,
    Input,
    LatencyBatch,
    check_latency_batch,
    command,
    common_options,
    emit,
)


@command(MODEL_OPTIONS, RUN_OPTIONS, name="eval")
def eval_(model: Input, data: Annotated[Path, typer.Option("--data", help="data file (accuracy needs labels)")],
          batch_size: LatencyBatch = None, *, shared) -> None:
    """Accuracy, loss, median latency at batch 1 and batch N, size."""
    from modelzip_cli.commands.evaluate import evaluate_checkpoint

    check_latency_batch(batch_size)
    emit(evaluate_checkpoint(model, data, common_options(shared), batch_n=batch_size), shared)
