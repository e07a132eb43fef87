"""What a new user reaches for first: -h, shell completion, errors as JSON under --json (issue 25, item 8)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DIGITS_TEACHER, DIGITS_TEST, one_line_error


@pytest.mark.parametrize("args", [["-h"], ["prune", "-h"], ["data", "text", "-h"]])
def test_dash_h_is_help(cli, args):
    r = cli(*args)
    assert r.code == 0, r.stderr
    assert "Usage: modelzip" in r.stdout and "--help" in r.stdout


def test_shell_completion_is_offered_and_shown(cli, monkeypatch):
    import typer.completion

    # typer finds the shell from the parent processes (a run under nohup or cron has none it knows): say bash
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    assert "--install-completion" in cli("--help").stdout
    r = cli("--show-completion")
    assert r.code == 0, r.stderr
    assert "_modelzip_completion" in r.stdout and "complete " in r.stdout


@pytest.mark.parametrize("args,error,hint", [
    (["prune", "no-such-model.pt", "--ratio", "0.3"], "no-such-model.pt: no such file", "check the path"),
    (["prune", str(DIGITS_TEACHER), "--zzzz"], "No such option: --zzzz", "see 'modelzip prune --help'"),
])
def test_errors_under_json_are_a_json_object_on_stdout(cli, tmp_path, args, error, hint):
    r = cli(*args, "-o", tmp_path / "out.safetensors", "--json")
    assert r.code == 2
    assert json.loads(r.stdout) == {"error": error, "hint": hint, "exit_code": 2}
    assert one_line_error(r) == f"modelzip: error: {error} ({hint})"  # stderr keeps its one line
    assert not (tmp_path / "out.safetensors").exists()


def test_a_failed_gate_under_json_prints_the_report_alone(cli, tmp_path):
    """Exit 1 writes the output and its report; stdout stays one JSON document, the report, whose gate says why."""
    r = cli("prune", DIGITS_TEACHER, "--ratio", "0.95", "-o", tmp_path / "p.safetensors", "--eval-data", DIGITS_TEST,
            "--min-fidelity", "0.9999", "--json", "-q")
    assert r.code == 1, r.stderr
    assert r.json["gate"]["passed"] is False
