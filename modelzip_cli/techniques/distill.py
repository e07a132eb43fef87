"""Knowledge distillation: train a student to match a frozen teacher.

loss = alpha·L(student, teacher) + (1 − alpha)·CE(student, y), where L is `loss`: kd (the default),
T²·KL(softmax(teacher/T) ‖ softmax(student/T)), or the cosine or relative MSE feature loss of recovery
(techniques.recover) for embedding models, plus `hidden_weight` · the hidden-state loss for a Hugging Face
student with fewer layers of the teacher's width. With a feature loss alpha defaults to 1: unlabelled
text is enough.

The teacher is frozen in eval mode and its outputs are computed once for the whole (fixed) training
set when they are small, so an epoch costs only the student's forward and backward passes. `baseline` trains the same
student from the same initialization on cross-entropy alone, with the same budget, and reports the gain.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from modelzip_cli import hf
from modelzip_cli.checkpoint.edits import is_quantized
from modelzip_cli.checkpoint.format import CHECKPOINT_SUFFIXES, Manifest
from modelzip_cli.checkpoint.io import build_arch, load_checkpoint
from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.errors import InputError, UsageError, first_line
from modelzip_cli.pipeline.context import Context
from modelzip_cli.pipeline.run import evaluate
from modelzip_cli.pipeline.train import LossFn, TrainConfig, train
from modelzip_cli.techniques.base import MethodConfig, Op, Result, register
from modelzip_cli.techniques.recover import Teacher


class DistillConfig(MethodConfig):
    op: ClassVar[str] = "distill"
    student: str  # zoo:NAME / package.module:callable, or a checkpoint path to start from
    student_kwargs: dict[str, Any] | None = None
    epochs: int = Field(20, ge=0)
    temperature: float = Field(4.0, gt=0)
    loss: Literal["kd", "cosine", "mse"] = "kd"  # the teacher loss (module docstring)
    alpha: float = Field(0.7, ge=0, le=1)  # weight of the teacher loss; 1 by default with cosine / mse
    hidden_weight: float = Field(0.0, ge=0)  # weight of matching hidden states (Hugging Face models); 0: off
    lr: float = Field(1e-2, gt=0)  # a small student from scratch: a high rate, cosine-decayed
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    patience: int | None = Field(None, ge=1)  # early stopping on validation loss (needs val data)
    baseline: bool = False

    @model_validator(mode="before")
    @classmethod
    def _feature_loss_alone(cls, values: Any) -> Any:
        """A feature loss (an embedding teacher) has no labels to mix in unless alpha says so."""
        if isinstance(values, dict) and values.get("loss", "kd") != "kd" and "alpha" not in values:
            values = {**values, "alpha": 1.0}
        return values

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           weight_decay=self.weight_decay, patience=self.patience)

    def required_data(self) -> set[str]:
        return {"data", "val_data"} if self.patience is not None else {"data"}

    def needs_targets(self) -> bool:
        return self.alpha < 1 or self.baseline  # the baseline trains on labels alone

    def input_files(self) -> list[Path]:
        return [Path(self.student)] if is_checkpoint_path(self.student) else []


def is_checkpoint_path(ref: str) -> bool:
    return Path(ref).suffix in CHECKPOINT_SUFFIXES


def load_student(cfg: DistillConfig, teacher_manifest: Manifest, seed: int,
                 ctx: Context | None = None) -> tuple[nn.Module, Manifest]:
    """The student module and the manifest that will describe it. An architecture is imported only when
    the user named it on the command line (`ctx.trusted_refs`) or it passes the trust gate."""
    ctx = ctx or Context()
    if is_checkpoint_path(cfg.student):
        if cfg.student_kwargs:
            raise UsageError("--student-kwargs applies to an architecture, not to a checkpoint student")
        loaded = load_checkpoint(cfg.student, trust_code=ctx.trust_code)
        if is_quantized(loaded.manifest):
            raise InputError(f"student {cfg.student} is quantized and cannot be trained", hint="start from float")
        return loaded.model, loaded.manifest
    ref, kwargs = hf_student(cfg, teacher_manifest)
    if ref is None:
        loaded = load_checkpoint(hf_student_dir(cfg.student), output_key=(kwargs or {}).get("output_key"))
        return loaded.model, loaded.manifest
    torch.manual_seed(seed)
    model = build_arch(ref, kwargs, trusted=ref.startswith("hf:") or cfg.student in ctx.trusted_refs,
                       kwargs_label="the student's config" if ref.startswith("hf:") else "the student's kwargs")
    shape = teacher_manifest.input_shape
    return model, Manifest(arch=ref, arch_kwargs=dict(kwargs or {}), input_shape=shape,
                           input_dtype=teacher_manifest.input_dtype)


def hf_student_dir(ref: str) -> Path:
    return Path(ref[3:] if ref.startswith("hf:") else ref)


def hf_student(cfg: DistillConfig, teacher: Manifest) -> tuple[str | None, dict | None]:
    """The architecture and kwargs to build the student from, with the Hugging Face forms resolved:
    `hf:DIR` or `DIR` (a model directory: its weights as the start, `None` returned for the architecture, or a
    fresh model of its config.json when it has no weights) and `hf:` with `{"config": ...}` (--student-config)
    take the teacher's task and compared output unless given."""
    ref, kwargs = cfg.student, dict(cfg.student_kwargs or {})
    if not (ref.startswith("hf:") or hf.is_model_dir(Path(ref))):
        return ref, cfg.student_kwargs
    same = {"output_key": teacher.arch_kwargs.get("output_key")} if teacher.arch.startswith("hf:") else {}
    task = ref[3:] if ref[3:] in hf.TASKS else None
    if hf.is_model_dir(hf_student_dir(ref)):
        path = hf_student_dir(ref)
        if any((path / name).is_file() for name in hf.WEIGHT_FILES):
            return None, {**same, **kwargs}
        kwargs["config"] = hf.read_config(path)
    elif task is None and ref != "hf:":
        raise UsageError(f"--student {ref}: not a model directory, nor hf:TASK",
                         hint="pass a directory with config.json, or --student-config")
    if task is None and teacher.arch.startswith("hf:"):
        task = teacher.arch[3:]
    return f"hf:{task or ''}", {**same, **kwargs}


def check_compatible(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> None:
    with torch.no_grad():
        t_out = teacher.eval()(example)
        try:
            s_out = student.eval()(example)
        except Exception as exc:
            raise InputError(f"the student cannot take the teacher's inputs of shape {list(example.shape[1:])}: "
                             f"{first_line(exc, 200)}", hint="check --student-kwargs") from None
    if s_out.shape != t_out.shape:
        raise InputError(f"the student outputs {list(s_out.shape[1:])} but the teacher {list(t_out.shape[1:])}",
                         hint="give the student as many outputs as the teacher (num_classes)")


def distill_loss(teacher_loss: LossFn, alpha: float) -> LossFn:
    """alpha · the teacher loss (`Teacher.training`'s) + (1 − alpha) · cross-entropy on the labels."""

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor | None, idx: torch.Tensor):
        soft, parts = teacher_loss(logits, targets, idx)
        parts = {"soft_loss": soft.detach(), **{k: v for k, v in parts.items() if k == "hidden_loss"}}
        if alpha < 1:
            hard = F.cross_entropy(logits, targets)
            return alpha * soft + (1 - alpha) * hard, {**parts, "hard_loss": hard.detach()}
        return soft, parts

    return loss_fn


def apply(teacher: nn.Module, cfg: DistillConfig, ctx: Context, manifest: Manifest) -> Result:
    if ctx.data is None:
        raise UsageError("distill needs --data to train the student on")
    if cfg.needs_targets() and ctx.data.targets is None:
        raise InputError(f"data file {ctx.data.path} has no 'targets', which --alpha {cfg.alpha} < 1 needs",
                         hint="add targets, or pass --alpha 1 to learn from the teacher alone")
    student, student_manifest = load_student(cfg, manifest, ctx.seed, ctx)
    example = ctx.example_input if ctx.example_input is not None else ctx.data.inputs[:1]
    check_compatible(teacher, student, example)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # the teacher's outputs, once for all epochs (and ranks) when they are small; the teacher itself otherwise
    targets = Teacher.of(teacher, ctx.data, ctx, loss=cfg.loss, temperature=cfg.temperature,
                         hidden_weight=cfg.hidden_weight, copy_model=False)
    initial = copy.deepcopy(student.state_dict())
    with targets.training(student, ctx.device) as teacher_loss:
        history = train(student, ctx.data, cfg.train_config(), ctx=ctx, val=ctx.val_data, description="distill",
                        loss_fn=distill_loss(teacher_loss, cfg.alpha))
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    result = Result(student.eval(), manifest=student_manifest, before={"teacher_parameters": t_params})
    result.after = {"student_parameters": s_params, "compression_ratio": round(t_params / max(1, s_params), 3),
                    "history": history, "epochs_run": len(history), "fidelity": targets.measure(student),
                    "fidelity_measured_on": targets.measure_on.path.name + ("" if targets.held_out else
                                                                             " (training rows, not held out)")}
    measure_on = ctx.eval_data or ctx.val_data
    if measure_on is not None and measure_on.targets is not None:  # unlabelled data: fidelity only
        result.after["teacher_accuracy"] = evaluate(teacher, measure_on)["accuracy"]
        result.after["student_accuracy"] = evaluate(student, measure_on)["accuracy"]
    if cfg.baseline:
        _baseline(result, student, initial, cfg, ctx, measure_on)
    return result


def _baseline(result: Result, student: nn.Module, initial: dict, cfg: DistillConfig, ctx: Context,
              measure_on) -> None:
    """The same student from the same initialization, trained on labels alone with the same budget."""
    scratch = copy.deepcopy(student)
    scratch.load_state_dict(initial)
    base_history = train(scratch, ctx.data, cfg.train_config(), ctx=ctx, val=ctx.val_data,
                         description="baseline (cross-entropy only)")
    result.after["baseline_history"] = base_history
    if measure_on is None:
        result.notes.append("--baseline trained, but no --eval-data or --val-data to compare the two on")
        return
    scratch_acc = evaluate(scratch, measure_on)["accuracy"]
    result.after["baseline_accuracy"] = scratch_acc
    result.after["distillation_gain"] = round((result.after["student_accuracy"] - scratch_acc) * 100, 4)
    result.notes.append(f"distillation gain on {measure_on.path.name}: {result.after['distillation_gain']:+.2f} "
                        "accuracy points against the same student trained on labels alone")


register(DistillConfig)(apply)
OP = Op("distill", "distilled", apply, replaces_model=lambda cfg, manifest: load_student(cfg, manifest, 0))
