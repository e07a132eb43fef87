"""`chain`: a recipe of technique steps, validated whole before any weight is loaded, run in one process.

Recipe (TOML or JSON): a list `steps`, each a table with `op` (distill, prune, lowrank, quantize, export), an
optional `method`, and that command's options under the same names (`ratio`, `finetune-epochs` or
`finetune_epochs`, …). An option that does not belong to the step's method is an error. A step may name
its own `data`, `val-data` or `calib-data` file (relative to the recipe); otherwise it uses the chain's
`--data`. Steps call the same technique functions as the single commands. A last step `op = "export"` takes
the export command's options (`format`, `opset`, `dynamic-batch`, `int8`) and an optional `output` (a file
name in the chain's output folder, never outside it; default: the chain's output with .onnx or .pt2): the
final model is exported and verified too.

A recipe is a file, and files are untrusted: an architecture a step names (a distill student) must be
built in or listed in MODELZIP_TRUSTED_MODULES, checked here before anything is imported.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelzip_cli.checkpoint.format import OUTPUT_SUFFIXES
from modelzip_cli.checkpoint.io import check_trusted
from modelzip_cli.errors import InputError, ModelzipError, UsageError
from modelzip_cli.export.onnx import ExportConfig
from modelzip_cli.files import Target, confined
from modelzip_cli.limits import parse, read_text
from modelzip_cli.techniques import OPS, MethodConfig, check_data_needs, make_config
from modelzip_cli.techniques.distill import is_checkpoint_path

DATA_KEYS = ("data", "val_data", "calib_data")


@dataclass
class RecipeStep:
    index: int  # 1-based, as users count
    config: MethodConfig
    data: Path | None = None
    val_data: Path | None = None
    calib_data: Path | None = None

    @property
    def op(self) -> str:
        return self.config.op

    def label(self) -> str:
        return f"step {self.index} ({self.op})"


@dataclass
class ExportStep:
    """A recipe's last step: export the final model (export.py)."""

    index: int
    config: ExportConfig
    output: str | None = None  # as the recipe names it: placed in the chain's output folder (`files.confined`)
    op: str = "export"  # the recipe's op name of this step (ExportStep.op)

    def label(self) -> str:
        return f"step {self.index} ({self.op})"


def _read(path: Path, text: str | None = None) -> list:
    """The steps of the recipe at `path` (or of `text`, a plan about to be written there): a regular file of
    bounded size (never a FIFO or /dev/zero), parsed recursion-safely."""
    text = read_text(path, "recipe") if text is None else text
    try:
        raw = parse(tomllib.loads if path.suffix == ".toml" else json.loads, text, f"recipe {path}")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"recipe {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
    items = raw if isinstance(raw, list) else raw.get("steps") if isinstance(raw, dict) else None
    if isinstance(raw, dict) and set(raw) - {"steps", "plan"}:
        raise UsageError(f"recipe {path}: unknown top-level key(s) {sorted(set(raw) - {'steps', 'plan'})}",
                         hint="a recipe has one list, `steps` (and a plan its `[plan]` table)")
    if isinstance(raw, dict) and "plan" in raw:
        check_plan_table(path, raw["plan"])
    if not isinstance(items, list) or not items:
        raise UsageError(f"recipe {path} has no steps", hint="add [[steps]] tables with op = \"prune\" …")
    return items


class PlanTable(BaseModel):
    """A plan's `[plan]` table (written by `analyze`): how the plan was made. A record; nothing runs from it."""

    model_config = ConfigDict(strict=True, extra="forbid")
    budget_fidelity: float | None = Field(None, gt=0, le=1)
    budget_accuracy_drop: float | None = Field(None, ge=0)
    measured_loss: float
    unit: Literal["1 - cosine", "accuracy points"]
    measured_on: str = Field(max_length=500)
    tuning_loss: float | None = None  # on the data that chose the plan (measured_loss: held out)
    tuned_on: str | None = Field(None, max_length=500)
    bytes_saved_estimate: int = Field(ge=0)
    layers: int = Field(ge=0)


def check_plan_table(path: Path, table: object) -> None:
    if not isinstance(table, dict):
        raise UsageError(f"plan {path}: [plan] must be a table")
    try:
        PlanTable.model_validate(table)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "[plan]"
        raise UsageError(f"plan {path}: [plan] {where}: {err['msg'].lower()}",
                         hint="a plan is written by `modelzip analyze --plan-out`") from None


def parse_step(index: int, item: object, folder: Path) -> RecipeStep | ExportStep:
    """One recipe table → a validated step. Errors name the step."""
    where = f"step {index}"
    if not isinstance(item, dict):
        raise UsageError(f"{where} is not a table of options")
    values = {str(k).replace("-", "_"): v for k, v in item.items()}
    op = values.pop("op", None)
    if op == ExportStep.op:
        output = values.pop("output", None)
        if output is not None and not isinstance(output, str):
            raise UsageError(f"{where} (export): output must be a file path")
        config = ExportConfig.parse(values, where=f"{where} (export): ")
        if config.format in ("hf", "compressed-tensors"):  # directories: `modelzip export` after the chain
            raise UsageError(f"{where} (export): a recipe exports onnx or pt2 files; format {config.format!r} "
                             "writes a directory", hint=f"run modelzip export OUTPUT --format {config.format} "
                                                         "after the chain")
        config.check_available()  # before any weight is loaded or trained
        return ExportStep(index, config, output)
    if not isinstance(op, str) or op not in OPS:
        raise UsageError(f"{where}: unknown op {op!r}", hint="use one of " + ", ".join(OPS))
    where = f"step {index} ({op})"
    files = {}
    for key in DATA_KEYS:
        if key in values:
            value = values.pop(key)
            if not isinstance(value, str):
                raise UsageError(f"{where}: {key.replace('_', '-')} must be a file path")
            files[key] = folder / value
    method = values.pop("method", None)
    if method is not None and not isinstance(method, str):
        raise UsageError(f"{where}: method = {method!r} has the wrong type", hint="a method name, in quotes")
    try:
        config = make_config(op, method, values, where=f"{where}: ")
    except ModelzipError as exc:
        raise type(exc)(exc.message, hint=exc.hint) from None
    student = getattr(config, "student", None)
    if student is not None and not is_checkpoint_path(student):
        check_trusted(student, what=f"recipe {where}")
    return RecipeStep(index=index, config=config, **files)


def parse_recipe(path: Path, text: str | None = None) -> list[RecipeStep | ExportStep]:
    """Read and validate a whole recipe: ops, keys, types, values, order, trust. No weight is loaded.
    `text`: the recipe's content, not yet written to `path` (a plan, checked before it is written)."""
    steps = [parse_step(i, item, path.parent) for i, item in enumerate(_read(path, text), 1)]
    check_order(steps)
    return steps


def check_order(steps: list[RecipeStep]) -> None:
    """A float-only step cannot follow quantize: the integer model has no float weights to work on. Another
    quantize step may (a plan quantizes some layers to int8, others to int4): it takes the layers still float."""
    quantized_at = None
    for step in steps:
        if isinstance(step, ExportStep):
            if step is not steps[-1]:
                raise UsageError(f"{step.label()} must be the last step: it exports the final model",
                                 hint="move the export step to the end of the recipe")
            continue
        if quantized_at is not None and OPS[step.op].float_only and not OPS[step.op].quantizes:
            raise UsageError(f"{step.label()} cannot follow {quantized_at.label()}: {step.op} works on float "
                             "models", hint="move quantize to the end of the recipe")
        if OPS[step.op].quantizes:
            quantized_at = step


def step_files(step: RecipeStep, data: Path | None) -> dict[str, Path | None]:
    """The data files a step reads: its own, else the chain's --data. A quantize step calibrates (and
    measures its SQNR) on that data and trains on it only for QAT."""
    if OPS[step.op].calibrates:
        trains = "data" in step.config.required_data()
        return {"data": (step.data or data) if trains else None, "val_data": step.val_data,
                "calib_data": step.calib_data or step.data or data}
    return {"data": step.data or data, "val_data": step.val_data, "calib_data": None}


def technique_steps(steps: list) -> list[RecipeStep]:
    return [s for s in steps if isinstance(s, RecipeStep)]


def export_step(steps: list) -> ExportStep | None:
    return steps[-1] if steps and isinstance(steps[-1], ExportStep) else None


def check_data_needs_all(steps: list[RecipeStep], data: Path | None) -> None:
    for step in technique_steps(steps):
        check_data_needs(step.config, step_files(step, data), where=step.label())


# ---------------------------------------------------------------------------------------------------
# Running


def plan(steps: list[RecipeStep], loaded) -> list[dict]:
    """--dry-run: per step, the modules it will touch and the ones it will skip (nothing is changed).
    Each technique answers for itself (`Op.plan`), with the same selection code it runs with."""
    from torch import nn

    from modelzip_cli.pipeline.data import as_model_input, float_dtype
    from modelzip_cli.techniques.select import WEIGHTED

    model, manifest, rows = loaded.model, loaded.manifest, []
    for step in steps:
        if (replace := OPS[step.op].replaces_model) is not None:
            model, manifest = replace(step.config, manifest)
            rows.append({"step": step.index, "op": step.op, "touch": [f"replaces the model with "
                         f"{step.config.student} ({sum(p.numel() for p in model.parameters()):,} parameters)"],
                         "skip": []})
            continue
        example = as_model_input(manifest.example_input(), float_dtype(model)) if manifest.input_shape else None
        touch = OPS[step.op].plan(model, step.config, example)
        skip = [n for n, m in model.named_modules()
                if n and isinstance(m, (*WEIGHTED, nn.LSTM, nn.GRU)) and n not in touch]
        rows.append({"step": step.index, "op": step.op, "touch": touch, "skip": skip})
    return rows


def dry_run_report(input_path: Path, steps: list[RecipeStep], opts, data: Path | None = None):
    """The plan as a report (one schema for every command): each step's selected and skipped modules. A
    model with no recorded input shape learns it from `data` (or --eval-data), as a real run would."""
    from modelzip_cli.checkpoint.layers import count_parameters
    from modelzip_cli.commands.transform import check_example, load_dataset, load_input
    from modelzip_cli.measure.report import Report, Step, file_info

    # an export output outside the chain's output folder is refused here too, before the model is loaded
    export = export_target(export_step(steps), input_path, opts) if export_step(steps) is not None else None
    loaded = load_input(input_path, opts)
    load_dataset(data or opts.eval_data, loaded, require_targets=False)
    if loaded.manifest.input_shape:
        check_example(loaded, loaded.manifest.example_input())
    report = Report(command="chain", input=file_info(input_path, count_parameters(loaded.model)),
                    summary={"dry_run": True}, warnings=list(loaded.notes))
    for step, row in zip(technique_steps(steps), plan(technique_steps(steps), loaded), strict=True):
        report.steps.append(Step(
            op=step.op, config={"step": step.index, **step.config.to_dict()},
            layers=[{"name": n, "selected": True} for n in row["touch"]]
            + [{"name": n, "selected": False} for n in row["skip"]],
            notes=["dry run: nothing changed", "touches: " + (", ".join(row["touch"]) or "-")]
            + (["skips: " + ", ".join(row["skip"])] if row["skip"] else [])))
    if export_step(steps) is not None:
        step = export_step(steps)
        report.steps.append(Step(op="export", config={"step": step.index, **step.config.to_dict()},
                                 notes=[f"dry run: nothing exported (would write {export.path})"]))
    return report


def intermediate_targets(steps: list[RecipeStep], folder: Path, suffix: str) -> dict[str, Target]:
    """--keep-intermediate: step label → where its checkpoint goes (the run makes the folder)."""
    return {step.label(): Target(f"intermediate of {step.label()}", folder / f"step{step.index}_{step.op}{suffix}",
                                 OUTPUT_SUFFIXES, folder_may_be_made=True) for step in steps}


def export_target(step: ExportStep, input_path: Path, opts) -> Target:
    """Where the export step writes: in the folder of the chain's output, whatever the recipe says (a file
    never chooses where modelzip writes). `run_transform` checks it with every other output."""
    from modelzip_cli.commands.transform import default_output
    from modelzip_cli.export.onnx import SUFFIXES, check_output_suffix

    chain_output = opts.output or default_output(input_path, "chain")
    try:
        path = (confined(step.output, chain_output.parent, "output") if step.output
                else chain_output.with_suffix(SUFFIXES[step.config.format]))
        check_output_suffix(path, step.config.format)
    except ModelzipError as exc:
        raise type(exc)(f"{step.label()}: {exc.message}", hint=exc.hint) from None
    return Target(f"export output of {step.label()}", path, (SUFFIXES[step.config.format],))


def run_export_step(step: ExportStep, path: Path, loaded, ctx, outputs, opts, calib):
    """Export the chain's final model, verified; measured against it on --eval-data (else the example input)."""
    from modelzip_cli.commands.export import check_agreement, measure_export
    from modelzip_cli.export.onnx import example_dataset, export_model
    from modelzip_cli.measure.report import Report

    try:
        written = export_model(loaded, step.config, path, outputs, calib=calib)
    except ModelzipError as exc:
        raise type(exc)(f"{step.label()}: {exc.message}", hint=exc.hint) from None
    figures = Report(command="export")
    measure_export(figures, loaded, written, ctx.eval_data or example_dataset(loaded), opts.threads)
    check_agreement(figures, loaded, written, ctx.eval_data or example_dataset(loaded))
    agreement = figures.gate.export_agreement if figures.gate is not None else None
    if agreement is not None and not agreement["passed"]:  # a chain cannot keep half its outputs: refused
        raise InputError(f"{step.label()}: {figures.warnings[-1].removeprefix('quality gate failed: ')}; nothing "
                         "was written", hint="export with another --int8 way, or a different format")
    record = written.step
    if agreement is not None:
        record.after["agreement"] = agreement
    record.config = {"step": step.index, **record.config}
    record.after["metrics"] = figures.metrics["output"]
    record.after["metrics_pytorch"] = figures.metrics["input"]
    record.notes.append(f"exported file: {path}")
    return record


def run_chain(input_path: Path, steps: list[RecipeStep], opts, *, data: Path | None, progress,
              recipe: Path | None = None, keep_intermediate: Path | None = None, command: str = "chain"):
    """Run every step on the in-memory model; one report with a row per step and the final comparison.
    Intermediates are staged with the output and report: checked like them before any work (inputs,
    --force), and written only if the whole chain succeeds."""
    import torch

    from modelzip_cli.checkpoint.io import save_checkpoint
    from modelzip_cli.commands.transform import apply_technique, load_step_data, run_transform
    from modelzip_cli.files import Outputs
    from modelzip_cli.measure.metrics import model_metrics
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.distributed import is_main

    if keep_intermediate is not None and keep_intermediate.exists() and not keep_intermediate.is_dir():
        raise UsageError(f"--keep-intermediate {keep_intermediate} is not a folder", hint="pass a folder path")
    export, steps = export_step(steps), technique_steps(steps)
    targets = {} if export is None else {export.label(): export_target(export, input_path, opts)}
    if keep_intermediate is not None:
        targets |= intermediate_targets(steps, keep_intermediate, input_path.suffix)
    outputs = Outputs()
    step_ctx: list[Context] = []
    datasets: dict = {}  # each data file is read and checked once, however many steps use it

    def prepare(loaded, ctx) -> None:
        for step in steps:  # read and check every data file now, before any step runs
            c = Context(seed=opts.seed, progress=progress, eval_data=ctx.eval_data, device=ctx.device,
                        trust_code=opts.trust_code)
            load_step_data(loaded, c, **step_files(step, data), require_targets=step.config.needs_targets(),
                           cache=datasets)
            step_ctx.append(c)

    def apply(loaded, ctx) -> list:
        records = []
        for step, c in zip(steps, step_ctx, strict=True):
            torch.manual_seed(opts.seed)  # each step starts where the single command would
            c.example_input = loaded.manifest.example_input() if loaded.manifest.input_shape else ctx.example_input
            try:
                record = apply_technique(step.config, loaded, c)
            except ModelzipError as exc:
                raise type(exc)(f"{step.label()}: {exc.message}", hint=exc.hint) from None
            record.config = {"step": step.index, **record.config}
            if ctx.eval_data is not None and is_main():
                record.after["metrics"] = model_metrics(loaded.model, ctx.eval_data, threads=opts.threads,
                                                        device=ctx.device)
            if keep_intermediate is not None and is_main():
                path = targets[step.label()].path
                outputs.folder(keep_intermediate)
                save_checkpoint(loaded.model, loaded.manifest, path, encoded=loaded.encoded, outputs=outputs)
                record.notes.append(f"intermediate checkpoint: {path}")
            records.append(record)
        if export is not None and is_main():
            calib = next((c.calib_data for c in reversed(step_ctx) if c.calib_data is not None), None)
            path = targets[export.label()].path
            records.append(run_export_step(export, path, loaded, ctx, outputs, opts, calib))
        return records

    step_inputs = [f for step in steps for f in (step.data, step.val_data, step.calib_data) if f is not None]
    step_inputs += [f for s in steps for f in s.config.input_files()]
    others = [p for p in (recipe, data, *step_inputs) if p is not None]
    return run_transform(command, input_path, opts, apply, ops=[s.op for s in steps],
                         context=Context(progress=progress), prepare=prepare, extra_inputs=others,
                         outputs=outputs, extra_outputs=list(targets.values()))
