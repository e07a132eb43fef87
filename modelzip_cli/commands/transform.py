"""The shape every transforming command shares: validate outputs → load → measure → apply → save → report.

Both the single commands and `chain` go through `run_transform`, so there is one implementation of
output checks, before/after figures, quality gates and report writing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzip_cli.checkpoint import compressed_tensors, memory, shards
from modelzip_cli.checkpoint.edits import is_quantized
from modelzip_cli.checkpoint.format import OUTPUT_SUFFIXES, encode_module
from modelzip_cli.checkpoint.io import Loaded, load_checkpoint, save_checkpoint
from modelzip_cli.checkpoint.layers import count_parameters, layer_table, model_figures
from modelzip_cli.commands import streaming
from modelzip_cli.errors import InputError, ModelzipError, UsageError, first_line
from modelzip_cli.files import Outputs, Target, check_targets
from modelzip_cli.limits import memory_limit
from modelzip_cli.measure.metrics import (
    fidelity,
    gzip_bytes,
    latencies,
    latency_change,
    model_metrics,
    noise_note,
    outputs_class_logits,
    timing_of,
)
from modelzip_cli.measure.perplexity import is_causal_lm, lm_figures, ppl_increase_pct
from modelzip_cli.measure.report import Gate, Report, Step, file_info
from modelzip_cli.nn.surgery import to_dtype
from modelzip_cli.pipeline import distributed
from modelzip_cli.pipeline.context import Context, null_progress
from modelzip_cli.pipeline.data import Dataset, as_model_input, check_fits, float_dtype, load_data
from modelzip_cli.pipeline.run import predict
from modelzip_cli.techniques import OPS, MethodConfig, check_data_needs

CHAIN_TAG = "chained"


@dataclass
class CommonOptions:
    """Options every transforming command takes (README, "Commands")."""

    output: Path | None = None
    report: Path | None = None
    force: bool = False
    seed: int = 0
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_code: bool = False
    trust_arch: bool = False  # trust the architecture the input records (user code)
    input_shape: list[int] | None = None
    input_dtype: str | None = None
    eval_data: Path | None = None
    max_accuracy_drop: float | None = None
    min_fidelity: float | None = None
    max_ppl_increase: float | None = None  # percent
    threads: int | None = None
    device: str = "cpu"  # cpu | cuda | cuda:N | auto: where models train and are measured
    task: str | None = None  # a Hugging Face directory's task (its Auto class)
    output_key: str | None = None  # which output to compare, when the model's output is not one tensor
    max_memory: int | None = None  # bytes: refuse a run estimated to peak above it (memory.py)
    offload_activations: Path | None = None  # a folder calibration keeps block activations in (sequential.py)


def output_tag(command: str) -> str:
    return OPS[command].tag if command in OPS else CHAIN_TAG


def default_output(input_path: Path, command: str) -> Path:
    """model.pt → model.pruned.pt, beside the input. A model directory DIR → DIR.pruned.safetensors in the
    current directory: never inside the input folder, nor beside it (in site-packages, say)."""
    if input_path.is_dir():
        return Path(f"{input_path.resolve().name}.{output_tag(command)}.safetensors")
    return input_path.with_name(f"{input_path.stem}.{output_tag(command)}{input_path.suffix}")


def default_report(output: Path) -> Path:
    """The output's path + .json (model.pruned.pt.json): never the report of the input (model.json)."""
    return output.with_name(output.name + ".json")


def resolve_outputs(command: str, input_paths: list[Path], opts: CommonOptions,
                    extra_outputs: list[Target] = ()) -> tuple[Path, Path]:
    """The output and report paths, every file the run writes checked by the one output-path policy
    (`files.check_targets`) before any work. `extra_outputs`: other files the run writes (chain
    intermediates, a recipe's export)."""
    output = opts.output or default_output(input_paths[0], command)
    report = opts.report or default_report(output)
    if opts.max_accuracy_drop is not None and opts.eval_data is None:
        raise UsageError("--max-accuracy-drop needs --eval-data to measure the drop")
    if opts.max_accuracy_drop is not None and not opts.max_accuracy_drop >= 0:  # NaN fails too
        raise UsageError(f"--max-accuracy-drop must be a number ≥ 0, got {opts.max_accuracy_drop}")
    if opts.min_fidelity is not None and opts.eval_data is None:
        raise UsageError("--min-fidelity needs --eval-data to measure fidelity on")
    if opts.min_fidelity is not None and not -1 <= opts.min_fidelity <= 1:
        raise UsageError(f"--min-fidelity is a cosine in [-1, 1], got {opts.min_fidelity}")
    if opts.max_ppl_increase is not None and opts.eval_data is None:
        raise UsageError("--max-ppl-increase needs --eval-data (language-model windows) to measure perplexity on")
    if opts.max_ppl_increase is not None and not 0 <= opts.max_ppl_increase < 1e6:
        raise UsageError(f"--max-ppl-increase is a percentage ≥ 0, got {opts.max_ppl_increase}")
    check_targets([Target("output", output, OUTPUT_SUFFIXES), Target("report", report, (".json",)),
                   *extra_outputs], inputs=input_paths, force=opts.force)
    return output, report


def load_input(path: Path, opts: CommonOptions) -> Loaded:
    try:
        return load_checkpoint(path, arch=opts.arch, arch_kwargs=opts.arch_kwargs, trust_code=opts.trust_code,
                               input_shape=opts.input_shape, input_dtype=opts.input_dtype, task=opts.task,
                               output_key=opts.output_key, trust_arch=opts.trust_arch)
    except ModelzipError as exc:  # load_checkpoint's hints speak Python (its arguments): say the flags instead
        cli_hint = getattr(exc, "cli_hint", None)
        if cli_hint is None:
            raise
        raise type(exc)(exc.message, hint=cli_hint) from None


def load_dataset(path: Path | None, loaded: Loaded, *, require_targets: bool = True) -> Dataset | None:
    """Read a data file and check that it fits the loaded model; also learn the input shape from it."""
    if path is None:
        return None
    data = load_data(path, require_targets=require_targets)
    check_fits(loaded.model, data, loaded.manifest.input_shape)
    tokens = data.inputs.dtype == torch.long  # token lengths vary: the data's own is the better example
    if loaded.manifest.input_shape is None or tokens:
        loaded.manifest.input_shape = [1, *data.inputs.shape[1:]]
        loaded.manifest.input_dtype = "long" if tokens else "float"
    return data


def check_example(loaded: Loaded, example: torch.Tensor) -> None:
    """Techniques trace and probe the model on its example input: one that does not fit (a manifest's or
    --input-shape's shape) is one line here, not a failure deep inside a technique."""
    try:  # (torch.fx modules print their own traceback when they fail: the error below is the one line)
        with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
            loaded.model(as_model_input(example, float_dtype(loaded.model)))
    except Exception as exc:
        raise InputError(f"{loaded.path or 'the model'} cannot run its example input of shape "
                         f"{list(example.shape)} ({loaded.manifest.input_dtype}): {first_line(exc, 200)}",
                         hint="give the input_shape the model takes with --input-shape (and --input-dtype)") from None


def check_applicable(op: str, loaded: Loaded) -> None:
    if OPS[op].float_only and is_quantized(loaded.manifest):
        if loaded.source == "compressed-tensors" and compressed_tensors.only_weight_only(loaded.manifest.edits):
            loaded.manifest.edits, note = compressed_tensors.dequantize(loaded.model, loaded.manifest.edits)
            loaded.notes.append(note)
            return
        raise InputError(f"{loaded.path or 'the model'} is already quantized; {op} works on float models",
                         hint=f"run {op} before quantize, on the float checkpoint")


def apply_technique(cfg: MethodConfig, loaded: Loaded, ctx: Context) -> Step:
    """Run one technique on the in-memory model and turn its result into a report step. Used by every
    command and every chain step, so there is one implementation of each technique's bookkeeping.
    The model is encoded once after the step; the figures, the layer table and the saved file share it."""
    before = model_figures(loaded.model, loaded.encoded)
    dtype = float_dtype(loaded.model)
    if dtype != torch.float32:  # fp16/bf16 train and calibrate poorly: techniques compute in float32
        loaded.model.float()
    t0 = time.perf_counter()
    result = OPS[cfg.op].apply(loaded.model, cfg, ctx, loaded.manifest)
    duration = round(time.perf_counter() - t0, 4)
    if dtype != torch.float32:
        to_dtype(result.model, dtype)  # the output keeps the input's float dtype
    loaded.model = result.model
    loaded.manifest = result.manifest or loaded.manifest.with_edits(result.edits)
    loaded.encoded = encode_module(loaded.model)
    rows = result.layers
    if rows is None:
        rows = [{**row, **result.layer_extra.get(row["name"], {})}
                for row in layer_table(loaded.model, encoded=loaded.encoded)]
    return Step(op=cfg.op, config=cfg.to_dict(), before={**before, **result.before},
                after={**model_figures(loaded.model, loaded.encoded), **result.after}, layers=rows,
                duration_s=duration, notes=result.notes, warnings=result.warnings)


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


Apply = Callable[[Loaded, Context], list[Step]]


def run_technique(cfg: MethodConfig, model: Path, opts: CommonOptions, *, files: dict[str, Path | None],
                  progress=null_progress, extra_inputs: tuple[Path, ...] = (), gzip_output: bool = False,
                  trusted_refs: frozenset[str] = frozenset()) -> Report | None:
    """One technique command end to end: its data needs checked first, then `run_transform`.
    `trusted_refs`: architectures named on the command line (a distill student)."""
    check_data_needs(cfg, files, where=f"--method {cfg.method}" if cfg.method else cfg.op)
    src = stream_source(cfg, model, opts, files)
    if src is not None:
        return run_streamed(cfg, model, src, opts, progress)
    estimate = memory.whole_model(model, files.get("calib_data"), offloaded=opts.offload_activations is not None)
    memory.check(opts.max_memory, estimate, cfg.op)

    def prepare(loaded: Loaded, ctx: Context) -> None:
        load_step_data(loaded, ctx, data=files.get("data"), val_data=files.get("val_data"),
                       calib_data=files.get("calib_data"), require_targets=cfg.needs_targets())

    return run_transform(cfg.op, model, opts, lambda loaded, ctx: [apply_technique(cfg, loaded, ctx)],
                         ops=[cfg.op], context=Context(progress=progress, trusted_refs=trusted_refs), prepare=prepare,
                         gzip_output=gzip_output, extra_inputs=[*extra_inputs, *(f for f in files.values() if f)])


def run_transform(command: str, input_path: Path, opts: CommonOptions, apply: Apply, *, ops: list[str] = (),
                  context: Context | None = None, prepare: Callable[[Loaded, Context], None] | None = None,
                  extra_inputs: list[Path] = (), gzip_output: bool = False, outputs: Outputs | None = None,
                  extra_outputs: list[Target] = ()) -> Report | None:
    """Run one transforming command end to end. `apply` mutates `loaded` (model and manifest).
    `extra_inputs`: every other file the run reads (data, recipe, student), which no output may be.
    Every file is staged in `outputs` and renamed into place only when the whole run has succeeded: an
    error or an interrupt leaves nothing behind. `extra_outputs`: files `apply` stages there itself.

    Under torchrun every rank runs this with the same inputs and trains together inside `apply`; rank 0
    alone measures, writes the checkpoint and the report, and the other ranks return None."""
    inputs = [input_path, *extra_inputs, *([opts.eval_data] if opts.eval_data else [])]
    output, report_path = resolve_outputs(command, inputs, opts, extra_outputs)
    memory.check(opts.max_memory, memory.whole_model(input_path), command)
    with outputs or Outputs() as staged:
        ctx = context or Context()
        ctx.device = distributed.resolve_device(opts.device)
        ctx.offload = opts.offload_activations
        loaded = load_input(input_path, opts)
        for op in ops:
            check_applicable(op, loaded)
        ctx.seed, ctx.trust_code = opts.seed, opts.trust_code
        if command in OPS and OPS[command].fidelity_gate:  # a chain's gate is on the whole chain, not one step
            ctx.min_fidelity = opts.min_fidelity
        # labels are needed only to measure an accuracy drop; fidelity needs inputs alone
        eval_data = load_dataset(opts.eval_data, loaded, require_targets=opts.max_accuracy_drop is not None)
        ctx.eval_data = eval_data
        if opts.max_ppl_increase is not None and not (is_causal_lm(loaded.model) and eval_data is not None
                                                      and not eval_data.inputs.is_floating_point()):
            raise UsageError("--max-ppl-increase needs a causal language model and token windows in --eval-data",
                             hint="make windows with: modelzip data text --pack")
        if prepare is not None:
            prepare(loaded, ctx)  # load and check the technique's own data before any work
        eval_data, held_out = hold_out(ctx, eval_data, opts.seed)
        ctx.eval_data = eval_data
        if ctx.example_input is None and loaded.manifest.input_shape:
            ctx.example_input = loaded.manifest.example_input()
        if ctx.example_input is not None:
            check_example(loaded, ctx.example_input)
        report = Report(command=command, warnings=list(loaded.notes))
        report.input = file_info(input_path, count_parameters(loaded.model))
        reference = original = None
        if eval_data is not None and distributed.is_main():
            report.metrics["input"] = model_metrics(loaded.model, eval_data, threads=opts.threads, latency=False,
                                                    size_bytes=report.input["bytes"], device=ctx.device,
                                                    lm=False)  # a causal LM's figures: beside the output's
            report.metrics["input"]["measured_on"] = held_out["held_out"] if held_out else describe(eval_data)
            if not is_causal_lm(loaded.model):  # a causal LM's logits are compared batch by batch (lm.py)
                reference = predict(loaded.model, eval_data.inputs)  # what fidelity is measured against
            original = copy.deepcopy(loaded.model)  # timed beside the output, in the same rounds
        torch.manual_seed(opts.seed)
        report.steps = apply(loaded, ctx)
        report.warnings.extend(w for step in report.steps for w in step.warnings)
        if not distributed.is_main():  # rank 0 writes; the others' part was the training inside `apply`
            return None
        report.runtime = distributed.runtime(ctx.device)
        check_runs(loaded, command)
        save_checkpoint(loaded.model, loaded.manifest, output, encoded=loaded.encoded, outputs=staged)
        written = staged.staged(output)
        report.output = file_info(output, count_parameters(loaded.model), read_from=written)
        _size_warning(report)
        if gzip_output:
            report.output["gzip_bytes"] = gzip_bytes(written)
        if eval_data is not None:
            causal = reference is None
            report.metrics["output"] = model_metrics(loaded.model, eval_data, threads=opts.threads, latency=False,
                                                     size_bytes=report.output["bytes"], device=ctx.device,
                                                     lm=not causal)
            report.metrics["input"]["latency_ms"], report.metrics["output"]["latency_ms"] = latencies(
                [original, loaded.model], eval_data, threads=opts.threads, device=ctx.device)
            if causal:  # perplexity, next-token agreement and the logits' fidelity, side by side
                before, after = lm_figures([original, loaded.model], eval_data.inputs)
                report.metrics["input"].update(before)
                report.metrics["output"].update(after)
            else:
                report.metrics["output"]["fidelity"] = fidelity(reference, predict(loaded.model, eval_data.inputs),
                                                                class_logits=outputs_class_logits(loaded.model))
            del original
            _perplexity_warning(report)
            report.metrics["output"]["measured_on"] = report.metrics["input"]["measured_on"]
            _latency_warnings(report)
            _gate(report, opts)
        report.summary = final_comparison(report)
        report.report_path = str(report_path)
        if held_out:
            report.summary["data_split"] = held_out
        staged.write(report_path, lambda tmp: tmp.write_text(report.to_json()))
        staged.commit()
    return report


def stream_source(cfg: MethodConfig, model: Path, opts: CommonOptions, files: dict[str, Path | None]):
    """The input as a `streaming.Source` when this run streams (module by module; README, "Models bigger than
    memory"): a technique that needs no data, no figures that need the whole model, a safetensors input that
    allows it, and an input of STREAM_FROM bytes or more, or one whose whole-model peak would not fit in memory.
    Else None."""
    plain = (opts.eval_data is None and opts.device == "cpu" and opts.arch is None and opts.input_shape is None
             and opts.input_dtype is None and not distributed.launched())
    if not plain or not streaming.streamable(cfg, files):
        return None
    whole = memory.whole_model(model)  # from the headers: cheap, nothing built yet
    try:
        small = disk_total(shards.resolve(model)) < streaming.STREAM_FROM
    except OSError:  # a missing or unreadable input: the whole-model path says what is wrong
        return None
    if small and (whole is None or whole.bytes <= memory_limit()):
        return None
    src = streaming.open_source(model, task=opts.task)
    if isinstance(src, str) or streaming.stream_ok(src, cfg) is not None:
        return None
    return src


def run_streamed(cfg: MethodConfig, model: Path, src, opts: CommonOptions, progress) -> Report:
    """A streamed run end to end: outputs checked, the peak checked against --max-memory, each module read,
    transformed and written in turn (streaming.py), the report written; all staged until it succeeds."""
    output, report_path = resolve_outputs(cfg.op, [model], opts)
    memory.check(opts.max_memory, memory.Estimate(streaming.streamed_peak(src), "one module at a time, streamed"),
                 cfg.op)
    stop = threading.Event()  # an error ends the hashing at once
    with Outputs() as staged, ThreadPoolExecutor(1) as pool:
        # The input's sha256 while the modules stream: hashlib lets go of the GIL, and the bytes are read anyway
        hashed = pool.submit(file_info, shards.resolve(model), stop=stop)
        torch.manual_seed(opts.seed)
        try:
            result = streaming.run_streamed(src, cfg, output, staged, progress=progress, hashing=True)
        except BaseException:
            stop.set()
            raise
        report = Report(command=cfg.op)
        report.input = {**hashed.result(), "parameters": result.before["parameters"]}
        report.input["bytes"] = disk_total(shards.resolve(model))
        report.output = file_info(result.path, result.after["parameters"], read_from=staged.staged(result.path))
        report.output["bytes"] = result.bytes
        notes = [streaming.note(src), *result.notes]
        report.steps = [Step(op=cfg.op, config=cfg.to_dict(), before=result.before, after=result.after,
                             layers=result.rows, duration_s=result.duration_s, notes=notes)]
        report.runtime = distributed.runtime(torch.device("cpu"))
        report.summary = final_comparison(report)
        report.report_path = str(report_path)
        staged.write(report_path, lambda tmp: tmp.write_text(report.to_json()))
        staged.commit()
    return report


def disk_total(path: Path) -> int:
    """Bytes on disk of an input: a file, a folder, or a sharded checkpoint's index and shards."""
    from modelzip_cli.files import disk_bytes

    return shards.total_bytes(path) if shards.is_index(path) else disk_bytes(path)


def describe(data: Dataset) -> str:
    return f"{len(data)} samples of {data.path}"


def split_held_out(data: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """One file as two disjoint halves, seeded: (tuning part, held-out part), each in file order."""
    if len(data) < 2:
        raise InputError(f"{data.path} has {len(data)} sample: too few to split into tuning and held-out parts",
                         hint="give --calib-data for tuning, or more samples")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    halves = order[:len(data) // 2].sort().values, order[len(data) // 2:].sort().values
    return tuple(Dataset(data.inputs[i], None if data.targets is None else data.targets[i], data.path)
                 for i in halves)


def hold_out(ctx: Context, eval_data: Dataset | None, seed: int) -> tuple[Dataset | None, dict | None]:
    """Gates are judged on data nothing was tuned on. When the run would tune on the --eval-data file itself (a
    --min-fidelity choosing which layers stay float with no --calib-data, or a technique's --data or
    --calib-data that is the --eval-data file), the file is split, seeded, into a tuning part (given to the
    technique) and a held-out part (every figure and gate). Returns the data to measure on and, when split,
    what the report says about it."""
    if eval_data is None:
        return None, None
    same = [k for k in ("data", "calib_data", "val_data")
            if getattr(ctx, k) is not None and Path(getattr(ctx, k).path).resolve() == Path(eval_data.path).resolve()]
    chooses = ctx.min_fidelity is not None and ctx.calib_data is None
    if not same and not chooses:
        return eval_data, None
    tune, held = split_held_out(eval_data, seed)
    for key in same:
        setattr(ctx, key, tune)
    if chooses:
        ctx.tune_data = tune
    why = ("--min-fidelity chooses the layers left in float on data of its own (no --calib-data)" if chooses else
           f"{', '.join('--' + k.replace('_', '-') for k in same)} is the --eval-data file")
    return held, {"tuning": f"{len(tune)} of {len(eval_data)} samples of {eval_data.path} (seed {seed})",
                  "held_out": f"the other {len(held)} of {len(eval_data)} samples of {eval_data.path} (seed {seed})",
                  "why": why}


def check_runs(loaded: Loaded, command: str) -> None:
    """Never write a model whose forward fails (a width that breaks an attention layout, say): run it on
    the example input before saving."""
    if not loaded.manifest.input_shape:
        return
    try:  # (torch.fx modules print their own traceback when they fail: the error below is the one line)
        with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
            loaded.model.eval()(as_model_input(loaded.manifest.example_input(2), float_dtype(loaded.model)))
    except Exception as exc:
        raise InputError(f"the {command} result cannot run its forward, so nothing was written: "
                         f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
                         hint="leave the offending layers out with --exclude") from None


def _latency_warnings(report: Report) -> None:
    """Say so when the "compressed" model is slower by more than the spread of both timings; say once
    when the machine was too noisy for the figures to mean much."""
    lat_in, lat_out = report.metrics["input"]["latency_ms"], report.metrics["output"]["latency_ms"]
    noisy = noise_note([lat_in, lat_out])
    if noisy:
        report.warnings.append(noisy)
    for key, label in (("batch_1", "batch 1"), ("batch_n", f"batch {lat_out['n']}")):
        before, after = timing_of(lat_in, key), timing_of(lat_out, key)
        if latency_change(before, after) == "slower":
            report.warnings.append(f"the output is slower than the input at {label}: {after.median:.3f} ms "
                                   f"(IQR {after.q1:.3f}–{after.q3:.3f}) vs {before.median:.3f} ms "
                                   f"(IQR {before.q1:.3f}–{before.q3:.3f}), {after.rounds} interleaved rounds, "
                                   f"{lat_out['threads']} threads")


def _size_warning(report: Report) -> None:
    """An output larger on disk than its input is said, with both sizes (a compressor that grows a file
    has not compressed it)."""
    before, after = (report.input or {}).get("bytes"), (report.output or {}).get("bytes")
    if before and after and after > before:
        report.warnings.append(f"the output is larger on disk than the input: {after:,} bytes vs {before:,} "
                               f"({after / before:.2f}×)")


def _perplexity_warning(report: Report) -> None:
    """A language model whose perplexity more than doubled is never passed over in silence."""
    before = report.metrics.get("input", {}).get("perplexity")
    after = report.metrics.get("output", {}).get("perplexity")
    if before and after and after > 2 * before:
        report.warnings.append(f"perplexity more than doubled: {before:.2f} → {after:.2f} "
                               f"(+{ppl_increase_pct(before, after):.0f}%) on the --eval-data windows")


def _gate(report: Report, opts: CommonOptions) -> None:
    """The quality gates: --max-accuracy-drop (labelled data), --min-fidelity (any data) and --max-ppl-increase
    (language-model windows)."""
    if opts.max_accuracy_drop is None and opts.min_fidelity is None and opts.max_ppl_increase is None:
        return
    gate = report.gate = Gate(judged_on=report.metrics.get("output", {}).get("measured_on"))
    if opts.max_accuracy_drop is not None:
        drop = accuracy_drop(report.metrics)
        gate.max_accuracy_drop, gate.accuracy_drop = opts.max_accuracy_drop, round(drop, 4)
        if not drop <= opts.max_accuracy_drop:
            gate.fail(f"accuracy dropped {drop:.2f} points, more than --max-accuracy-drop {opts.max_accuracy_drop}")
    if opts.min_fidelity is not None:
        cosine = report.metrics["output"]["fidelity"]["cosine_mean"]
        gate.min_fidelity, gate.fidelity = opts.min_fidelity, cosine
        if not cosine >= opts.min_fidelity:
            gate.fail(f"fidelity (mean cosine to the input model) {cosine:.4f}, below --min-fidelity "
                      f"{opts.min_fidelity}")
    if opts.max_ppl_increase is not None:
        before = report.metrics["input"].get("perplexity")
        after = report.metrics["output"].get("perplexity")
        if before is None or after is None:
            raise UsageError("--max-ppl-increase needs a causal language model and token windows in --eval-data",
                             hint="make windows with: modelzip data text --pack")
        increase = ppl_increase_pct(before, after)
        gate.max_ppl_increase, gate.ppl_increase = opts.max_ppl_increase, round(increase, 4)
        if not increase <= opts.max_ppl_increase:
            gate.fail(f"perplexity rose {increase:.2f}% ({before:.3f} → {after:.3f}), more than --max-ppl-increase "
                      f"{opts.max_ppl_increase}")
    report.warnings += [f"quality gate failed: {why}" for why in gate.failures]


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
