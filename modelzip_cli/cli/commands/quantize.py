"""`modelzip quantize`: int8 dynamic / static / QAT and int8/int4 weight-only (RTN, GPTQ, AWQ)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    CALIBRATION_OPTIONS,
    SELECT_OPTIONS,
    TRANSFORM_OPTIONS,
    Input,
    PlanFile,
    command,
    given,
    run_plan,
    technique,
)
from modelzip_cli.errors import UsageError


@command(SELECT_OPTIONS, CALIBRATION_OPTIONS, TRANSFORM_OPTIONS)
def quantize(
    model: Input,
    method: Annotated[str | None, typer.Option("--method", help="dynamic | static | qat | weight-only | "
                                               "gptq | awq")] = None,
    bits: Annotated[int | None, typer.Option("--bits", help="weight-only, gptq, awq: 8 or 4 (int4 packed two per "
                                             "byte) (default 8; gptq 4)")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size", help="weight-only, gptq, awq: input channels per "
                                                   "scale, 0 = per channel (default 128)")] = None,
    act_order: Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="gptq: columns in "
                                                   "decreasing activation energy, group scales fixed first "
                                                   "(default); --no-act-order: stored order, each group's scale "
                                                   "chosen when it is reached")] = None,
    damp: Annotated[float | None, typer.Option("--damp", help="gptq: Hessian dampening, a share of its mean "
                                               "diagonal (default 0.01)")] = None,
    calib_data: Annotated[Path | None, typer.Option("--calib-data", help="static: calibration data; dynamic: "
                                                    "activation ranges for --smoothing, and what --min-fidelity "
                                                    "is met on")] = None,
    calib_batches: Annotated[int | None, typer.Option("--calib-batches", help="static: batches to calibrate on "
                                                      "(default 100); dynamic: for smoothing (default 8); gptq "
                                                      "(default 16)")] = None,
    calib_batch_size: Annotated[int | None, typer.Option("--calib-batch-size", help="samples per calibration "
                                                         "batch (default 32; gptq 8)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="qat: training data")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="qat: fine-tuning epochs (default 3)")] = None,
    freeze_epochs: Annotated[int | None, typer.Option("--freeze-epochs", help="qat: final epochs with observers "
                                                      "and BatchNorm statistics frozen (default a third)")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="qat: learning rate (default 1e-4)")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="qat: batch size (default 64)")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="dynamic/static/qat: what runs the int8 layers: "
                                                "plain | torch-ao | auto (torch.ao's kernels where they measured "
                                                "faster and torch.ao imports; default auto)")] = None,
    activations: Annotated[str | None, typer.Option("--activations", help="dynamic: per-token | per-tensor "
                                                    "activation scales (default per-token)")] = None,
    observer: Annotated[str | None, typer.Option("--observer", help="static: minmax | percentile | "
                                                 "mse (the range rounding moves least) (default minmax)")] = None,
    smoothing: Annotated[str | None, typer.Option("--smoothing", help="dynamic, static: with --calib-data, "
                                                  "move activation outliers into the weights where that measures "
                                                  "better: auto (folded into the norm or Linear writing a layer's "
                                                  "input, else a tensor in the layer; static: folded only) | fold "
                                                  "| layer | off (default auto)")] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="weight-only: also the Embedding tables")] = False,
    plan: PlanFile = None,
    *, shared,
) -> None:
    """int8 dynamic / static / QAT on plain int8 tensors, or int8/int4 weight-only (round to nearest, or GPTQ)."""
    from modelzip_cli.nn import int8

    if plan is not None:
        with int8.use_backend(backend if backend in int8.BACKENDS else "auto"):
            return run_plan("quantize", model, plan, shared, calib_data or data,
                            given(method=method, bits=bits, group_size=group_size, backend=backend,
                                  activations=activations, observer=observer, smoothing=smoothing,
                                  embeddings=embeddings or None))
    if method is None:
        raise UsageError("quantize needs --method (dynamic, static, qat, weight-only, gptq or awq), or --plan PLAN")

    values = given(bits=bits, group_size=group_size, act_order=act_order, damp=damp,
                   calib_batches=calib_batches, calib_batch_size=calib_batch_size, epochs=epochs,
                   freeze_epochs=freeze_epochs, lr=lr, batch_size=batch_size, backend=backend,
                   activations=activations, observer=observer, smoothing=smoothing,
                   embeddings=embeddings or None, include=shared.include,
                   exclude=shared.exclude)
    with int8.use_backend(backend if backend in int8.BACKENDS else "auto"):  # the report's latencies too
        technique("quantize", method, model, shared, values, files={"data": data, "calib_data": calib_data})
