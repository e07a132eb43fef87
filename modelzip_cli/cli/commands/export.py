"""`modelzip export`: a file another runtime loads, checked in that runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    MODEL_OPTIONS,
    OUTPUT_OPTIONS,
    RUN_OPTIONS,
    Input,
    LatencyBatch,
    check_latency_batch,
    command,
    common_options,
    emit,
    given,
)


@command(MODEL_OPTIONS, OUTPUT_OPTIONS, RUN_OPTIONS)
def export(
    model: Input,
    fmt: Annotated[str, typer.Option("--format", help="onnx (ONNX Runtime) | pt2 (torch.export program)")] = "onnx",
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset, 18–23 (default 18)")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch",
                                                help="batch size free at run time (token models: sequence "
                                                     "length is always free)")] = True,
    int8_way: Annotated[str | None, typer.Option("--int8", help="quantized models: qdq (modelzip's integers as "
                                                 "Q/DQ) | ort (float parent + ONNX Runtime's quantizer) | auto "
                                                 "(the measured better per scheme; default)")] = None,
    calib_data: Annotated[Path | None, typer.Option("--calib-data", help="--int8 ort, static models: "
                                                    "calibration data")] = None,
    batch_size: LatencyBatch = None,
    *, shared,
) -> None:
    """An ONNX graph or a .pt2 program of the model, verified by running it against the PyTorch model."""
    from modelzip_cli.commands.export import export_checkpoint
    from modelzip_cli.export.onnx import ExportConfig

    check_latency_batch(batch_size)
    cfg = ExportConfig.parse(given(format=fmt, opset=opset, dynamic_batch=dynamic_batch, int8=int8_way))
    emit(export_checkpoint(model, cfg, common_options(shared), calib_data=calib_data, batch_n=batch_size), shared)
