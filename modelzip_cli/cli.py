"""The Typer app: thin commands that parse options, call one library function, and render the result.

Nothing heavy is imported at module level: `modelzip --help` must not import torch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from modelzip_cli.errors import (
    INTERNAL_ERROR,
    CodeRanWarning,
    InputError,
    Interrupted,
    ModelzipError,
    QualityGateFailed,
    UsageError,
    exit_code_for,
    first_line,
    os_condition,
)
from modelzip_cli.version import __version__

if TYPE_CHECKING:
    from modelzip_cli.report import Report
    from modelzip_cli.runner import CommonOptions

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # -h as --help, in every command and sub-command
# add_completion: --install-completion / --show-completion (bash, zsh, fish, PowerShell) on the root command
app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings=HELP_OPTIONS, help="Make PyTorch models smaller and faster from the shell.")

# --------------------------------------------------------------------------------------------------
# Options shared by commands, declared once each and attached by `command(...)` (README, "Commands")

Input = Annotated[Path, typer.Argument(help="checkpoint (.safetensors, .pt, .pth, .bin) or Hugging Face model "
                                       "directory", show_default=False)]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="default: INPUT stem + .COMMAND + suffix, beside "
                                             "it (a model directory DIR: DIR.COMMAND.safetensors here)")]
ReportPath = Annotated[Path | None, typer.Option("--report", help="default: the output path + .json")]
Force = Annotated[bool, typer.Option("--force", help="overwrite an existing output")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1,  # what torch's generators take, with room
                                   help="same inputs and seed → same output tensors")]
Arch = Annotated[str | None, typer.Option("--arch", help="architecture of a raw state dict: zoo:NAME or pkg.mod:fn")]
ArchKwargs = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON object of architecture kwargs")]
TrustCode = Annotated[bool, typer.Option("--trust-code", help="allow unpickling a full nn.Module (runs code)")]
TrustArch = Annotated[bool, typer.Option("--trust-arch", help="import the user architecture (pkg.mod:fn) the "
                                          "input records (or set MODELZIP_TRUSTED_MODULES=pkg)")]
InputShape = Annotated[str | None, typer.Option("--input-shape", help="example input shape, e.g. 1,64")]
InputDtype = Annotated[str | None, typer.Option("--input-dtype", help="float or long (token ids)")]
Task = Annotated[str | None, typer.Option("--task", help="a Hugging Face directory's task: feature-extraction, "
                                          "sequence-classification, causal-lm, image-classification, … "
                                          "(default: from its config)")]
OutputKey = Annotated[str | None, typer.Option("--output-key", help="the output to compare when the model "
                                               "returns several (default: logits, else pooled last_hidden_state)")]
MinFidelity = Annotated[float | None, typer.Option("--min-fidelity", help="with --eval-data: exit 1 when the "
                                                   "mean cosine to the input model's outputs is below this")]
EvalData = Annotated[Path | None, typer.Option("--eval-data", help="measure accuracy/latency before and after")]
MaxDrop = Annotated[float | None, typer.Option("--max-accuracy-drop",
                                                help="with --eval-data: exit 1 above this many points")]
MaxPplIncrease = Annotated[float | None, typer.Option("--max-ppl-increase", help="with --eval-data (language-model "
                                                      "windows): exit 1 when perplexity rises more than this "
                                                      "many percent")]
Threads = Annotated[int | None, typer.Option("--threads", help="threads for latency (default: all usable cores)")]
Device = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | auto: where the model trains and is "
                                     "measured (under torchrun, cuda is each process's cuda:LOCAL_RANK)")]
Json = Annotated[bool, typer.Option("--json", help="print the report JSON to stdout")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no summary or progress on stderr")]
Include = Annotated[list[str] | None, typer.Option("--include", help="module name glob to select (repeatable)")]
Exclude = Annotated[list[str] | None, typer.Option("--exclude", help="module name glob to skip (repeatable)")]
Data = Annotated[Path | None, typer.Option("--data", help="training data: fine-tune after the step (without "
                                          "labels with --recover)")]
FinetuneEpochs = Annotated[int | None, typer.Option("--finetune-epochs", help="with --data: epochs (default 3)")]
Lr = Annotated[float | None, typer.Option("--lr", help="fine-tuning learning rate (default 5e-4)")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="training batch size (default 64)")]
MaxSamples = Annotated[int | None, typer.Option("--max-samples", help="train on at most N samples of --data "
                                                "(a seeded random subset; default all)")]
Recover = Annotated[bool, typer.Option("--recover", help="fine-tune on --data against the input model as teacher "
                                       "(no labels needed); pruned weights stay pruned")]
RecoverLoss = Annotated[str | None, typer.Option("--recover-loss", help="with --recover: auto (kd for class logits, "
                                                 "else cosine) | kd | cosine | mse (default auto)")]
RecoverTemperature = Annotated[float | None, typer.Option("--temperature", help="with --recover: kd softmax "
                                                          "temperature (default 2)")]
HiddenWeight = Annotated[float | None, typer.Option("--hidden-weight", help="also match the teacher's hidden "
                                                    "states (Hugging Face models) with this weight (default 0: off)")]
LatencyBatch = Annotated[int | None, typer.Option("--batch-size", help="N for the batch-N latency (default 256, "
                                                  "or 32 for token sequences)")]


def _options(**spec: tuple[Any, Any]) -> list[inspect.Parameter]:
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
            for name, (annotation, default) in spec.items()]


MODEL_OPTIONS = _options(arch=(Arch, None), arch_kwargs=(ArchKwargs, None), trust_code=(TrustCode, False),
                         trust_arch=(TrustArch, False),
                         input_shape=(InputShape, None), input_dtype=(InputDtype, None), task=(Task, None),
                         output_key=(OutputKey, None), device=(Device, "cpu"))
OUTPUT_OPTIONS = _options(output=(Output, None), report=(ReportPath, None), force=(Force, False), seed=(Seed, 0),
                          eval_data=(EvalData, None), max_accuracy_drop=(MaxDrop, None),
                          min_fidelity=(MinFidelity, None), max_ppl_increase=(MaxPplIncrease, None))
RUN_OPTIONS = _options(threads=(Threads, None), as_json=(Json, False), quiet=(Quiet, False))
SELECT_OPTIONS = _options(include=(Include, None), exclude=(Exclude, None))
FINETUNE_OPTIONS = _options(data=(Data, None), finetune_epochs=(FinetuneEpochs, None), lr=(Lr, None),
                            batch_size=(BatchSize, None), max_samples=(MaxSamples, None), recover=(Recover, False),
                            recover_loss=(RecoverLoss, None), temperature=(RecoverTemperature, None),
                            hidden_weight=(HiddenWeight, None))
TRANSFORM_OPTIONS = [*MODEL_OPTIONS, *OUTPUT_OPTIONS, *RUN_OPTIONS]


def command(*groups: list[inspect.Parameter], name: str | None = None):
    """Register a command whose options are its own parameters plus the shared groups. The function
    receives the groups' values as one namespace, `shared`."""

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "shared"]
        shared = [p for group in groups for p in group]
        names = {p.name for p in shared}

        @functools.wraps(fn)
        def wrapper(**kwargs):
            mine = {k: v for k, v in kwargs.items() if k not in names}
            return fn(**mine, shared=SimpleNamespace(**{k: v for k, v in kwargs.items() if k in names}))

        params = own + shared
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return app.command(name)(wrapper)

    return decorate


def _console():
    from rich.console import Console

    # Piped or captured stderr (CI logs, make) gets a wide fixed width instead of rich's 80 columns.
    return Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def parse_json_object(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc.msg} at char {exc.pos}",
                         hint=f"quote it, e.g. {flag} '{{\"hidden_sizes\": [64, 32]}}'") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


# Bounds of numeric options: far beyond any real use, below what makes torch or a tokenizer abort.
MAX_THREADS = 1024  # torch crashes (SIGSEGV) at 100,000
MAX_EXAMPLE_ELEMENTS = 1 << 26  # --input-shape: 256 MB of float32 per example
MAX_LATENCY_BATCH = 4096  # --batch-size of eval, compare, export: N for the batch-N latency


def parse_shape(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        shape = [int(s) for s in text.replace("x", ",").split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers", hint="e.g. --input-shape 1,64") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers", hint="e.g. --input-shape 1,64")
    elements = 1
    for s in shape:
        elements *= s
    if elements > MAX_EXAMPLE_ELEMENTS:
        raise UsageError(f"--input-shape {text!r} is {elements:,} elements, more than {MAX_EXAMPLE_ELEMENTS:,}",
                         hint="give the shape of one example, e.g. --input-shape 1,3,224,224")
    return shape


def check_latency_batch(batch_size: int | None) -> None:
    if batch_size is not None and not 1 <= batch_size <= MAX_LATENCY_BATCH:
        raise UsageError(f"--batch-size must be in [1, {MAX_LATENCY_BATCH}], got {batch_size}",
                         hint="N for the batch-N latency; the default is 256 (32 for token sequences)")


def parse_dtype(text: str | None) -> str | None:
    if text is not None and text not in {"float", "long"}:
        raise UsageError(f"--input-dtype must be float or long, got {text!r}")
    return text


def common_options(shared: SimpleNamespace) -> CommonOptions:
    """The runner's options from whichever shared groups a command has."""
    from modelzip_cli.runner import CommonOptions

    g = vars(shared)
    if g.get("threads") is not None and not 1 <= g["threads"] <= MAX_THREADS:
        raise UsageError(f"--threads must be in [1, {MAX_THREADS}], got {g['threads']}")
    fields = {k: g[k] for k in ("output", "report", "force", "seed", "trust_code", "trust_arch", "eval_data",
                                "max_accuracy_drop", "min_fidelity", "max_ppl_increase", "threads", "arch", "task",
                                "output_key",
                                "device") if k in g}
    return CommonOptions(**fields, arch_kwargs=parse_json_object(g.get("arch_kwargs"), "--arch-kwargs"),
                         input_shape=parse_shape(g.get("input_shape")), input_dtype=parse_dtype(g.get("input_dtype")))


def given(**values: Any) -> dict[str, Any]:
    """The options the user actually gave (technique options default to None on the command line, so an
    option that does not apply to the chosen method can be refused by name)."""
    return {k: v for k, v in values.items() if v is not None and v != [] and v != ()}


def finetune_values(shared: SimpleNamespace) -> dict[str, Any]:
    """The FINETUNE_OPTIONS group's values the user gave (the FineTune and Recover config fields)."""
    return given(finetune_epochs=shared.finetune_epochs, lr=shared.lr, batch_size=shared.batch_size,
                 max_samples=shared.max_samples, recover=shared.recover or None, recover_loss=shared.recover_loss,
                 temperature=shared.temperature, hidden_weight=shared.hidden_weight)


class _RichBar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, steps: int = 1, **fields: Any) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.task, advance=steps, status=text)


def progress_factory(quiet: bool):
    """A Context.progress backed by a rich progress bar on stderr (silent with --quiet)."""
    from modelzip_cli.context import null_progress
    from modelzip_cli.distributed import is_main

    if quiet or not is_main():  # under torchrun, rank 0 alone shows progress
        return null_progress

    @contextlib.contextmanager
    def factory(description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                      console=_console(), transient=False) as progress:
            yield _RichBar(progress, progress.add_task(description, total=total, status=""))

    return factory


def emit(report: Report | None, shared: SimpleNamespace) -> None:
    """Summary to stderr, JSON to stdout; exit 1 when a quality gate failed (the output is written).
    Under torchrun, ranks other than 0 have no report: rank 0 writes and reports."""
    if report is None:
        return
    if not shared.quiet:
        from modelzip_cli.report import render

        render(report, _console())
    if shared.as_json:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    if report.gate is not None and not report.gate["passed"]:
        from modelzip_cli.errors import QualityGateFailed

        failed = [w.removeprefix("quality gate failed: ") for w in report.warnings if w.startswith("quality gate")]
        raise QualityGateFailed(f"quality gate failed: {'; '.join(failed)}; output and report were written")


def technique(op: str, method: str | None, model: Path, shared: SimpleNamespace, values: dict[str, Any], *,
              files: dict[str, Path | None], gzip_output: bool = False, extra_inputs: tuple[Path, ...] = (),
              trusted_refs: frozenset[str] = frozenset()) -> Report | None:
    """The body every technique command shares: build the config, run it, render the report."""
    from modelzip_cli.runner import run_technique
    from modelzip_cli.techniques import make_config

    cfg = make_config(op, method, values)
    report = run_technique(cfg, model, common_options(shared), files=files, progress=progress_factory(shared.quiet),
                           extra_inputs=extra_inputs, gzip_output=gzip_output, trusted_refs=trusted_refs)
    emit(report, shared)
    return report


PlanFile = Annotated[Path | None, typer.Option("--plan", help="run this command's steps of a plan written by "
                                               "`modelzip analyze --plan-out` (per-layer choices)")]


def run_plan(op: str, model: Path, plan: Path, shared: SimpleNamespace, data: Path | None,
             own: dict[str, Any]) -> None:
    """`prune/quantize/lowrank --plan PLAN`: the plan's steps of this op, run as `chain` runs them."""
    from modelzip_cli.chain import check_data_needs_all, parse_recipe, run_chain

    if own or shared.include or shared.exclude:
        raise UsageError(f"--plan sets the {op} options per layer; leave out "
                         + ", ".join(sorted("--" + k.replace("_", "-") for k in own) or ["--include/--exclude"]))
    steps = [s for s in parse_recipe(plan) if s.op == op]
    if not steps:
        raise UsageError(f"plan {plan} has no {op} step",
                         hint=f"run the whole plan: modelzip chain MODEL --recipe {plan}")
    check_data_needs_all(steps, data)
    emit(run_chain(model, steps, common_options(shared), data=data, recipe=plan, command=op,
                   progress=progress_factory(shared.quiet)), shared)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"modelzip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                                 help="print the version and exit")] = False) -> None:
    """modelzip reads a checkpoint, writes a new checkpoint plus a JSON report. Exit codes: 0 ok,
    1 quality gate failed, 2 bad usage or input (nothing written), 3 internal error, 130 / 143 interrupted
    (SIGINT / SIGTERM; nothing written)."""


# --------------------------------------------------------------------------------------------------
# Commands


@command(_options(trust_code=(TrustCode, False)), RUN_OPTIONS[1:], name="inspect")
def inspect_(model: Input, sha256: Annotated[bool, typer.Option(
        "--sha256", help="also hash the whole file (reads all of it)")] = False, *, shared) -> None:
    """Parameters, bytes, format, edit history and a per-layer table — from the header alone."""
    from modelzip_cli.inspection import inspect_checkpoint

    emit(inspect_checkpoint(model, trust_code=shared.trust_code, hash_file=sha256), shared)


@command(MODEL_OPTIONS, RUN_OPTIONS, name="eval")
def eval_(model: Input, data: Annotated[Path, typer.Option("--data", help="data file (accuracy needs labels)")],
          batch_size: LatencyBatch = None, *, shared) -> None:
    """Accuracy, loss, median latency at batch 1 and batch N, size."""
    from modelzip_cli.evaluate import evaluate_checkpoint

    check_latency_batch(batch_size)
    emit(evaluate_checkpoint(model, data, common_options(shared), batch_n=batch_size), shared)


@command(SELECT_OPTIONS, FINETUNE_OPTIONS, TRANSFORM_OPTIONS)
def prune(
    model: Input,
    ratio: Annotated[float | None, typer.Option("--ratio", help="fraction to remove, in [0, 1)")] = None,
    method: Annotated[str, typer.Option("--method", help="magnitude | wanda | sparsegpt | structured | "
                                        "gradual")] = "magnitude",
    scope: Annotated[str | None, typer.Option("--scope", help="magnitude, gradual: global (one threshold) | "
                                              "layer (default global)")] = None,
    granularity: Annotated[str | None, typer.Option("--granularity", help="gradual: unstructured (magnitude) | "
                                                    "structured (default unstructured)")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="gradual: steps on the cubic schedule "
                                              "(default 5)")] = None,
    calib_data: Annotated[Path | None, typer.Option("--calib-data", help="wanda, sparsegpt: calibration data "
                                                    "(language-model windows: data text --pack); structured: "
                                                    "what ranks units and heads")] = None,
    calib_batches: Annotated[int | None, typer.Option("--calib-batches", help="wanda, sparsegpt: batches "
                                                      "(default 16)")] = None,
    plan: PlanFile = None,
    *, shared,
) -> None:
    """Remove weights (magnitude; wanda and sparsegpt on data), whole units (structured), or reach the ratio
    over steps (gradual)."""
    if plan is not None:
        return run_plan("prune", model, plan, shared, shared.data, given(ratio=ratio, scope=scope,
                                                                          granularity=granularity, steps=steps))
    if ratio is None:
        raise UsageError("prune needs --ratio R (or --plan PLAN)")
    values = given(ratio=ratio, scope=scope, granularity=granularity, steps=steps, calib_batches=calib_batches,
                   include=shared.include, exclude=shared.exclude) | finetune_values(shared)
    technique("prune", method, model, shared, values, files={"data": shared.data, "calib_data": calib_data},
              gzip_output=True)


@command(SELECT_OPTIONS, TRANSFORM_OPTIONS)
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
                                                   "(default: per layer, the order with the lower GPTQ loss)")] = None,
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
    observer: Annotated[str | None, typer.Option("--observer", help="static: minmax | percentile "
                                                 "(default minmax)")] = None,
    smoothing: Annotated[str | None, typer.Option("--smoothing", help="dynamic: auto (with --calib-data, move "
                                                  "activation outliers into the weights where that measures "
                                                  "better, per layer) | off (default auto)")] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="weight-only: also the Embedding tables")] = False,
    plan: PlanFile = None,
    *, shared,
) -> None:
    """int8 dynamic / static / QAT on plain int8 tensors, or int8/int4 weight-only (round to nearest, or GPTQ)."""
    from modelzip_cli import int8

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


@command(SELECT_OPTIONS, FINETUNE_OPTIONS, TRANSFORM_OPTIONS)
def lowrank(
    model: Input,
    rank_ratio: Annotated[float | None, typer.Option("--rank-ratio", help="r = R · min(out, in)")] = None,
    energy: Annotated[float | None, typer.Option("--energy", help="smallest r keeping E of Σs²")] = None,
    params_ratio: Annotated[float | None, typer.Option("--params-ratio",
                                                      help="whole-model parameter budget, shared by energy")] = None,
    svd: Annotated[str | None, typer.Option("--svd", help="auto | exact | randomized (default auto)")] = None,
    plan: PlanFile = None,
    *, shared,
) -> None:
    """Factorize Linear layers by truncated SVD into two smaller Linears."""
    if plan is not None:
        return run_plan("lowrank", model, plan, shared, shared.data,
                        given(rank_ratio=rank_ratio, energy=energy, params_ratio=params_ratio, svd=svd))
    values = given(rank_ratio=rank_ratio, energy=energy, params_ratio=params_ratio, svd=svd, include=shared.include,
                   exclude=shared.exclude) | finetune_values(shared)
    technique("lowrank", None, model, shared, values, files={"data": shared.data})


@command(TRANSFORM_OPTIONS)
def distill(
    teacher: Input,
    data: Annotated[Path, typer.Option("--data", help="training data")],
    student: Annotated[str | None, typer.Option("--student", help="zoo:NAME / pkg.mod:fn, a checkpoint or Hugging "
                                                "Face directory (hf:DIR) to start from")] = None,
    student_kwargs: Annotated[str | None, typer.Option("--student-kwargs", help="JSON kwargs of the student")] = None,
    student_config: Annotated[Path | None, typer.Option("--student-config", help="a Hugging Face config.json: a "
                                                        "fresh student of the teacher's task")] = None,
    val_data: Annotated[Path | None, typer.Option("--val-data", help="validation data (early stopping)")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="training epochs (default 20)")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="softmax temperature T "
                                                      "(default 4)")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="the teacher loss: kd (class logits) | cosine | mse "
                                             "(embeddings; no labels needed) (default kd)")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="weight of the teacher loss against cross-entropy "
                                                "on the labels (default 0.7 with kd, else 1)")] = None,
    hidden_weight: HiddenWeight = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW, cosine schedule (default 1e-2)")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="batch size (default 64)")] = None,
    patience: Annotated[int | None, typer.Option("--patience", help="with --val-data: early stopping")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="also train the student on labels alone")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="write the training curves as a PNG")] = None,
    *, shared,
) -> None:
    """Train a small student to match the teacher: alpha·(T²·KL, or a cosine / MSE feature loss) + (1−alpha)·CE."""
    from modelzip_cli.techniques.distill import hf_student_dir, is_checkpoint_path

    student, kwargs = student_from(student, parse_json_object(student_kwargs, "--student-kwargs"), student_config)
    values = given(student=student, student_kwargs=kwargs,
                   epochs=epochs, temperature=temperature, loss=loss, alpha=alpha, hidden_weight=hidden_weight,
                   lr=lr, batch_size=batch_size,
                   patience=patience, baseline=baseline or None)
    student_path = (hf_student_dir(student),) if is_checkpoint_path(student) or student != "hf:" and \
        hf_student_dir(student).is_dir() else ()
    if plot is not None:  # the output-path policy, as for the checkpoint and report (checked in the runner)
        from modelzip_cli.files import Target, check_distinct, check_targets
        from modelzip_cli.plot import require_matplotlib
        from modelzip_cli.runner import default_output, default_report

        require_matplotlib()
        output = shared.output or default_output(teacher, "distill")
        check_distinct({"output": output, "report": shared.report or default_report(output), "plot": plot})
        check_targets([Target("plot", plot, (".png",))], force=shared.force,
                      inputs=[teacher, data, val_data, shared.eval_data, *student_path])
    report = technique("distill", None, teacher, shared, values, files={"data": data, "val_data": val_data},
                       extra_inputs=student_path, trusted_refs=frozenset({student}))
    if plot is not None and report is not None:  # None: a torchrun rank other than 0
        from modelzip_cli.plot import plot_history

        plot_history(report.steps[0].after, plot)


def student_from(student: str | None, kwargs: dict | None, config: Path | None) -> tuple[str, dict | None]:
    """--student, or --student-config (a Hugging Face config.json, read here) as `hf:` with that config."""
    if (student is None) == (config is None):
        raise UsageError("distill needs exactly one of --student and --student-config")
    if config is None:
        return student, kwargs
    import json

    from modelzip_cli.limits import parse, read_text

    if kwargs:
        raise UsageError("--student-kwargs and --student-config do not go together", hint="put it all in the config")
    path = config / "config.json" if config.is_dir() else config
    try:
        cfg = parse(json.loads, read_text(path, "--student-config"), f"--student-config {config}")
    except ValueError as exc:
        raise InputError(f"--student-config {config} is not a readable JSON file ({first_line(exc, 120)})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise InputError(f"--student-config {config} is not a transformers config (no model_type)")
    return "hf:", {"config": cfg}


@command(TRANSFORM_OPTIONS)
def chain(
    model: Input,
    recipe: Annotated[Path, typer.Option("--recipe", help="TOML or JSON recipe: \\[\\[steps]] with op and options")],
    data: Annotated[Path | None, typer.Option("--data", help="training data for steps that train or calibrate")] = None,
    keep_intermediate: Annotated[Path | None, typer.Option("--keep-intermediate",
                                                           help="also write each step's checkpoint here")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list each step's modules; change nothing")] = False,
    *, shared,
) -> None:
    """Run a recipe of steps (distill, prune, lowrank, quantize) in one process, with one report."""
    from modelzip_cli.chain import check_data_needs_all, dry_run_report, parse_recipe, run_chain

    steps = parse_recipe(recipe)  # the whole recipe is checked before any weight is loaded
    check_data_needs_all(steps, data)
    opts = common_options(shared)
    if dry_run:
        emit(dry_run_report(model, steps, opts, data=data), shared)
        return
    emit(run_chain(model, steps, opts, data=data, recipe=recipe, progress=progress_factory(shared.quiet),
                   keep_intermediate=keep_intermediate), shared)


@command(SELECT_OPTIONS, MODEL_OPTIONS, _options(report=(ReportPath, None), force=(Force, False), seed=(Seed, 0)),
         RUN_OPTIONS)
def analyze(
    model: Input,
    data: Annotated[Path, typer.Option("--data", help="data to score on (unlabelled is enough; with labels and "
                                       "--budget-accuracy-drop, accuracy) and to calibrate int8 on")],
    techniques: Annotated[str, typer.Option("--techniques", help="candidates per layer: int8, int4, prune:R, "
                                            "lowrank:R")] = "int8,int4,prune:0.3,prune:0.5,lowrank:0.5",
    samples: Annotated[int | None, typer.Option("--samples", help="samples each candidate is scored on (default "
                                                "32, or all up to 2048 with labels)")] = None,
    budget_fidelity: Annotated[float | None, typer.Option("--budget-fidelity", help="plan: keep the mean cosine "
                                                          "to the float model at least this")] = None,
    budget_accuracy_drop: Annotated[float | None, typer.Option("--budget-accuracy-drop", help="plan: lose at most "
                                                               "this many accuracy points (labelled data)")] = None,
    plan_out: Annotated[Path | None, typer.Option("--plan-out", help="write the plan (a chain recipe, .toml)")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a heat-map PNG of the losses")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="held-out data a plan's budget is judged on "
                                                   "(default: a seeded half of --data, the other half "
                                                   "choosing the plan)")] = None,
    *, shared,
) -> None:
    """Per-layer sensitivity to each candidate technique; with a budget, a plan that `chain` runs."""
    from modelzip_cli.analyze import AnalyzeOptions, run_analyze

    if plot is not None:
        from modelzip_cli.plot import require_matplotlib

        require_matplotlib()
    opts = AnalyzeOptions(data=data, techniques=techniques, include=shared.include, exclude=shared.exclude,
                          samples=samples, budget_fidelity=budget_fidelity,
                          budget_accuracy_drop=budget_accuracy_drop, plan_out=plan_out, report=shared.report,
                          plot=plot, force=shared.force, eval_data=eval_data)
    emit(run_analyze(model, opts, common_options(shared), progress_factory(shared.quiet)), shared)


@command(MODEL_OPTIONS, RUN_OPTIONS)
def compare(
    models: Annotated[list[Path], typer.Argument(help="two or more checkpoints; the first is the reference")],
    data: Annotated[Path, typer.Option("--data", help="labelled data file")],
    batch_size: LatencyBatch = None,
    *, shared,
) -> None:
    """Size, parameters, accuracy, latency and agreement with the first model, side by side."""
    from modelzip_cli.compare import compare_checkpoints

    check_latency_batch(batch_size)
    emit(compare_checkpoints(models, data, common_options(shared), batch_n=batch_size), shared)


@command(MODEL_OPTIONS, OUTPUT_OPTIONS, RUN_OPTIONS)
def export(
    model: Input,
    fmt: Annotated[str, typer.Option("--format", help="onnx (ONNX Runtime) | pt2 (torch.export program) | gguf "
                                     "(llama.cpp; Llama, Mistral, Qwen2)")] = "onnx",
    gguf_type: Annotated[str | None, typer.Option("--gguf-type", help="gguf: f16 | q8_0 | q4_0 | q4_1 | auto (f16 "
                                                  "float, q8_0 int8, q4_1 int4: mapped without rounding again)")
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
    """An ONNX graph, a .pt2 program or a GGUF file of the model, verified by running it against the PyTorch model."""
    from modelzip_cli.export import ExportConfig, export_checkpoint

    check_latency_batch(batch_size)
    foreign = ([("--gguf-type", gguf_type), ("--tokenizer", tokenizer)] if fmt != "gguf" else
               [("--int8", int8_way), ("--opset", opset), ("--calib-data", calib_data)])
    for flag, value in foreign:
        if value is not None:
            raise UsageError(f"{flag} does not apply to --format {fmt}", hint=f"drop {flag}")
    cfg = ExportConfig.parse(given(format=fmt, opset=opset, dynamic_batch=dynamic_batch, int8=int8_way,
                                   gguf_type=gguf_type))
    emit(export_checkpoint(model, cfg, common_options(shared), calib_data=calib_data, batch_n=batch_size,
                           tokenizer=tokenizer), shared)


data_app = typer.Typer(no_args_is_help=True, context_settings=HELP_OPTIONS,
                       help="Make data files: token ids from text, tensors from images.")
app.add_typer(data_app, name="data")
DataOutput = Annotated[Path, typer.Option("--output", "-o", help="the data file (.safetensors)")]
Split = Annotated[float | None, typer.Option("--split", help="training fraction: writes OUT.train and OUT.test "
                                             "(stratified by class for images)")]


def _written(written, quiet: bool) -> None:
    if not quiet:
        for path, n in zip(written.paths, written.samples, strict=True):
            extra = f", {len(written.classes)} classes" if written.classes else ""
            _console().print(f"{path}: {n:,} samples of shape {written.shape}{extra}")


@data_app.command("text")
def data_text(
    corpus: Annotated[Path, typer.Argument(help="a UTF-8 text file, one sample per line", show_default=False)],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="the model directory holding the tokenizer")],
    output: DataOutput,
    max_length: Annotated[int, typer.Option("--max-length", help="tokens per sample (padded or cut)")] = 128,
    pack: Annotated[bool, typer.Option("--pack", help="language-model windows: documents (the file, each file "
                                       "of a folder, or each line of a .jsonl) joined with EOS and cut into "
                                       "--max-length windows; --split divides documents")] = False,
    split: Split = None, seed: Seed = 0, force: Force = False, quiet: Quiet = False,
) -> None:
    """Token ids and attention masks from text, with a model's own tokenizer (offline)."""
    from modelzip_cli import datamake

    make = datamake.packed_text if pack else datamake.text
    _written(make(corpus, tokenizer, output, max_length=max_length, split=split, seed=seed, force=force), quiet)


@data_app.command("images")
def data_images(
    folder: Annotated[Path, typer.Argument(help="one subfolder of images per class", show_default=False)],
    output: DataOutput,
    size: Annotated[int, typer.Option("--size", help="side of the square each image is resized to")] = 224,
    mean: Annotated[str | None, typer.Option("--mean", help="R,G,B means (default ImageNet's)")] = None,
    std: Annotated[str | None, typer.Option("--std", help="R,G,B standard deviations (default ImageNet's)")] = None,
    split: Split = None, seed: Seed = 0, force: Force = False, quiet: Quiet = False,
) -> None:
    """Normalised image tensors and class labels from an image folder (ImageFolder layout)."""
    from modelzip_cli import datamake

    def triple(text: str | None, default: tuple, flag: str) -> tuple:
        if text is None:
            return default
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise UsageError(f"{flag} takes three numbers, e.g. {','.join(map(str, default))}") from None

    _written(datamake.images(folder, output, size=size, mean=triple(mean, datamake.IMAGENET_MEAN, "--mean"),
                             std=triple(std, datamake.IMAGENET_STD, "--std"), split=split, seed=seed, force=force),
             quiet)


# --------------------------------------------------------------------------------------------------
# Entry point: the one place exceptions become exit codes.


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so every `finally` on the way out runs
    (temporaries are removed) before one line says so. A second signal, during that cleanup or after it,
    is ignored by the same handler: never switched to SIG_IGN from inside it (a signal already pending then
    makes Python print "Signal 15 ignored due to race condition" with a traceback), and never back to the
    default action while an interrupted process is on its way out (a late SIGTERM would kill it, exit -15).
    An `Interrupted` raised inside a destructor, where Python can only print it, is raised again instead."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    first: list[int] = []

    def handler(signum, frame):
        if first:  # the run is already stopping
            return
        first.append(signum)
        raise Interrupted(signum)

    def unraisable(info):  # raised where nothing can catch it (a destructor): no traceback; send it again a
        if isinstance(info.exc_value, Interrupted) and first:  # moment later, to arrive outside the destructor
            threading.Timer(0.01, os.kill, args=(os.getpid(), first.pop())).start()
        else:
            previous_hook(info)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if first and h == signal.SIG_DFL else h)


def _one_line(text: str) -> str:
    """Control characters a file put into a message (a forged name, say) are escaped: one line stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _route_warnings(fallback):
    """`CodeRanWarning` is one line on stderr; any other warning goes where it went before."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CodeRanWarning):
            print(f"modelzip: warning: {_one_line(str(message))}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show




@functools.cache
def _click_command():
    """The Click command Typer builds from `app`, built once: reading every command's signature costs more
    than a small command's work, and tests and workers call `run` many times in one process."""
    return typer.main.get_command(app)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; exceptions become one line on stderr (README, "Exit codes")."""
    from modelzip_cli import distributed

    if distributed.launched():  # under torchrun every rank runs the command; one of them says how it ended
        return distributed.run_on_every_rank(lambda: _outcome(argv))
    code, line = _outcome(argv)
    if line:
        print(line, file=sys.stderr)
    return code


def _outcome(argv: list[str] | None) -> tuple[int, str | None]:
    """The exit code and the one error line (not yet printed) of one run of the app."""
    import warnings

    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    debug = os.environ.get("MODELZIP_DEBUG") == "1"
    with warnings.catch_warnings():  # restores the filters and showwarning on the way out
        # Libraries' warnings (torch.ao's deprecations, torch's notes on meta tensors) are ours to handle, not
        # the user's: they would break the one-line output. MODELZIP_DEBUG=1 shows them.
        if not debug:
            warnings.simplefilter("ignore")
        warnings.simplefilter("always", CodeRanWarning)
        warnings.showwarning = _route_warnings(warnings.showwarning)
        fail = functools.partial(_failure, as_json="--json" in args)
        try:
            with _signals_interrupt():
                code = _click_command().main(args=args, prog_name="modelzip", standalone_mode=False)
            return (code if isinstance(code, int) else 0), None
        except SystemExit as exc:
            return (exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)), None
        except Interrupted as exc:
            return fail(exit_code_for(exc), "interrupted", kind=None)
        except (KeyboardInterrupt, typer.Abort):  # outside the main thread; end of input at a prompt
            return fail(130, "interrupted", kind=None)
        except typer.TyperException as exc:  # a parse error: one line, as every other error
            ctx = getattr(exc, "ctx", None)
            return fail(getattr(exc, "exit_code", 2), " ".join(exc.format_message().split()),
                        f"see '{ctx.command_path} --help'" if ctx is not None else None)
        except QualityGateFailed as exc:  # under --json the report on stdout already says why (its gate)
            if debug:
                raise
            return exit_code_for(exc), f"modelzip: error: {_one_line(exc.line())}"
        except ModelzipError as exc:
            if debug:
                raise
            return fail(exit_code_for(exc), exc.message, exc.hint)
        except Exception as exc:  # a condition of the machine (a full disk, …), else a bug: one line
            if debug:
                raise
            condition = os_condition(exc)
            if condition is not None:
                return fail(exit_code_for(exc), condition.message, condition.hint)
            detail = _one_line(str(exc).splitlines()[0]) if str(exc).strip() else ""
            return fail(INTERNAL_ERROR, f"{type(exc).__name__}: {detail}", "this is a bug; rerun with "
                        "MODELZIP_DEBUG=1 for the traceback and report it", kind="internal error")


def _failure(code: int, error: str, hint: str | None = None, *, kind: str | None = "error",
             as_json: bool = False) -> tuple[int, str]:
    """The exit code and the one line for stderr; with --json also one JSON object on stdout (error, hint,
    exit_code), so that a script reading stdout learns why as well as that."""
    if as_json:
        sys.stdout.write(json.dumps({"error": error, "hint": hint, "exit_code": code}) + "\n")
        sys.stdout.flush()
    text = error + (f" ({hint})" if hint else "")
    return code, f"modelzip: {kind}: {_one_line(text)}" if kind else f"modelzip: {text}"


def main() -> None:
    sys.exit(run())
