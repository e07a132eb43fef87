"""`chain`: a recipe of technique steps, validated whole before any weight is loaded, run in one process.

Recipe (TOML or JSON): a list `steps`, each a table with `op` (distill, prune, lowrank, quantize) and that
command's options under the same names (`ratio`, `method`, `finetune-epochs` or `finetune_epochs`, …).
A step may name its own `data`, `val-data` or `calib-data` file (relative to the recipe); otherwise it uses
the chain's `--data`. Steps call the same technique functions as the single commands.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from modelzip_cli.errors import InputError, ModelzipError, UsageError

OPS = ("distill", "prune", "lowrank", "quantize")
DATA_KEYS = {"data": "data", "val_data": "val_data", "calib_data": "calib_data"}


@dataclass
class RecipeStep:
    index: int  # 1-based, as users count
    op: str
    config: object
    data: Path | None = None
    val_data: Path | None = None
    calib_data: Path | None = None

    def label(self) -> str:
        return f"step {self.index} ({self.op})"


def _config_class(op: str):
    from modelzip_cli.techniques import TECHNIQUES

    return TECHNIQUES[op].config


def _check_type(value, hint, where: str, key: str) -> None:
    """Reject a value of the wrong JSON type for a config field (the dataclasses do not check)."""
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    def ok(v, t) -> bool:
        if t is type(None):
            return v is None
        base = typing.get_origin(t) or t
        if base is float:
            return isinstance(v, int | float) and not isinstance(v, bool)
        if base is int:
            return isinstance(v, int) and not isinstance(v, bool)
        return isinstance(v, base)
    if not any(ok(value, t) for t in allowed):
        raise UsageError(f"{where}: {key} = {value!r} has the wrong type", hint=f"expected {hint}")


def parse_recipe(path: Path) -> list[RecipeStep]:
    """Read and validate a whole recipe: ops, keys, types, values, order. No weight is loaded."""
    if not path.exists() or path.is_dir():
        raise InputError(f"recipe {path}: no such file", hint="pass a .toml or .json recipe")
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"recipe {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
    items = raw if isinstance(raw, list) else raw.get("steps") if isinstance(raw, dict) else None
    if isinstance(raw, dict) and set(raw) - {"steps"}:
        raise UsageError(f"recipe {path}: unknown top-level key(s) {sorted(set(raw) - {'steps'})}",
                         hint="a recipe has one list, `steps`")
    if not isinstance(items, list) or not items:
        raise UsageError(f"recipe {path} has no steps", hint="add [[steps]] tables with op = \"prune\" …")
    steps: list[RecipeStep] = []
    for i, item in enumerate(items, 1):
        where = f"step {i}"
        if not isinstance(item, dict):
            raise UsageError(f"{where} is not a table of options")
        op = item.get("op")
        if op not in OPS:
            raise UsageError(f"{where}: unknown op {op!r}", hint="use one of " + ", ".join(OPS))
        where = f"step {i} ({op})"
        cls = _config_class(op)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs, files = {}, {}
        for key, value in item.items():
            if key == "op":
                continue
            name = key.replace("-", "_")
            if name in DATA_KEYS:
                files[DATA_KEYS[name]] = (path.parent / value) if isinstance(value, str) else None
                if files[DATA_KEYS[name]] is None:
                    raise UsageError(f"{where}: {key} must be a file path")
                continue
            if name not in fields:
                raise UsageError(f"{where}: unknown key {key!r}",
                                 hint="known: " + ", ".join(sorted(k.replace("_", "-") for k in fields)))
            _check_type(value, hints[name], where, key)
            kwargs[name] = value
        try:
            config = cls(**kwargs).validate()
        except TypeError as exc:
            raise UsageError(f"{where}: {exc}") from None
        except ModelzipError as exc:
            raise type(exc)(f"{where}: {exc.message}", hint=exc.hint) from None
        steps.append(RecipeStep(index=i, op=op, config=config, **files))
    check_order(steps)
    return steps


def check_order(steps: list[RecipeStep]) -> None:
    """A float-only step cannot follow quantize: the integer model has no float weights to work on."""
    from modelzip_cli.techniques import TECHNIQUES

    quantized_at = None
    for step in steps:
        if quantized_at is not None and TECHNIQUES[step.op].float_only:
            raise UsageError(f"{step.label()} cannot follow {quantized_at.label()}: {step.op} works on float "
                             "models", hint="move quantize to the end of the recipe")
        if step.op == "quantize":
            quantized_at = step


def check_data_needs(steps: list[RecipeStep], data: Path | None) -> None:
    for step in steps:
        needs = step.config.required_data() if hasattr(step.config, "required_data") else set()
        if "data" in needs and step.data is None and data is None:
            raise UsageError(f"{step.label()} needs training data", hint="pass --data, or give the step `data`")
        if "calib_data" in needs and step.calib_data is None and step.data is None and data is None:
            raise UsageError(f"{step.label()} needs calibration data",
                             hint="pass --data (used for calibration), or give the step `calib-data`")


# ---------------------------------------------------------------------------------------------------
# Running


def plan(steps: list[RecipeStep], loaded) -> list[dict]:
    """--dry-run: per step, the modules it will touch and the ones it will skip (nothing is changed).
    Each technique answers for itself (`Technique.plan`), with the same selection code it runs with."""
    from torch import nn

    from modelzip_cli.techniques import TECHNIQUES
    from modelzip_cli.techniques.distill import load_student
    from modelzip_cli.techniques.select import WEIGHTED

    model, manifest, rows = loaded.model, loaded.manifest, []
    for step in steps:
        if step.op == "distill":
            model, manifest = load_student(step.config, manifest, 0)
            rows.append({"step": step.index, "op": "distill", "touch": [f"replaces the model with "
                         f"{step.config.student} ({sum(p.numel() for p in model.parameters()):,} parameters)"],
                         "skip": []})
            continue
        example = manifest.example_input() if manifest.input_shape else None
        touch = TECHNIQUES[step.op].plan(model, step.config, example)
        skip = [n for n, m in model.named_modules()
                if n and isinstance(m, (*WEIGHTED, nn.LSTM, nn.GRU)) and n not in touch]
        rows.append({"step": step.index, "op": step.op, "touch": touch, "skip": skip})
    return rows


def dry_run_report(input_path: Path, steps: list[RecipeStep], opts):
    """The plan as a report (one schema for every command): each step's selected and skipped modules."""
    from modelzip_cli.measure import count_parameters
    from modelzip_cli.report import Report, Step, file_info
    from modelzip_cli.runner import load_input

    loaded = load_input(input_path, opts)
    report = Report(command="chain", input=file_info(input_path, count_parameters(loaded.model)),
                    summary={"dry_run": True})
    for step, row in zip(steps, plan(steps, loaded), strict=True):
        report.steps.append(Step(
            op=step.op, config={"step": step.index, **step.config.to_dict()},
            layers=[{"name": n, "selected": True} for n in row["touch"]]
            + [{"name": n, "selected": False} for n in row["skip"]],
            notes=["dry run: nothing changed", "touches: " + (", ".join(row["touch"]) or "-")]
            + (["skips: " + ", ".join(row["skip"])] if row["skip"] else [])))
    return report


def run_chain(input_path: Path, steps: list[RecipeStep], opts, *, data: Path | None, progress,
              keep_intermediate: Path | None = None):
    """Run every step on the in-memory model; one report with a row per step and the final comparison."""
    import torch

    from modelzip_cli.checkpoint import save_checkpoint
    from modelzip_cli.context import Context
    from modelzip_cli.measure import model_metrics
    from modelzip_cli.runner import apply_technique, load_step_data, run_transform

    step_ctx: list[Context] = []
    datasets: dict = {}  # each data file is read and checked once, however many steps use it

    def prepare(loaded, ctx) -> None:
        if keep_intermediate is not None:
            keep_intermediate.mkdir(parents=True, exist_ok=True)
        for step in steps:  # read and check every data file now, before any step runs
            c = Context(seed=opts.seed, progress=progress, eval_data=ctx.eval_data)
            trains = step.op != "quantize" or step.config.method == "qat"
            calib = step.calib_data or (step.data or data if step.op == "quantize" else None)
            load_step_data(loaded, c, data=(step.data or data) if trains else None, val_data=step.val_data,
                           calib_data=calib, require_targets=getattr(step.config, "needs_targets", lambda: True)(),
                           cache=datasets)
            step_ctx.append(c)

    def apply(loaded, ctx) -> list:
        records = []
        for step, c in zip(steps, step_ctx, strict=True):
            torch.manual_seed(opts.seed)  # each step starts where the single command would
            c.example_input = loaded.manifest.example_input() if loaded.manifest.input_shape else ctx.example_input
            record = apply_technique(step.op, step.config, loaded, c)
            record.config = {"step": step.index, **record.config}
            if ctx.eval_data is not None:
                record.after["metrics"] = model_metrics(loaded.model, ctx.eval_data, threads=opts.threads)
            ctx.notes.extend(f"{step.label()}: {n}" for n in c.notes)
            if keep_intermediate is not None:
                path = keep_intermediate / f"step{step.index}_{step.op}{input_path.suffix}"
                save_checkpoint(loaded.model, loaded.manifest, path)
                record.notes.append(f"intermediate checkpoint: {path}")
            records.append(record)
        return records

    return run_transform("chain", input_path, opts, apply, context=Context(progress=progress), prepare=prepare)
