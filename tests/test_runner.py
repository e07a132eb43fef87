"""The transform runner's guarantees: output checks before any work, atomic writes, the input untouched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from modelzip_cli.commands.transform import CommonOptions, default_output, run_transform
from modelzip_cli.errors import OutputError, UsageError
from modelzip_cli.measure.report import Step

from .conftest import DIGITS_TEACHER, DIGITS_TEST, one_line_error, validate_report


def identity(loaded, ctx):
    return [Step(op="identity", config={})]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_output_name():
    assert default_output(Path("a/model.pt"), "prune") == Path("a/model.pruned.pt")
    assert default_output(Path("m.safetensors"), "quantize") == Path("m.quantized.safetensors")


def test_transform_writes_checkpoint_and_report_and_keeps_input(tmp_path):
    before = sha(DIGITS_TEACHER)
    out = tmp_path / "out.safetensors"
    report = run_transform("prune", DIGITS_TEACHER, CommonOptions(output=out, eval_data=DIGITS_TEST,
                                                                  max_accuracy_drop=0.0), identity)
    assert sha(DIGITS_TEACHER) == before
    assert out.exists() and (tmp_path / "out.safetensors.json").exists()
    validate_report(report.to_dict())
    assert report.gate.passed and report.metrics["input"]["accuracy"] == report.metrics["output"]["accuracy"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("case", ["equal", "exists", "unwritable", "no folder", "report equals output"])
def test_bad_outputs_are_refused_before_any_work(tmp_path, case):
    called = []

    def apply(loaded, ctx):
        called.append(1)
        return []

    opts = CommonOptions(output=tmp_path / "o.safetensors")
    if case == "equal":
        opts.output = DIGITS_TEACHER
    elif case == "exists":
        opts.output.write_bytes(b"precious")
    elif case == "unwritable":
        opts.output = Path("/proc/modelzip-cannot-write-here.safetensors")
    elif case == "no folder":
        opts.output = tmp_path / "missing" / "o.safetensors"
    else:
        opts.report = opts.output
    with pytest.raises(UsageError) as caught:
        run_transform("prune", DIGITS_TEACHER, opts, apply)
    assert not called
    if case == "report equals output":  # refused as a collision, not by accident of its suffix
        assert "same file" in str(caught.value), caught.value
    if case == "exists":
        assert opts.output.read_bytes() == b"precious"
        opts.force = True
        run_transform("prune", DIGITS_TEACHER, opts, apply)
        assert opts.output.read_bytes() != b"precious"


def test_an_output_error_is_exit_2_with_one_line_and_nothing_written(cli, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    r = cli("prune", DIGITS_TEACHER, "--ratio", "0.5", "-o", out)
    assert r.code == 2 and "already exists" in one_line_error(r) and "--force" in r.stderr
    assert out.read_bytes() == b"precious" and not (tmp_path / "o.safetensors.json").exists()
    with pytest.raises(OutputError):  # the library raises the domain error; the CLI maps it
        run_transform("prune", DIGITS_TEACHER, CommonOptions(output=out), identity)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "o.pt"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        run_transform("prune", DIGITS_TEACHER, CommonOptions(output=out), identity)
    assert list(tmp_path.iterdir()) == []
