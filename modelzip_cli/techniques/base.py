"""What every technique shares: its config base class, the result it returns, and its registry entry.

One config class per method (torchao's style: the config type is the dispatch key). Configs are pydantic
models — strict types, bounds, unknown keys refused — so the same object comes from CLI flags, from a
recipe step, and back out of the report (`to_dict`). Techniques return a `Result`; only the runner
turns results into report steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from modelzip_cli.checkpoint.edits import Edit
from modelzip_cli.checkpoint.format import Manifest
from modelzip_cli.errors import UsageError

# The data files a method may need (`required_data`): key → (what it is, its flag)
DATA_FLAGS = {"data": ("training data", "--data"), "calib_data": ("calibration data", "--calib-data"),
              "val_data": ("validation data to stop early on (--patience)", "--val-data")}


def flag(field_name: str) -> str:
    """The command-line spelling of a config field (recipes take the same names, with - or _)."""
    return "--" + field_name.replace("_", "-")


class MethodConfig(BaseModel):
    """Base of every technique config: validated on construction, unknown options refused."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    op: ClassVar[str]
    method: ClassVar[str] = ""  # "" for an op with a single method

    def required_data(self) -> set[str]:
        """Data files the method cannot run without: a subset of DATA_FLAGS."""
        return set()

    def needs_targets(self) -> bool:
        return True

    def input_files(self) -> list[Path]:
        """Files the method reads besides the model and data (which no output may overwrite)."""
        return []

    def to_dict(self) -> dict:
        return {**({"method": self.method} if self.method else {}), **self.model_dump()}

    def to_recipe(self) -> dict:
        """The recipe step that makes this config: op, method and the values that differ from the defaults."""
        return {"op": self.op, **({"method": self.method} if self.method else {}),
                **self.model_dump(exclude_defaults=True)}


class Selection(BaseModel):
    """--include / --exclude: module-name globs (techniques.select)."""

    include: list[str] | None = None
    exclude: list[str] | None = None


class FineTune(BaseModel):
    """Fine-tuning after a compression step, when training data is given."""

    finetune_epochs: int = Field(3, ge=0)
    lr: float = Field(5e-4, gt=0)  # lower than training: the weights are already good
    batch_size: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1)  # train on a seeded random subset of the data this large


class Recover(BaseModel):
    """--recover: fine-tune the compressed model against the input model as teacher (techniques.recover), so
    unlabelled data is enough. Epochs, learning rate, batch size and samples are FineTune's."""

    recover: bool = False
    recover_loss: Literal["auto", "kd", "cosine", "mse"] = "auto"  # auto: kd for class logits, else cosine
    temperature: float = Field(2.0, gt=0)  # kd's softmax temperature
    hidden_weight: float = Field(0.0, ge=0)  # weight of matching hidden states (Hugging Face models); 0: off

    @model_validator(mode="after")
    def _needs_recover(self) -> Recover:
        # a value other than the default (a report's config carries them all, recover or not)
        stray = [k for k in ("recover_loss", "temperature", "hidden_weight")
                 if getattr(self, k) != type(self).model_fields[k].default]
        if stray and not self.recover:
            raise UsageError(f"{flag(stray[0])} applies to recovery", hint="add --recover")
        return self

    def required_data(self) -> set[str]:
        return {"data"} if self.recover else set()

    def needs_targets(self) -> bool:
        # the teacher's outputs are the targets; with no fine-tuning epoch, data only ranks (structured pruning)
        return not self.recover and getattr(self, "finetune_epochs", 1) > 0


@dataclass
class Result:
    """What a technique hands back: the new model, the edits that rebuild it, and what it measured."""

    model: nn.Module
    edits: list[Edit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the user should act on (the report's warnings)
    layers: list[dict] | None = None  # per-layer rows; None: the runner's standard table
    layer_extra: dict[str, dict] = field(default_factory=dict)  # name → fields added to the runner's rows
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    manifest: Manifest | None = None  # a replacement manifest (distill's student); else edits are appended


ApplyFn = Callable[..., Result]  # (model, config, ctx, manifest) → Result
PlanFn = Callable[..., list[str]]  # (model, config, example input or None) → names of the modules it changes
Handler = Callable[..., Any]  # (model, config, ctx) → what the op's flow expects of its methods

# The one registry of methods: config class → the function that runs it. The class is the dispatch key,
# and registering one adds the method to its op (`Op.configs`), its CLI `--method` and recipes.
HANDLERS: dict[type[MethodConfig], Handler] = {}


def register(*configs: type[MethodConfig]) -> Callable[[Handler], Handler]:
    """Decorate the function that runs `configs` (one or more config classes of one op)."""

    def decorate(fn: Handler) -> Handler:
        for cls in configs:
            HANDLERS[cls] = fn
        return fn

    return decorate


def handler(cfg: MethodConfig) -> Handler:
    return HANDLERS[type(cfg)]


@dataclass(frozen=True)
class Op:
    """A technique as the runner, the CLI and recipes see it."""

    name: str
    tag: str  # the default output's infix: model.pt → model.TAG.pt
    apply: ApplyFn  # the op's flow around its method's handler
    plan: PlanFn | None = None
    float_only: bool = True  # refuses an already-quantized model (quantize too: no double quantization)
    default_method: str | None = None
    quantizes: bool = False  # its output has integer layers: float-only steps cannot follow it
    calibrates: bool = False  # in a chain, the chain's --data is its calibration data (training data for QAT)
    fidelity_gate: bool = False  # --min-fidelity chooses what it does (layers kept float), not only judges it
    replaces_model: Callable[..., tuple[nn.Module, Manifest]] | None = None  # dry run: (config, manifest) → new

    @property
    def configs(self) -> dict[str, type[MethodConfig]]:
        """method → config class ("" for a single method), in the order they were registered."""
        return {cls.method: cls for cls in HANDLERS if cls.op == self.name}

    def config(self, method: str | None, values: dict[str, Any], *, where: str) -> MethodConfig:
        """Build and validate the config for `method` from user values; every error names the option."""
        method = method if method is not None else self.default_method
        if len(self.configs) == 1 and method in (None, ""):
            method = next(iter(self.configs))
        if method not in self.configs:
            raise UsageError(f"{where}unknown {self.name} method {method!r}",
                             hint="use " + ", ".join(m for m in self.configs if m))
        cls = self.configs[method]
        for key in values:
            if key not in cls.model_fields:
                owners = [m for m, c in self.configs.items() if key in c.model_fields]
                if owners:
                    raise UsageError(f"{where}{flag(key)} does not apply to --method {method}",
                                     hint=f"it is an option of --method {' / '.join(owners)}")
                raise UsageError(f"{where}unknown key {key.replace('_', '-')!r}",
                                 hint="known: " + ", ".join(sorted(k.replace("_", "-") for k in cls.model_fields)))
        try:
            return cls(**values)
        except ValidationError as exc:
            raise UsageError(where + describe(exc.errors()[0])) from None


def describe(error: dict) -> str:
    """One pydantic error as one line naming the option."""
    if not error.get("loc") and error["type"] == "value_error":  # a model validator's own sentence
        return error["msg"].removeprefix("Value error, ")
    name = flag(str(error["loc"][0])) if error.get("loc") else "a value"
    value = error.get("input")
    if error["type"].endswith("_type") or error["type"] in {"int_from_float", "dict_type", "list_type"}:
        return f"{name} = {value!r} has the wrong type ({error['msg'].lower()})"
    return f"{name} {error['msg'].lower().removeprefix('input ')}, got {value!r}"
