"""Recovery by distillation: fine-tune a compressed model against the model it was made from.

The input model, taken before the step changes it, is the teacher; its outputs are the targets, so the data
need no labels. The loss on the compared output (hf.select_output: class logits, a pooled embedding, …):

- kd:     T²·KL(softmax(teacher/T) ‖ softmax(student/T)) over the last dimension (class or token logits)
- cosine: 1 − cos(student, teacher), per sample
- mse:    ‖student − teacher‖² / ‖teacher‖², per batch (scale-free: the same weight suits any model)
- auto:   kd when the output is class logits, else cosine

With `hidden_weight` w > 0 (Hugging Face models) the loss adds w · the mean over layers of the relative
squared error between hidden states, over real tokens only; student layer j is matched to teacher layer
round(j·T/S) when the student has fewer layers (distill's smaller students), so their widths must agree.

The teacher's outputs on the training rows are computed once, before the step, when they are small (a
sentence embedding, class logits); otherwise (per-token logits, hidden states) a frozen copy of the input
model runs beside the student, which costs its forward pass per batch and its memory.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.errors import InputError
from modelzip_cli.measure.metrics import fidelity, outputs_class_logits
from modelzip_cli.pipeline.context import Context
from modelzip_cli.pipeline.data import Dataset, as_model_input, float_dtype
from modelzip_cli.pipeline.run import evaluate, predict
from modelzip_cli.pipeline.train import LossFn, TrainConfig, cached_outputs, cross_entropy, train

CACHE_LIMIT_BYTES = 256 << 20  # teacher outputs up to this size are cached; larger ones are recomputed
MEASURE_ROWS = 2048  # without --eval-data, fidelity is measured on at most this many training rows


def rows(data: Dataset | None, max_samples: int | None, seed: int) -> Dataset | None:
    """At most `max_samples` rows of `data`: a seeded random subset, kept in file order."""
    if data is None or max_samples is None or max_samples >= len(data):
        return data
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values
    return Dataset(data.inputs[keep], data.targets[keep] if data.targets is not None else None, data.path)


def resolve_loss(kind: str, class_logits: bool) -> str:
    return ("kd" if class_logits else "cosine") if kind == "auto" else kind


def output_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss between the student's and the teacher's compared outputs (module docstring)."""
    if student.shape != teacher.shape:
        raise InputError(f"the student outputs {list(student.shape[1:])} but the teacher {list(teacher.shape[1:])}",
                         hint="the two must have the same output shape")
    if kind == "kd":
        t = temperature
        s_log = F.log_softmax(student.flatten(0, -2) / t, dim=-1)  # (B·…, classes)
        t_log = F.log_softmax(teacher.flatten(0, -2) / t, dim=-1)
        return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * (t * t)
    s, te = student.flatten(1), teacher.flatten(1)  # (B, features)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, te, dim=1, eps=1e-8)).mean()
    return (s - te).pow(2).sum() / te.pow(2).sum().clamp(min=1e-12)


def hidden_loss(student: tuple, teacher: tuple, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the student's hidden states of ‖s − t‖² / ‖t‖² against the teacher's layer round(j·T/S),
    over real tokens when there is a mask."""
    s_n, t_n = len(student), len(teacher)
    losses = []
    for j, s in enumerate(student):
        t = teacher[round(j * (t_n - 1) / max(1, s_n - 1))]
        if s.shape != t.shape:
            raise InputError(f"hidden states of shape {list(s.shape[1:])} cannot match the teacher's "
                             f"{list(t.shape[1:])}", hint="--hidden-weight needs a student of the teacher's width")
        diff, ref = (s - t).pow(2), t.pow(2)
        if mask is not None and s.ndim == 3:  # (B, L, D): padding tokens carry no meaning
            m = mask.to(s.dtype).unsqueeze(-1)  # (B, L, 1)
            diff, ref = diff * m, ref * m
        losses.append(diff.sum() / ref.sum().clamp(min=1e-12))
    return torch.stack(losses).mean()


@dataclass
class Teacher:
    """The targets of recovery: the input model's outputs on the training rows, cached or recomputed."""

    data: Dataset  # the training rows (a subset under max_samples)
    loss: str  # kd | cosine | mse (auto resolved)
    temperature: float
    hidden_weight: float
    class_logits: bool
    outputs: torch.Tensor | None = None  # (N, …) cached outputs on `data`
    model: nn.Module | None = None  # a frozen teacher run per batch, when `outputs` is None
    reference: torch.Tensor | None = None  # the teacher's outputs on `measure_on`
    measure_on: Dataset | None = None  # held-out data when given, else training rows
    held_out: bool = False  # whether `measure_on` is --eval-data

    @classmethod
    def of(cls, model: nn.Module, data: Dataset, ctx: Context, *, loss: str, temperature: float,
           hidden_weight: float, copy_model: bool = True) -> Teacher:
        """Take `model` as the teacher, before anything changes it. `copy_model`: keep a frozen copy when one
        is needed (compression steps change `model` in place); otherwise `model` itself is the teacher."""
        class_logits = outputs_class_logits(model)
        kind = resolve_loss(loss, class_logits)
        with torch.inference_mode():
            example = model.eval()(as_model_input(data.inputs[:1], float_dtype(model)))
        cache = hidden_weight == 0 and example[0].numel() * 4 * len(data) <= CACHE_LIMIT_BYTES
        teacher = cls(data, kind, temperature, hidden_weight, class_logits)
        if cache:
            teacher.outputs = cached_outputs(model, data.inputs, ctx.device).clone()  # (N, …), not an inference tensor
        else:
            teacher.model = copy.deepcopy(model) if copy_model else model
            teacher.model.eval().requires_grad_(False)
        teacher.held_out = ctx.eval_data is not None
        teacher.measure_on = ctx.eval_data if teacher.held_out else rows(data, MEASURE_ROWS, ctx.seed)
        if teacher.outputs is not None and teacher.measure_on is data:
            teacher.reference = teacher.outputs.cpu()
        else:
            teacher.reference = predict(model, teacher.measure_on.inputs).cpu()
        return teacher

    @contextlib.contextmanager
    def training(self, student: nn.Module, device: torch.device) -> Iterator[LossFn]:
        """The loss function for `train` on `self.data` (training on `device`), while the student's hidden
        states are recorded."""
        from modelzip_cli import hf

        if self.model is not None:
            self.model.to(device)
        with (hf.hidden_states(student) if self.hidden_weight else contextlib.nullcontext()) as seen, \
                (hf.hidden_states(self.model) if self.hidden_weight else contextlib.nullcontext()) as t_seen:

            def loss_fn(out: torch.Tensor, targets: torch.Tensor | None, idx: torch.Tensor):
                if self.outputs is not None:
                    target = self.outputs[idx]
                else:
                    with torch.no_grad():
                        x = as_model_input(self.data.inputs[idx.cpu()], float_dtype(self.model))
                        target = self.model(x.to(out.device)).float()
                loss = output_loss(self.loss, out.float(), target, self.temperature)
                parts = {f"{self.loss}_loss": loss.detach()}
                if self.hidden_weight:
                    h = hidden_loss(seen["hidden"], t_seen["hidden"], seen["mask"])
                    parts["hidden_loss"] = h.detach()
                    loss = loss + self.hidden_weight * h
                return loss, parts

            try:
                yield loss_fn
            finally:
                if self.model is not None:
                    self.model.to("cpu")

    def measure(self, student: nn.Module) -> dict:
        """Fidelity of `student` to the teacher on `measure_on` (and accuracy when it is labelled)."""
        out = predict(student, self.measure_on.inputs).cpu()
        figures = fidelity(self.reference, out, class_logits=self.class_logits)
        if self.measure_on.targets is not None and out.ndim == 2:
            figures["accuracy"] = evaluate(student, self.measure_on)["accuracy"]
        return figures


def prepare(model: nn.Module, cfg, ctx: Context) -> Teacher | None:
    """With cfg.recover: the teacher, taken from `model` before the step changes it; else None."""
    if not cfg.recover or ctx.data is None:
        return None
    data = rows(ctx.data, cfg.max_samples, ctx.seed)
    return Teacher.of(model, data, ctx, loss=cfg.recover_loss, temperature=cfg.temperature,
                      hidden_weight=cfg.hidden_weight)


def fine_tune(model: nn.Module, cfg, ctx: Context, *, teacher: Teacher | None, label: str, seed_offset: int = 0,
              after_step=None) -> list[dict]:
    """Fine-tune after a compression step (cfg: a FineTune config): against `teacher` when there is one, else
    on the labels with cross-entropy. `after_step` runs after every optimizer step (pruning masks).
    Returns the per-epoch history ([] when there is no data or no epoch)."""
    data = teacher.data if teacher is not None else rows(ctx.data, cfg.max_samples, ctx.seed)
    if data is None or cfg.finetune_epochs == 0:
        return []
    tcfg = TrainConfig(epochs=cfg.finetune_epochs, lr=cfg.lr, batch_size=cfg.batch_size)
    with torch.enable_grad(), (teacher.training(model, ctx.device) if teacher is not None
                               else contextlib.nullcontext(cross_entropy)) as loss_fn:
        return train(model, data, tcfg, ctx=ctx, loss_fn=loss_fn, description=label, seed_offset=seed_offset,
                     after_step=after_step)


def summary(teacher: Teacher | None, model: nn.Module, history: list[dict],
            before: dict | None) -> tuple[dict, list[str]]:
    """The step's `after` figures and notes for its fine-tuning: the recovery block (loss, samples, fidelity
    before and after, history) with a teacher, else the cross-entropy history."""
    if teacher is None:
        return ({"finetune_history": history} if history else {}), []
    after = teacher.measure(model)
    where = teacher.measure_on.path.name + ("" if teacher.held_out else " (training rows, not held out)")
    block = {"loss": teacher.loss, "hidden_weight": teacher.hidden_weight, "samples": len(teacher.data),
             "labelled": teacher.data.targets is not None, "measured_on": where,
             "teacher_outputs": "cached" if teacher.outputs is not None else "recomputed per batch",
             "fidelity_before": before, "fidelity_after": after, "history": history}
    change = (f"cosine {before['cosine_mean']:.4f} → {after['cosine_mean']:.4f}" if before
              else f"cosine {after['cosine_mean']:.4f}")
    notes = [f"recovery: {len(history)} epoch(s) on {len(teacher.data):,} samples against the input model "
             f"({teacher.loss} loss{', hidden states' if teacher.hidden_weight else ''}): {change} on {where}"]
    if before and after["cosine_mean"] < before["cosine_mean"]:
        notes.append("recovery lowered the fidelity it was meant to raise: try a lower --lr or fewer epochs")
    return {"recovery": block}, notes
