"""`modelzip distill`: train a student against a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    TRANSFORM_OPTIONS,
    HiddenWeight,
    Input,
    command,
    given,
    parse_json_object,
    technique,
)
from modelzip_cli.errors import InputError, UsageError, first_line


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
        from modelzip_cli.commands.transform import default_output, default_report
        from modelzip_cli.files import Target, check_distinct, check_targets
        from modelzip_cli.measure.plot import require_matplotlib

        require_matplotlib()
        output = shared.output or default_output(teacher, "distill")
        check_distinct({"output": output, "report": shared.report or default_report(output), "plot": plot})
        check_targets([Target("plot", plot, (".png",))], force=shared.force,
                      inputs=[teacher, data, val_data, shared.eval_data, *student_path])
    report = technique("distill", None, teacher, shared, values, files={"data": data, "val_data": val_data},
                       extra_inputs=student_path, trusted_refs=frozenset({student}))
    if plot is not None and report is not None:  # None: a torchrun rank other than 0
        from modelzip_cli.measure.plot import plot_history

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
