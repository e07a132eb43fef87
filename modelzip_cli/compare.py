"""`compare`: several checkpoints (or `.onnx` files, run by ONNX Runtime) side by side on one dataset, with
agreement against the first."""

from __future__ import annotations

from pathlib import Path

from modelzip_cli.distributed import resolve_device, runtime
from modelzip_cli.errors import UsageError
from modelzip_cli.export import load_for_measure
from modelzip_cli.files import disk_bytes
from modelzip_cli.measure import (
    count_parameters,
    default_threads,
    fidelity,
    generation_speed,
    model_metrics,
    outputs_class_logits,
    predict,
)
from modelzip_cli.report import Report, file_info
from modelzip_cli.runner import CommonOptions, load_dataset


def compare_checkpoints(paths: list[Path], data_path: Path, opts: CommonOptions, *,
                        batch_n: int | None = None) -> Report:
    if len(paths) < 2:
        raise UsageError("compare needs at least two checkpoints", hint="modelzip compare A B [C …] --data TEST")
    device = resolve_device(opts.device)
    loaded = [load_for_measure(p, opts) for p in paths]  # all read (and validated) before any measuring
    data = load_dataset(data_path, loaded[0], require_targets=False)
    for other in loaded[1:]:
        load_dataset(data_path, other, require_targets=False)
    report = Report(command="compare")
    report.input = file_info(paths[0], count_parameters(loaded[0].model))
    reference = predict(loaded[0].model, data.inputs)  # (N, classes), or (N, …) features
    # causal LMs: prefill and decode tokens/s, every model in turn in each round
    speeds = generation_speed([x.model for x in loaded], data.inputs, threads=opts.threads or default_threads())
    for path, item, speed in zip(paths, loaded, speeds, strict=True):
        outputs = predict(item.model, data.inputs)
        m = model_metrics(item.model, data, batch_n=batch_n, threads=opts.threads, size_bytes=disk_bytes(path),
                          device=device)
        m["fidelity"] = fidelity(reference, outputs, class_logits=outputs_class_logits(loaded[0].model))
        if "top1_agreement" in m["fidelity"]:
            m["top1_agreement"] = m["fidelity"]["top1_agreement"]
        m["max_abs_logit_diff"] = m["fidelity"]["max_abs_diff"]
        if speed is not None:
            m["generation"] = speed
        report.metrics[str(path)] = m
    report.summary = {"reference": str(paths[0]), "data": str(data_path), "samples": len(data)}
    report.runtime = runtime(device)
    return report

