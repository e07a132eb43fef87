"""`compare`: several checkpoints (or `.onnx` files, run by ONNX Runtime) side by side on one dataset, with
agreement against the first."""

from __future__ import annotations

from pathlib import Path

from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.commands.export import load_for_measure
from modelzip_cli.commands.transform import CommonOptions, load_dataset
from modelzip_cli.errors import UsageError
from modelzip_cli.files import disk_bytes
from modelzip_cli.measure.metrics import (
    default_threads,
    fidelity,
    generation_speed,
    latencies,
    latency_change,
    model_metrics,
    noise_note,
    outputs_class_logits,
    timing_of,
)
from modelzip_cli.measure.perplexity import is_causal_lm, lm_figures
from modelzip_cli.measure.report import Report, file_info
from modelzip_cli.pipeline.distributed import resolve_device, runtime
from modelzip_cli.pipeline.run import predict


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
    labels = _labels(paths)
    causal = all(is_causal_lm(item.model) for item in loaded) and not data.inputs.is_floating_point()
    # a causal LM's logits (N, L, vocab) are never held whole: every model runs batch by batch side by side
    lm = lm_figures([item.model for item in loaded], data.inputs) if causal else None
    reference = None if causal else predict(loaded[0].model, data.inputs)  # (N, classes), or (N, …) features
    # causal LMs: prefill and decode tokens/s, every model in turn in each round
    speeds = generation_speed([x.model for x in loaded], data.inputs, threads=opts.threads or default_threads())
    for k, (label, path, item) in enumerate(zip(labels, paths, loaded, strict=True)):
        m = model_metrics(item.model, data, threads=opts.threads, size_bytes=disk_bytes(path), device=device,
                          latency=False, lm=False)
        if lm is not None:
            m.update(lm[k])
            m.setdefault("next_token_agreement", 1.0)
            m.setdefault("fidelity", {"cosine_mean": 1.0, "cosine_min": 1.0, "max_abs_diff": 0.0,
                                      "samples": len(data)})
        else:
            m["fidelity"] = fidelity(reference, predict(item.model, data.inputs),
                                     class_logits=outputs_class_logits(loaded[0].model))
        if "top1_agreement" in m["fidelity"]:
            m["top1_agreement"] = m["fidelity"]["top1_agreement"]
        m["max_abs_logit_diff"] = m["fidelity"]["max_abs_diff"]
        m["measured_on"] = f"{len(data)} samples of {data_path}"
        if speeds[k] is not None:
            m["generation"] = speeds[k]
        report.metrics[label] = m
    blocks = latencies([item.model for item in loaded], data, batch_n=batch_n, threads=opts.threads, device=device)
    for label, block in zip(labels, blocks, strict=True):
        report.metrics[label]["latency_ms"] = block
    report.summary = {"reference": labels[0], "data": str(data_path), "samples": len(data),
                      "latency": {label: _against(blocks[0], block) for label, block in zip(labels[1:], blocks[1:],
                                                                                            strict=True)}}
    noisy = noise_note(blocks)
    if noisy:
        report.warnings.append(noisy)
    report.runtime = runtime(device)
    return report


def _labels(paths: list[Path]) -> list[str]:
    """Each model's key in the report: its path, with "#k" added to a path given more than once."""
    labels = []
    for k, path in enumerate(paths, 1):
        labels.append(str(path) if str(path) not in labels else f"{path} #{k}")
    return labels


def _against(reference: dict, block: dict) -> dict[str, str]:
    """batch_1 / batch_n → "slower", "faster" or "within spread" against the reference model's timing of the
    same rounds: a claim only when the difference exceeds both spreads."""
    return {key: latency_change(timing_of(reference, key), timing_of(block, key)) or "within spread"
            for key in ("batch_1", "batch_n")}
