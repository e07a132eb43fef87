"""The shape every transforming command shares: validate outputs → load → measure → apply → save → report.

Both the single commands and `chain` go through `run_transform`, so there is one implementation of
output checks, before/after figures, quality gates and report writing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzip_cli.checkpoint import Loaded, atomic_write_text, check_output, load_checkpoint, save_checkpoint
from modelzip_cli.context import Context
from modelzip_cli.data import Dataset, check_fits, load_data
from modelzip_cli.errors import InputError, UsageError
from modelzip_cli.measure import count_parameters, gzip_bytes, layer_table, model_metrics, stored_bytes
from modelzip_cli.report import Report, Step, file_info

OUTPUT_TAGS = {"prune": "pruned", "quantize": "quantized", "lowrank": "lowrank", "distill": "distilled",
               "chain": "chained"}


@dataclass
class CommonOptions:
    """Options every transforming command takes (CONTRACT.md)."""

    output: Path | None = None
    report: Path | None = None
    force: bool = False
    seed: int = 0
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_code: bool = False
    input_shape: list[int] | None = None
    input_dtype: str | None = None
    eval_data: Path | None = None
    max_accuracy_drop: float | None = None
    threads: int | None = None


def default_output(input_path: Path, command: str) -> Path:
    """model.pt → model.pruned.pt, beside the input."""
    return input_path.with_name(f"{input_path.stem}.{OUTPUT_TAGS[command]}{input_path.suffix}")


def resolve_outputs(command: str, input_paths: list[Path], opts: CommonOptions) -> tuple[Path, Path]:
    output = opts.output or default_output(input_paths[0], command)
    report = opts.report or output.with_suffix(".json")
    if opts.max_accuracy_drop is not None and opts.eval_data is None:
        raise UsageError("--max-accuracy-drop needs --eval-data to measure the drop")
    if opts.max_accuracy_drop is not None and opts.max_accuracy_drop < 0:
        raise UsageError(f"--max-accuracy-drop must be ≥ 0, got {opts.max_accuracy_drop}")
    check_output(output, inputs=input_paths, force=opts.force, suffixes=(".safetensors", ".pt"))
    check_output(report, inputs=input_paths, force=opts.force, suffixes=(".json",))
    return output, report


def load_input(path: Path, opts: CommonOptions) -> Loaded:
    return load_checkpoint(path, arch=opts.arch, arch_kwargs=opts.arch_kwargs, trust_code=opts.trust_code,
                           input_shape=opts.input_shape, input_dtype=opts.input_dtype)


def load_dataset(path: Path | None, loaded: Loaded, *, require_targets: bool = True) -> Dataset | None:
    """Read a data file and check that it fits the loaded model; also learn the input shape from it."""
    if path is None:
        return None
    data = load_data(path, require_targets=require_targets)
    check_fits(loaded.model, data, loaded.manifest.input_shape)
    if loaded.manifest.input_shape is None:
        loaded.manifest.input_shape = [1, *data.inputs.shape[1:]]
        loaded.manifest.input_dtype = "long" if data.inputs.dtype == torch.long else "float"
    return data


def model_figures(model: torch.nn.Module) -> dict:
    """Before/after figures every step records."""
    return {"parameters": count_parameters(model), "bytes": stored_bytes(model.state_dict())}


Apply = Callable[[Loaded, Context], list[Step]]


def is_quantized(manifest) -> bool:
    return any(e.get("kind", "").startswith("quantize") for e in manifest.edits)


def check_applicable(op: str, loaded: Loaded) -> None:
    from modelzip_cli.techniques import TECHNIQUES

    if TECHNIQUES[op].float_only and is_quantized(loaded.manifest):
        raise InputError(f"{loaded.path or 'the model'} is already quantized; {op} works on float models",
                         hint=f"run {op} before quantize, on the float checkpoint")


def apply_technique(op: str, cfg, loaded: Loaded, ctx: Context) -> Step:
    """Run one technique on the in-memory model; record its edits in the manifest. Used by every command
    and by every chain step, so there is one implementation of each technique's bookkeeping."""
    from modelzip_cli.techniques import TECHNIQUES

    technique = TECHNIQUES[op]
    check_applicable(op, loaded)
    before = model_figures(loaded.model)
    t0 = time.perf_counter()
    loaded.model, step, loaded.manifest = technique.apply(loaded.model, cfg, ctx, loaded.manifest)
    step.duration_s = round(time.perf_counter() - t0, 4)
    step.before = {**before, **step.before}
    step.after = {**model_figures(loaded.model), **step.after}
    if not step.layers:
        step.layers = layer_table(loaded.model)
    return step


def load_step_data(loaded: Loaded, ctx: Context, *, data: Path | None = None, val_data: Path | None = None,
                   calib_data: Path | None = None, require_targets: bool = True,
                   cache: dict | None = None) -> None:
    """Read and check a technique's own data files before any work. `cache` (path, needs targets) →
    Dataset lets a chain read each file once however many steps use it."""
    cache = {} if cache is None else cache

    def read(path: Path, targets: bool) -> Dataset:
        key = (Path(path).resolve(), targets)
        if key not in cache:
            cache[key] = load_dataset(path, loaded, require_targets=targets)
        return cache[key]

    ctx.data = read(data, require_targets) if data else ctx.data
    ctx.val_data = read(val_data, True) if val_data else ctx.val_data
    ctx.calib_data = read(calib_data, False) if calib_data else ctx.calib_data


def run_transform(command: str, input_path: Path, opts: CommonOptions, apply: Apply, *,
                  context: Context | None = None, prepare: Callable[[Loaded, Context], None] | None = None,
                  extra_inputs: list[Path] = (), gzip_output: bool = False) -> Report:
    """Run one transforming command end to end. `apply` mutates `loaded` (model and manifest)."""
    output, report_path = resolve_outputs(command, [input_path, *extra_inputs], opts)
    loaded = load_input(input_path, opts)
    ctx = context or Context()
    ctx.seed = opts.seed
    eval_data = load_dataset(opts.eval_data, loaded)
    ctx.eval_data = eval_data
    if prepare is not None:
        prepare(loaded, ctx)  # load and check the technique's own data before any work
    if ctx.example_input is None and loaded.manifest.input_shape:
        ctx.example_input = loaded.manifest.example_input()
    report = Report(command=command)
    in_params = count_parameters(loaded.model)
    report.input = file_info(input_path, in_params)
    if eval_data is not None:
        report.metrics["input"] = model_metrics(loaded.model, eval_data, threads=opts.threads,
                                                size_bytes=report.input["bytes"])
    torch.manual_seed(opts.seed)
    report.steps = apply(loaded, ctx)
    report.warnings += ctx.notes
    save_checkpoint(loaded.model, loaded.manifest, output)
    report.output = file_info(output, count_parameters(loaded.model))
    if gzip_output:
        report.output["gzip_bytes"] = gzip_bytes(output)
    if eval_data is not None:
        report.metrics["output"] = model_metrics(loaded.model, eval_data, threads=opts.threads,
                                                 size_bytes=report.output["bytes"])
        lat_in, lat_out = report.metrics["input"]["latency_ms"], report.metrics["output"]["latency_ms"]
        for key, label in (("batch_1", "batch 1"), ("batch_n", f"batch {lat_out['n']}")):
            before, after = lat_in[key], lat_out[key]
            if after > before * 1.05:  # say so when the "compressed" model is measurably slower
                report.warnings.append(f"the output is slower than the input at {label}: {after:.3f} ms vs "
                                       f"{before:.3f} ms (median, {lat_out['threads']} threads)")
        if opts.max_accuracy_drop is not None:
            drop = accuracy_drop(report.metrics)
            report.gate = {"max_accuracy_drop": opts.max_accuracy_drop, "accuracy_drop": round(drop, 4),
                           "passed": drop <= opts.max_accuracy_drop}
            if not report.gate["passed"]:
                report.warnings.append(f"quality gate failed: accuracy dropped {drop:.2f} points, more than "
                                       f"--max-accuracy-drop {opts.max_accuracy_drop}")
    report.summary = final_comparison(report)
    atomic_write_text(report_path, report.to_json())
    return report


def final_comparison(report: Report) -> dict:
    """The seed's closing figures: size and parameter reduction, compression ratio, accuracy drop."""
    i, o = report.input, report.output
    summary = {"size_reduction_pct": round(100 * (1 - o["bytes"] / i["bytes"]), 3),
               "parameter_reduction_pct": round(100 * (1 - o["parameters"] / max(1, i["parameters"])), 3),
               "compression_ratio": round(i["bytes"] / max(1, o["bytes"]), 3)}
    drop = accuracy_drop(report.metrics)
    if drop is not None:
        summary["accuracy_drop"] = round(drop, 4)
    return summary


def accuracy_drop(metrics: dict) -> float | None:
    """Accuracy points lost from input to output, or None without labelled eval data."""
    before, after = metrics.get("input", {}), metrics.get("output", {})
    if "accuracy" not in before or "accuracy" not in after:
        return None
    return (before["accuracy"] - after["accuracy"]) * 100
