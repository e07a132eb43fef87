"""Latency you can trust: interleaved rounds, median and spread, claims only beyond the spread (issue 25, item 1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import DIGITS_TEACHER, DIGITS_TEST, MNIST1D_TEACHER, MNIST1D_TEST


@pytest.fixture
def busy_machine():
    """A background busy loop on one core for the duration of the test: a loaded machine."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def test_compare_same_file_twice_on_a_loaded_machine_claims_nothing(cli, busy_machine):
    r = cli("compare", MNIST1D_TEACHER, MNIST1D_TEACHER, "--data", MNIST1D_TEST, "--json", "-q", "--threads", "2",
            "--batch-size", "64")
    assert r.code == 0, r.stderr
    assert len(r.json["metrics"]) == 2  # the same path twice is two entries, not one overwritten
    for block in (m["latency_ms"] for m in r.json["metrics"].values()):
        assert block["rounds"] >= 10
        for key in ("batch_1", "batch_n"):
            q1, q3 = block[f"{key}_iqr"]
            assert q1 <= block[key] <= q3
    assert list(r.json["summary"]["latency"].values()) == [{"batch_1": "within spread", "batch_n": "within spread"}]
    assert not any("slower" in w or "faster" in w for w in r.json["warnings"])


def test_latency_claims_need_a_difference_beyond_the_spread():
    from modelzip_cli.measure.metrics import Timing, latency_change

    tight_fast, tight_slow = Timing(1.0, 0.98, 1.02, 20), Timing(2.0, 1.95, 2.05, 20)
    assert latency_change(tight_fast, tight_slow) == "slower"
    assert latency_change(tight_slow, tight_fast) == "faster"
    noisy = Timing(1.6, 0.9, 2.9, 20)  # 60% slower in the median, but half its rounds span 2 ms
    assert latency_change(tight_fast, noisy) is None
    assert latency_change(tight_fast, Timing(1.03, 1.029, 1.031, 20)) is None  # 3%: never a claim


def test_a_noisy_timing_is_no_slower_warning_but_one_noise_note():
    """The figures from the issue: a baseline inflated by load in one round is no 'output is slower'."""
    from modelzip_cli.commands.transform import _latency_warnings
    from modelzip_cli.measure.report import Report

    def block(median, q1, q3):
        return {"batch_1": median, "batch_1_iqr": [q1, q3], "batch_n": median, "batch_n_iqr": [q1, q3],
                "rounds": 20, "n": 256, "threads": 2, "load": 3.5}

    report = Report(command="quantize")
    report.metrics = {"input": {"latency_ms": block(22.2, 20.0, 600.0)},
                      "output": {"latency_ms": block(61.2, 21.0, 612.6)}}
    _latency_warnings(report)
    assert not any("slower" in w for w in report.warnings)
    notes = [w for w in report.warnings if w.startswith("machine is noisy (load 3.5")]
    assert len(notes) == 1


def test_transform_times_input_and_output_in_the_same_rounds(cli, tmp_path):
    out = tmp_path / "t.pruned.safetensors"
    r = cli("prune", DIGITS_TEACHER, "--ratio", "0.5", "-o", out, "--eval-data", DIGITS_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    before, after = r.json["metrics"]["input"]["latency_ms"], r.json["metrics"]["output"]["latency_ms"]
    assert before["rounds"] == after["rounds"] >= 10
    assert before["batch_n_iqr"][0] <= before["batch_n"] <= before["batch_n_iqr"][1]


def test_eval_reports_median_spread_and_rounds(cli):
    r = cli("eval", DIGITS_TEACHER, "--data", DIGITS_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    lat = r.json["metrics"][str(DIGITS_TEACHER)]["latency_ms"]
    assert lat["rounds"] >= 10 and len(lat["batch_1_iqr"]) == 2 and "load" in lat
