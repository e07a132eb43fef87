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
    fmt: Annotated[str, typer.Option("--format", help="onnx (ONNX Runtime) | pt2 (torch.export program) | hf "
                                                  "(transformers directory) | compressed-tensors (quantized "
                                                  "directory: transformers, vLLM) | gguf (llama.cpp; Llama, "
                                                  "Mistral, Qwen2, GPT-2)")] = "onnx",
    gguf_type: Annotated[str | None, typer.Option("--gguf-type", help="gguf: f16 | q8_0 | q4_0 | q4_1 | q4_k | auto "
                                                  "(f16 float, q8_0 int8, q4_1 int4: mapped without rounding "
                                                  "again); any case")
                         ] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="gguf: the directory holding the model's "
                                                   "tokenizer (default: the input, when it is one)")] = None,
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
    """An ONNX graph, a .pt2 program, a Hugging Face directory or a GGUF file of the model, verified by loading it
    in its runtime and comparing with the PyTorch model."""
    from modelzip_cli.commands.export import export_checkpoint
    from modelzip_cli.errors import UsageError
    from modelzip_cli.export.onnx import ExportConfig

    check_latency_batch(batch_size)
    foreign = ([("--gguf-type", gguf_type), ("--tokenizer", tokenizer)] if fmt != "gguf" else
               [("--int8", int8_way), ("--opset", opset), ("--calib-data", calib_data)])
    for flag, value in foreign:
        if value is not None:
            raise UsageError(f"{flag} does not apply to --format {fmt}", hint=f"drop {flag}")
    cfg = ExportConfig.parse(given(format=fmt, opset=opset, dynamic_batch=dynamic_batch, int8=int8_way,
                                   gguf_type=gguf_type and gguf_type.lower()))
    emit(export_checkpoint(model, cfg, common_options(shared), calib_data=calib_data, batch_n=batch_size,
                           tokenizer=tokenizer), shared)
