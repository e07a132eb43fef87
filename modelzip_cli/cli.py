"""The Typer app: thin commands that parse options, call one library function, and render the result.

Nothing heavy is imported at module level: `modelzip --help` must not import torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from modelzip_cli import __version__
from modelzip_cli.errors import EXIT_INTERNAL, ModelzipError, UsageError, exit_code_for

if TYPE_CHECKING:
    from modelzip_cli.report import Report
    from modelzip_cli.runner import CommonOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make PyTorch models smaller and faster: distill, prune, quantize, lowrank, chain.")

# --------------------------------------------------------------------------------------------------
# Options shared by commands (CONTRACT.md, "Options that every transforming command takes")

Input = Annotated[Path, typer.Argument(help="checkpoint (.safetensors, .pt, .pth, .bin)", show_default=False)]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="default: INPUT stem + .COMMAND + suffix")]
ReportPath = Annotated[Path | None, typer.Option("--report", help="default: the output path with .json")]
Force = Annotated[bool, typer.Option("--force", help="overwrite an existing output")]
Seed = Annotated[int, typer.Option("--seed", help="same inputs and seed → same output tensors")]
Arch = Annotated[str | None, typer.Option("--arch", help="architecture of a raw state dict: zoo:NAME or pkg.mod:fn")]
ArchKwargs = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON object of architecture kwargs")]
TrustCode = Annotated[bool, typer.Option("--trust-code", help="allow unpickling a full nn.Module (runs code)")]
InputShape = Annotated[str | None, typer.Option("--input-shape", help="example input shape, e.g. 1,64")]
InputDtype = Annotated[str | None, typer.Option("--input-dtype", help="float or long (token ids)")]
EvalData = Annotated[Path | None, typer.Option("--eval-data", help="measure accuracy/latency before and after")]
MaxDrop = Annotated[float | None, typer.Option("--max-accuracy-drop",
                                                help="with --eval-data: exit 1 above this many points")]
Threads = Annotated[int | None, typer.Option("--threads", help="threads for latency (default: all usable cores)")]
Json = Annotated[bool, typer.Option("--json", help="print the report JSON to stdout")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no summary or progress on stderr")]
Include = Annotated[list[str] | None, typer.Option("--include", help="module name glob to select (repeatable)")]
Exclude = Annotated[list[str] | None, typer.Option("--exclude", help="module name glob to skip (repeatable)")]


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


def parse_shape(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        shape = [int(s) for s in text.replace("x", ",").split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers", hint="e.g. --input-shape 1,64") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers", hint="e.g. --input-shape 1,64")
    return shape


def parse_dtype(text: str | None) -> str | None:
    if text is not None and text not in {"float", "long"}:
        raise UsageError(f"--input-dtype must be float or long, got {text!r}")
    return text


def common_options(*, output=None, report=None, force=False, seed=0, arch=None, arch_kwargs=None,
                   trust_code=False, input_shape=None, input_dtype=None, eval_data=None,
                   max_accuracy_drop=None, threads=None) -> CommonOptions:
    from modelzip_cli.runner import CommonOptions

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be ≥ 1, got {threads}")
    return CommonOptions(output=output, report=report, force=force, seed=seed, arch=arch,
                         arch_kwargs=parse_json_object(arch_kwargs, "--arch-kwargs"), trust_code=trust_code,
                         input_shape=parse_shape(input_shape), input_dtype=parse_dtype(input_dtype),
                         eval_data=eval_data, max_accuracy_drop=max_accuracy_drop, threads=threads)


class _RichBar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, steps: int = 1, **fields: Any) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.task, advance=steps, status=text)


def progress_factory(quiet: bool):
    """A Context.progress backed by a rich progress bar on stderr (silent with --quiet)."""
    from modelzip_cli.context import null_progress

    if quiet:
        return null_progress

    @contextlib.contextmanager
    def factory(description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                      console=_console(), transient=False) as progress:
            yield _RichBar(progress, progress.add_task(description, total=total, status=""))

    return factory


def emit(report: Report, *, as_json: bool, quiet: bool) -> None:
    """Summary to stderr, JSON to stdout; exit 1 when a quality gate failed (the output is written)."""
    if not quiet:
        from modelzip_cli.report import render

        render(report, _console())
    if as_json:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    if report.gate is not None and not report.gate["passed"]:
        from modelzip_cli.errors import QualityGateFailed

        raise QualityGateFailed(f"quality gate failed: accuracy dropped {report.gate['accuracy_drop']:.2f} points "
                                f"(max {report.gate['max_accuracy_drop']}); output and report were written")


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"modelzip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                                 help="print the version and exit")] = False) -> None:
    """modelzip reads a checkpoint, writes a new checkpoint plus a JSON report. Exit codes: 0 ok,
    1 quality gate failed, 2 bad usage or input (nothing written), 3 internal error."""


# --------------------------------------------------------------------------------------------------
# Commands


@app.command()
def inspect(model: Input, trust_code: TrustCode = False, sha256: Annotated[bool, typer.Option(
        "--sha256", help="also hash the whole file (reads all of it)")] = False,
        as_json: Json = False, quiet: Quiet = False) -> None:
    """Parameters, bytes, format, edit history and a per-layer table — from the header alone."""
    from modelzip_cli.inspection import inspect_checkpoint

    emit(inspect_checkpoint(model, trust_code=trust_code, hash_file=sha256), as_json=as_json, quiet=quiet)


@app.command("eval")
def eval_(model: Input, data: Annotated[Path, typer.Option("--data", help="labelled data file")],
          batch_size: Annotated[int, typer.Option("--batch-size", help="N for the batch-N latency")] = 256,
          threads: Threads = None, arch: Arch = None, arch_kwargs: ArchKwargs = None, trust_code: TrustCode = False,
          input_shape: InputShape = None, input_dtype: InputDtype = None,
          as_json: Json = False, quiet: Quiet = False) -> None:
    """Accuracy, loss, median latency at batch 1 and batch N, size."""
    from modelzip_cli.evaluate import evaluate_checkpoint

    if batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {batch_size}")
    opts = common_options(arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code, input_shape=input_shape,
                          input_dtype=input_dtype, threads=threads)
    emit(evaluate_checkpoint(model, data, opts, batch_n=batch_size), as_json=as_json, quiet=quiet)


def transform(command: str, model: Path, opts: CommonOptions, cfg, *, as_json: bool, quiet: bool,
              data: Path | None = None, val_data: Path | None = None, calib_data: Path | None = None,
              gzip_output: bool = False, require_targets: bool = True, extra_inputs: tuple[Path, ...] = (),
              after: Callable[[Report], None] | None = None) -> None:
    """The body every technique command shares: run it through the runner, then render the report."""
    from modelzip_cli.context import Context
    from modelzip_cli.runner import apply_technique, check_applicable, load_step_data, run_transform

    def prepare(loaded, ctx) -> None:
        check_applicable(command, loaded)
        load_step_data(loaded, ctx, data=data, val_data=val_data, calib_data=calib_data,
                       require_targets=require_targets)

    report = run_transform(command, model, opts, lambda loaded, ctx: [apply_technique(command, cfg, loaded, ctx)],
                           context=Context(progress=progress_factory(quiet)), prepare=prepare,
                           gzip_output=gzip_output, extra_inputs=list(extra_inputs))
    if after is not None:
        after(report)
    emit(report, as_json=as_json, quiet=quiet)


Data = Annotated[Path | None, typer.Option("--data", help="training data: fine-tune after pruning")]
FinetuneEpochs = Annotated[int, typer.Option("--finetune-epochs", help="with --data: epochs of fine-tuning")]
Lr = Annotated[float, typer.Option("--lr", help="fine-tuning learning rate")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="training batch size")]


@app.command()
def prune(
    model: Input,
    ratio: Annotated[float, typer.Option("--ratio", help="fraction to remove, in [0, 1)")],
    method: Annotated[str, typer.Option("--method", help="magnitude | structured | gradual")] = "magnitude",
    scope: Annotated[str, typer.Option("--scope", help="magnitude: global (one threshold) | layer")] = "global",
    granularity: Annotated[str, typer.Option("--granularity",
                                             help="gradual: unstructured (magnitude) | structured")] = "unstructured",
    steps: Annotated[int, typer.Option("--steps", help="gradual: pruning steps on the cubic schedule")] = 5,
    data: Data = None, finetune_epochs: FinetuneEpochs = 3, lr: Lr = 5e-4, batch_size: BatchSize = 64,
    include: Include = None, exclude: Exclude = None,
    output: Output = None, report: ReportPath = None, force: Force = False, seed: Seed = 0, arch: Arch = None,
    arch_kwargs: ArchKwargs = None, trust_code: TrustCode = False, input_shape: InputShape = None,
    input_dtype: InputDtype = None, eval_data: EvalData = None, max_accuracy_drop: MaxDrop = None,
    threads: Threads = None, as_json: Json = False, quiet: Quiet = False,
) -> None:
    """Remove weights (magnitude), whole units (structured), or reach the ratio over steps (gradual)."""
    from modelzip_cli.techniques.prune import PruneConfig

    cfg = PruneConfig(ratio=ratio, method=method, scope=scope, granularity=granularity, steps=steps,
                      finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, include=include,
                      exclude=exclude).validate()
    opts = common_options(output=output, report=report, force=force, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          trust_code=trust_code, input_shape=input_shape, input_dtype=input_dtype,
                          eval_data=eval_data, max_accuracy_drop=max_accuracy_drop, threads=threads)
    transform("prune", model, opts, cfg, as_json=as_json, quiet=quiet, data=data, gzip_output=True)


@app.command()
def quantize(
    model: Input,
    method: Annotated[str, typer.Option("--method", help="dynamic | static | qat | weight-only")],
    bits: Annotated[int, typer.Option("--bits", help="weight-only: 8 or 4 (int4 packed two per byte)")] = 8,
    group_size: Annotated[int, typer.Option("--group-size",
                                            help="weight-only: input channels per scale (0 = per channel)")] = 128,
    calib_data: Annotated[Path | None, typer.Option("--calib-data", help="static: calibration data")] = None,
    calib_batches: Annotated[int, typer.Option("--calib-batches", help="static: batches to calibrate on")] = 100,
    data: Annotated[Path | None, typer.Option("--data", help="qat: training data")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="qat: fine-tuning epochs")] = 3,
    lr: Annotated[float, typer.Option("--lr", help="qat: learning rate")] = 1e-4, batch_size: BatchSize = 64,
    include: Include = None, exclude: Exclude = None,
    output: Output = None, report: ReportPath = None, force: Force = False, seed: Seed = 0, arch: Arch = None,
    arch_kwargs: ArchKwargs = None, trust_code: TrustCode = False, input_shape: InputShape = None,
    input_dtype: InputDtype = None, eval_data: EvalData = None, max_accuracy_drop: MaxDrop = None,
    threads: Threads = None, as_json: Json = False, quiet: Quiet = False,
) -> None:
    """int8 dynamic / static / QAT on torch.ao's x86 kernels, or int8/int4 weight-only."""
    from modelzip_cli.techniques.quantize import QuantizeConfig

    cfg = QuantizeConfig(method=method, bits=bits, group_size=group_size, calib_batches=calib_batches, epochs=epochs,
                         lr=lr, batch_size=batch_size, include=include, exclude=exclude).validate()
    if "calib_data" in cfg.required_data() and calib_data is None:
        raise UsageError(f"--method {method} needs --calib-data", hint="pass --calib-data FILE (e.g. training data)")
    if "data" in cfg.required_data() and data is None:
        raise UsageError(f"--method {method} needs --data to fine-tune on", hint="pass --data FILE")
    opts = common_options(output=output, report=report, force=force, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          trust_code=trust_code, input_shape=input_shape, input_dtype=input_dtype,
                          eval_data=eval_data, max_accuracy_drop=max_accuracy_drop, threads=threads)
    transform("quantize", model, opts, cfg, as_json=as_json, quiet=quiet, data=data, calib_data=calib_data)


@app.command()
def lowrank(
    model: Input,
    rank_ratio: Annotated[float | None, typer.Option("--rank-ratio", help="r = R · min(out, in)")] = None,
    energy: Annotated[float | None, typer.Option("--energy", help="smallest r keeping E of Σs²")] = None,
    params_ratio: Annotated[float | None, typer.Option("--params-ratio",
                                                      help="whole-model parameter budget, shared by energy")] = None,
    svd: Annotated[str, typer.Option("--svd", help="auto | exact | randomized")] = "auto",
    data: Data = None, finetune_epochs: FinetuneEpochs = 3, lr: Lr = 5e-4, batch_size: BatchSize = 64,
    include: Include = None, exclude: Exclude = None,
    output: Output = None, report: ReportPath = None, force: Force = False, seed: Seed = 0, arch: Arch = None,
    arch_kwargs: ArchKwargs = None, trust_code: TrustCode = False, input_shape: InputShape = None,
    input_dtype: InputDtype = None, eval_data: EvalData = None, max_accuracy_drop: MaxDrop = None,
    threads: Threads = None, as_json: Json = False, quiet: Quiet = False,
) -> None:
    """Factorize Linear layers by truncated SVD into two smaller Linears."""
    from modelzip_cli.techniques.lowrank import LowRankConfig

    cfg = LowRankConfig(rank_ratio=rank_ratio, energy=energy, params_ratio=params_ratio, svd=svd,
                        finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, include=include,
                        exclude=exclude).validate()
    opts = common_options(output=output, report=report, force=force, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          trust_code=trust_code, input_shape=input_shape, input_dtype=input_dtype,
                          eval_data=eval_data, max_accuracy_drop=max_accuracy_drop, threads=threads)
    transform("lowrank", model, opts, cfg, as_json=as_json, quiet=quiet, data=data)


@app.command()
def distill(
    teacher: Input,
    student: Annotated[str, typer.Option("--student", help="zoo:NAME / pkg.mod:fn, or a checkpoint to start from")],
    data: Annotated[Path, typer.Option("--data", help="training data")],
    student_kwargs: Annotated[str | None, typer.Option("--student-kwargs", help="JSON kwargs of the student")] = None,
    val_data: Annotated[Path | None, typer.Option("--val-data", help="validation data (early stopping)")] = None,
    epochs: Annotated[int, typer.Option("--epochs")] = 20,
    temperature: Annotated[float, typer.Option("--temperature", help="softmax temperature T")] = 4.0,
    alpha: Annotated[float, typer.Option("--alpha", help="weight of the soft (teacher) loss")] = 0.7,
    lr: Annotated[float, typer.Option("--lr", help="AdamW, cosine schedule")] = 1e-2, batch_size: BatchSize = 64,
    patience: Annotated[int | None, typer.Option("--patience", help="with --val-data: early stopping")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="also train the student on labels alone")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="write the training curves as a PNG")] = None,
    output: Output = None, report: ReportPath = None, force: Force = False, seed: Seed = 0, arch: Arch = None,
    arch_kwargs: ArchKwargs = None, trust_code: TrustCode = False, input_shape: InputShape = None,
    input_dtype: InputDtype = None, eval_data: EvalData = None, max_accuracy_drop: MaxDrop = None,
    threads: Threads = None, as_json: Json = False, quiet: Quiet = False,
) -> None:
    """Train a small student to match the teacher: alpha·T²·KL + (1−alpha)·CE."""
    from modelzip_cli.techniques.distill import DistillConfig, is_checkpoint_path

    cfg = DistillConfig(student=student, student_kwargs=parse_json_object(student_kwargs, "--student-kwargs"),
                        epochs=epochs, temperature=temperature, alpha=alpha, lr=lr, batch_size=batch_size,
                        patience=patience, baseline=baseline).validate()
    if patience is not None and val_data is None:
        raise UsageError("--patience needs --val-data to stop on", hint="pass --val-data FILE")
    if plot is not None:
        from modelzip_cli.checkpoint import check_output
        from modelzip_cli.plot import plot_history, require_matplotlib

        require_matplotlib()
        check_output(plot, inputs=[teacher], force=force, suffixes=(".png",))
    opts = common_options(output=output, report=report, force=force, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          trust_code=trust_code, input_shape=input_shape, input_dtype=input_dtype,
                          eval_data=eval_data, max_accuracy_drop=max_accuracy_drop, threads=threads)
    student_path = (Path(student),) if is_checkpoint_path(student) else ()
    transform("distill", teacher, opts, cfg, as_json=as_json, quiet=quiet, data=data, val_data=val_data,
              require_targets=cfg.needs_targets(), extra_inputs=student_path,
              after=(lambda rep: plot_history(rep.steps[0].after, plot)) if plot is not None else None)


@app.command()
def chain(
    model: Input,
    recipe: Annotated[Path, typer.Option("--recipe", help="TOML or JSON recipe: [[steps]] with op and options")],
    data: Annotated[Path | None, typer.Option("--data", help="training data for steps that train or calibrate")] = None,
    keep_intermediate: Annotated[Path | None, typer.Option("--keep-intermediate",
                                                           help="also write each step's checkpoint here")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list each step's modules; change nothing")] = False,
    output: Output = None, report: ReportPath = None, force: Force = False, seed: Seed = 0, arch: Arch = None,
    arch_kwargs: ArchKwargs = None, trust_code: TrustCode = False, input_shape: InputShape = None,
    input_dtype: InputDtype = None, eval_data: EvalData = None, max_accuracy_drop: MaxDrop = None,
    threads: Threads = None, as_json: Json = False, quiet: Quiet = False,
) -> None:
    """Run a recipe of steps (distill, prune, lowrank, quantize) in one process, with one report."""
    from modelzip_cli.chain import check_data_needs, parse_recipe

    steps = parse_recipe(recipe)  # the whole recipe is checked before any weight is loaded
    check_data_needs(steps, data)
    opts = common_options(output=output, report=report, force=force, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          trust_code=trust_code, input_shape=input_shape, input_dtype=input_dtype,
                          eval_data=eval_data, max_accuracy_drop=max_accuracy_drop, threads=threads)
    if dry_run:
        from modelzip_cli.chain import dry_run_report

        emit(dry_run_report(model, steps, opts), as_json=as_json, quiet=quiet)
        return
    from modelzip_cli.chain import run_chain

    rep = run_chain(model, steps, opts, data=data, progress=progress_factory(quiet),
                    keep_intermediate=keep_intermediate)
    emit(rep, as_json=as_json, quiet=quiet)


@app.command()
def compare(
    models: Annotated[list[Path], typer.Argument(help="two or more checkpoints; the first is the reference")],
    data: Annotated[Path, typer.Option("--data", help="labelled data file")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="N for the batch-N latency")] = 256,
    threads: Threads = None, arch: Arch = None, arch_kwargs: ArchKwargs = None, trust_code: TrustCode = False,
    as_json: Json = False, quiet: Quiet = False,
) -> None:
    """Size, parameters, accuracy, latency and agreement with the first model, side by side."""
    from modelzip_cli.compare import compare_checkpoints

    if batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {batch_size}")
    opts = common_options(arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code, threads=threads)
    emit(compare_checkpoints(models, data, opts, batch_n=batch_size), as_json=as_json, quiet=quiet)


# --------------------------------------------------------------------------------------------------
# Entry point: the one place exceptions become exit codes.


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; exceptions become one line on stderr (CONTRACT.md)."""
    import warnings

    # torch.ao's quantized ops warn of their deprecation on every use; that is ours to handle, not the user's.
    warnings.filterwarnings("ignore", message=r"(?s).*(quantiz|torch\.ao).*deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        app(args=argv, prog_name="modelzip")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("modelzip: interrupted", file=sys.stderr)
        return 130
    except ModelzipError as exc:
        if os.environ.get("MODELZIP_DEBUG") == "1":
            raise
        print(f"modelzip: error: {exc.line()}", file=sys.stderr)
        return exit_code_for(exc)
    except Exception as exc:  # a bug: say so in one line
        if os.environ.get("MODELZIP_DEBUG") == "1":
            raise
        detail = str(exc).splitlines()[0] if str(exc) else ""
        print(f"modelzip: internal error: {type(exc).__name__}: {detail} (this is a bug; rerun with "
              f"MODELZIP_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL
    return 0


def main() -> None:
    sys.exit(run())
