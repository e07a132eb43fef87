"""measure/report.py: the quality gate is an object; its failures are rendered, never re-parsed."""

from __future__ import annotations

from modelzip_cli.measure.report import Gate, Report


def test_a_failed_gate_keeps_each_reason_and_the_report_json_is_flat():
    gate = Gate(judged_on="held-out half", max_accuracy_drop=1.0, accuracy_drop=2.5)
    gate.fail("accuracy dropped 2.50 points, more than --max-accuracy-drop 1.0")
    d = Report(command="prune", gate=gate).to_dict()["gate"]
    assert d == {"passed": False, "judged_on": "held-out half", "max_accuracy_drop": 1.0, "accuracy_drop": 2.5,
                 "failures": ["accuracy dropped 2.50 points, more than --max-accuracy-drop 1.0"]}
    assert Report(command="prune").to_dict()["gate"] is None
