"""What every command shares: its options (declared once each), their parsing, and how a command runs a
technique and renders its report. The commands themselves are one file each in cli/commands/.

Nothing heavy is imported at module level: `modelzip --help` must not import torch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from modelzip_cli.errors import UsageError

if TYPE_CHECKING:
    from modelzip_cli.commands.transform import CommonOptions
    from modelzip_cli.measure.report import Report


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # -h as --help, in every command and sub-command



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



MaxMemory = Annotated[str | None, typer.Option("--max-memory", help="refuse (exit 2, before any work) a run whose "
                                               "estimated peak memory exceeds this, e.g. 8GB")]
Threads = Annotated[int | None, typer.Option("--threads", help="threads for latency (default: all usable cores)")]



Device = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | auto: where the model trains and is "
                                     "measured (under torchrun, cuda is each process's cuda:LOCAL_RANK)")]



OffloadActivations = Annotated[Path | None, typer.Option(
    "--offload-activations", help="a folder where layer-by-layer calibration (GPTQ, AWQ, smoothing, Wanda, "
    "SparseGPT) keeps the activations between blocks, read back one batch at a time: memory holds one batch's "
    "instead of the whole calibration set's; the files are removed afterwards")]



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
                          min_fidelity=(MinFidelity, None), max_ppl_increase=(MaxPplIncrease, None),
                          max_memory=(MaxMemory, None))



RUN_OPTIONS = _options(threads=(Threads, None), as_json=(Json, False), quiet=(Quiet, False))



SELECT_OPTIONS = _options(include=(Include, None), exclude=(Exclude, None))



FINETUNE_OPTIONS = _options(data=(Data, None), finetune_epochs=(FinetuneEpochs, None), lr=(Lr, None),
                            batch_size=(BatchSize, None), max_samples=(MaxSamples, None), recover=(Recover, False),
                            recover_loss=(RecoverLoss, None), temperature=(RecoverTemperature, None),
                            hidden_weight=(HiddenWeight, None))



CALIBRATION_OPTIONS = _options(offload_activations=(OffloadActivations, None))



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
        wrapper.command_name = name or fn.__name__.rstrip("_")
        return wrapper

    return decorate


class MethodHelp(TyperCommand):
    """A command whose `--help` after `--method M` lists only the options that apply to M (the other
    methods' options hidden): `modelzip quantize --method gptq --help`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        for i, arg in enumerate(args):  # --help is eager: read --method before click parses anything
            if arg == "--method" and i + 1 < len(args):
                ctx.meta["modelzip.method"] = args[i + 1]
            elif arg.startswith("--method="):
                ctx.meta["modelzip.method"] = arg.partition("=")[2]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter) -> None:
        method = ctx.meta.get("modelzip.method")
        hidden = [p for p in self.params if p.name in _other_methods_options(self.name, method)]
        for p in hidden:
            p.hidden = True
        try:
            super().format_help(ctx, formatter)
        finally:
            for p in hidden:
                p.hidden = False


def _other_methods_options(op: str | None, method: str | None) -> set[str]:
    """The config fields of `op`'s other methods that `method` does not take (none without a method)."""
    if method is None or op is None:
        return set()
    from modelzip_cli.techniques import OPS  # (imports torch: only for a method's own help)

    configs = OPS[op].configs if op in OPS else {}
    if method not in configs:
        return set()
    every = {f for cls in configs.values() for f in cls.model_fields}
    return every - set(configs[method].model_fields)



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
    from modelzip_cli.commands.transform import CommonOptions

    g = vars(shared)
    if g.get("threads") is not None and not 1 <= g["threads"] <= MAX_THREADS:
        raise UsageError(f"--threads must be in [1, {MAX_THREADS}], got {g['threads']}")
    fields = {k: g[k] for k in ("output", "report", "force", "seed", "trust_code", "trust_arch", "eval_data",
                                "max_accuracy_drop", "min_fidelity", "max_ppl_increase", "threads", "arch", "task",
                                "output_key",
                                "device") if k in g}
    if g.get("offload_activations") is not None:
        folder = g["offload_activations"]
        if not folder.is_dir():
            raise UsageError(f"--offload-activations {folder}: not a folder",
                             hint="name an existing folder with room for one block boundary's activations")
        fields["offload_activations"] = folder
    if g.get("max_memory") is not None:
        from modelzip_cli.limits import parse_size

        fields["max_memory"] = parse_size(g["max_memory"], "--max-memory")
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



def progress_factory(quiet: bool):
    """A Context.progress backed by a rich progress bar on stderr (silent with --quiet)."""
    from modelzip_cli.pipeline.context import null_progress
    from modelzip_cli.pipeline.distributed import is_main

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
        from modelzip_cli.measure.report import render

        render(report, _console())
    if shared.as_json:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    if report.gate is not None and not report.gate.passed:
        from modelzip_cli.errors import QualityGateFailed

        failed = "; ".join(report.gate.failures)
        raise QualityGateFailed(f"quality gate failed: {failed}; output and report were written")



def technique(op: str, method: str | None, model: Path, shared: SimpleNamespace, values: dict[str, Any], *,
              files: dict[str, Path | None], gzip_output: bool = False, extra_inputs: tuple[Path, ...] = (),
              trusted_refs: frozenset[str] = frozenset()) -> Report | None:
    """The body every technique command shares: build the config, run it, render the report."""
    from modelzip_cli.commands.transform import run_technique
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
    from modelzip_cli.commands.chain import check_data_needs_all, parse_recipe, run_chain

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


class _RichBar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, steps: int = 1, **fields: Any) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.task, advance=steps, status=text)
