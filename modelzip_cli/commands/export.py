"""The `export` command's flow: load, write the file another runtime runs, measure it there, report.

What the file holds and how it is checked lives in `export/`; this module only joins it to the options,
the staged outputs and the report.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelzip_cli.checkpoint.format import Manifest
from modelzip_cli.checkpoint.io import Loaded
from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.commands.transform import CommonOptions, _gate, default_report, load_dataset, load_input
from modelzip_cli.errors import InputError, UsageError
from modelzip_cli.export import hf as export_hf
from modelzip_cli.export.check import MIN_COSINE, MIN_COSINE_REQUANTIZED, agreement, apply_gate
from modelzip_cli.export.onnx import (
    SUFFIXES,
    ExportConfig,
    Written,
    check_output_suffix,
    default_output,
    example_dataset,
    export_model,
)
from modelzip_cli.export.onnxrun import OnnxModel
from modelzip_cli.files import Outputs, Target, check_targets
from modelzip_cli.kernels import weight_only as wo_kernels
from modelzip_cli.measure.metrics import fidelity, latencies, model_metrics, outputs_class_logits
from modelzip_cli.measure.report import Report, file_info
from modelzip_cli.nn import int8
from modelzip_cli.pipeline.data import Dataset
from modelzip_cli.pipeline.run import predict


def measure_export(report: Report, loaded: Loaded, written: Written, data: Dataset, threads: int | None,
                   batch_n: int | None = None) -> None:
    """metrics.input (PyTorch) and metrics.output (the exported file, with its fidelity to PyTorch)."""
    with int8.use_backend("auto"):
        report.metrics["input"] = model_metrics(loaded.model, data, threads=threads, latency=False,
                                                size_bytes=report.input["bytes"] if report.input else None)
        reference = predict(loaded.model, data.inputs)
        report.metrics["output"] = model_metrics(written.runner, data, threads=threads, latency=False,
                                                 size_bytes=written.step.after["bytes"])
        # PyTorch and the exported file timed in the same interleaved rounds
        report.metrics["input"]["latency_ms"], report.metrics["output"]["latency_ms"] = latencies(
            [loaded.model, written.runner], data, batch_n=batch_n, threads=threads)
    report.metrics["output"]["fidelity"] = fidelity(reference, predict(written.runner, data.inputs),
                                                    class_logits=outputs_class_logits(loaded.model))
    report.metrics["output"]["parameters"] = report.metrics["input"]["parameters"]
    written.step.after["measured_on"] = str(data.path)


def check_agreement(report: Report, loaded: Loaded, written: Written, data: Dataset) -> None:
    """A quantized or GGUF export against its PyTorch model (export/check.py). qdq and MatMulNBits hold modelzip's
    integers with float activations, so they are compared with the model run on its float kernels (where
    modelzip's int8 kernel quantizes activations, the report's fidelity, against the model as it runs here,
    differs by that rounding); ort re-quantizes the float parent, so it is compared with the model as it runs,
    at a looser tolerance; GGUF on perplexity when the data are token windows."""
    way = written.step.after["int8"]
    if way is None and written.step.after["format"] != "gguf":
        return  # a float ONNX or .pt2 file: verify() already held it to FLOAT_TOLERANCE
    if written.step.after["format"] == "gguf":  # perplexity on token windows, else cosine, as the model runs
        m = report.metrics
        ppl = (m["input"].get("perplexity"), m["output"].get("perplexity"))
        windows = None not in ppl and str(data.path) != "(example input)"  # random example ids: cosine instead
        apply_gate(report, agreement(m["output"]["fidelity"], perplexity=ppl if windows else None),
                   "the GGUF file (read by transformers)")
        return
    if way == "ort":
        fid, min_cosine = report.metrics["output"]["fidelity"], MIN_COSINE_REQUANTIZED
    else:
        with int8.use_backend("plain"), int8.use_kernel("float"), wo_kernels.use_kernel("float"):
            reference = predict(loaded.model, data.inputs)
        fid = fidelity(reference, predict(written.runner, data.inputs), class_logits=False)
        min_cosine = MIN_COSINE
    apply_gate(report, agreement(fid, min_cosine=min_cosine), "the exported file")


def export_checkpoint(path: Path, cfg: ExportConfig, opts: CommonOptions, *, calib_data: Path | None = None,
                      batch_n: int | None = None, tokenizer: Path | None = None) -> Report:
    """`modelzip export`: load, export, verify, measure, write the file and its report together."""
    cfg.check_available()
    directory = cfg.format in export_hf.DIR_FORMATS
    output = opts.output or (export_hf.default_output if directory else default_output)(path, cfg.format)
    if not directory:
        check_output_suffix(output, cfg.format)
    report_path = opts.report or default_report(output)
    if (opts.max_accuracy_drop is not None or opts.min_fidelity is not None) and opts.eval_data is None:
        raise UsageError("--max-accuracy-drop and --min-fidelity need --eval-data to measure on")
    inputs = [path, opts.eval_data, calib_data, tokenizer]
    if directory:
        export_hf.check_dir_output(output, inputs=[p for p in inputs if p is not None], force=opts.force)
        check_targets([Target("report", report_path, (".json",))], inputs=[*inputs, output], force=opts.force)
    else:
        check_targets([Target("output", output, (SUFFIXES[cfg.format],)), Target("report", report_path, (".json",))],
                      inputs=inputs, force=opts.force)
    with Outputs() as staged:
        loaded = load_input(path, opts)
        eval_data = load_dataset(opts.eval_data, loaded, require_targets=opts.max_accuracy_drop is not None)
        calib = load_dataset(calib_data, loaded, require_targets=False)
        torch.manual_seed(opts.seed)
        report = Report(command="export", warnings=list(loaded.notes))
        report.input = file_info(path, count_parameters(loaded.model))
        if directory:
            written = export_hf.export_directory(loaded, cfg, output, staged, eval_data)
        else:
            written = export_model(loaded, cfg, output, staged, calib=calib, tokenizer=tokenizer)
        report.steps = [written.step]
        report.output = file_info(output, count_parameters(loaded.model), read_from=staged.staged(output))
        measure_export(report, loaded, written, eval_data or example_dataset(loaded), opts.threads, batch_n)
        _gate(report, opts)
        if directory:
            export_hf.gate(report, written.step.after.get("check"))
        else:
            check_agreement(report, loaded, written, eval_data or example_dataset(loaded))
        report.summary = {"format": cfg.format, "int8": written.step.after["int8"],
                          "max_abs_diff": report.metrics["output"]["fidelity"]["max_abs_diff"],
                          "cosine_min": report.metrics["output"]["fidelity"]["cosine_min"]}
        report.report_path = str(report_path)
        staged.write(report_path, lambda tmp: tmp.write_text(report.to_json()))
        staged.commit()
    return report



def load_for_measure(path: Path, opts: CommonOptions) -> Loaded:
    """A checkpoint (load_input), or an `.onnx` file run through ONNX Runtime: what eval and compare read."""
    if path.suffix != ".onnx":
        return load_input(path, opts)
    if not path.is_file():
        raise InputError(f"{path}: no such file", hint="check the path")
    model = OnnxModel(path)
    shape, dtype = model.example_shape()
    return Loaded(model=model, manifest=Manifest(arch=None, input_shape=shape, input_dtype=dtype), path=path,
                  source="onnx")
