"""`eval`: accuracy, loss, latency and size of one checkpoint (or `.onnx` file, run by ONNX Runtime) on one
dataset."""

from __future__ import annotations

from pathlib import Path

from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.commands.export import load_for_measure
from modelzip_cli.commands.transform import CommonOptions, load_dataset
from modelzip_cli.measure.metrics import (
    default_threads,
    generation_speed,
    model_metrics,
    noise_note,
    outputs_class_logits,
)
from modelzip_cli.measure.report import Report, file_info
from modelzip_cli.pipeline.distributed import resolve_device, runtime


def evaluate_checkpoint(path: Path, data_path: Path, opts: CommonOptions, *,
                        batch_n: int | None = None) -> Report:
    device = resolve_device(opts.device)
    loaded = load_for_measure(path, opts)
    # a classifier is evaluated on labels; a model of embeddings or token outputs on its inputs alone
    data = load_dataset(data_path, loaded, require_targets=outputs_class_logits(loaded.model))
    report = Report(command="eval", warnings=list(loaded.notes))
    report.input = file_info(path, count_parameters(loaded.model))
    report.metrics[str(path)] = model_metrics(loaded.model, data, batch_n=batch_n, threads=opts.threads,
                                              size_bytes=report.input["bytes"], device=device)
    report.metrics[str(path)]["measured_on"] = f"{len(data)} samples of {data_path}"
    noisy = noise_note([report.metrics[str(path)]["latency_ms"]])
    if noisy:
        report.warnings.append(noisy)
    speed = generation_speed([loaded.model], data.inputs, threads=opts.threads or default_threads())[0]
    if speed is not None:  # a causal LM: prefill and decode tokens/s
        report.metrics[str(path)]["generation"] = speed
    report.runtime = runtime(device)
    return report
