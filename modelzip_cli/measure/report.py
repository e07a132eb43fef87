"""The one report schema for every command, its JSON Schema, and its rich rendering on stderr."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from modelzip_cli.files import disk_bytes, files_of
from modelzip_cli.version import __version__

SCHEMA_VERSION = 1


@dataclass
class Step:
    """One technique applied once: its full config, before/after figures, per-layer table, notes."""

    op: str
    config: dict
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # also in the report's warnings


@dataclass
class Gate:
    """The quality gates of a run: each limit beside what was measured, and why it failed (one line each)."""

    passed: bool = True
    judged_on: str | None = None  # the held-out data the gate was judged on
    max_accuracy_drop: float | None = None
    accuracy_drop: float | None = None
    min_fidelity: float | None = None
    fidelity: float | None = None
    max_ppl_increase: float | None = None  # percent
    ppl_increase: float | None = None
    export_check: dict | None = None  # export --format hf | compressed-tensors: the written directory vs the model
    export_agreement: dict | None = None  # export: the written file against its PyTorch model (export/check.py)
    failures: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.passed = False
        self.failures.append(why)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Report:
    command: str
    input: dict | None = None  # path, sha256, parameters, bytes
    output: dict | None = None
    steps: list[Step] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)  # label (input, output, model path) → figures
    model: dict | None = None  # inspect: format, manifest, edits, layers
    summary: dict | None = None  # chain/compare: final comparison
    gate: Gate | None = None  # --max-accuracy-drop, --min-fidelity, --max-ppl-increase
    runtime: dict | None = None  # device, world_size (torchrun processes) and backend of the run
    warnings: list[str] = field(default_factory=list)
    report_path: str | None = None  # where this report is written (the summary's last line names it)
    schema_version: int = SCHEMA_VERSION
    tool_version: str = __version__

    def to_dict(self) -> dict:
        return {**asdict(self), "gate": self.gate.to_dict() if self.gate else None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON-able: {type(obj).__name__}")


def file_info(path: Path, parameters: int | None = None, *, hash_file: bool = True,
              read_from: Path | None = None, stop: threading.Event | None = None) -> dict:
    """Path, sha256 (streamed, 1 MB at a time), parameters and bytes of a file — or of a model directory,
    whose hash covers every file's relative name and contents in order. `read_from`: where its bytes are
    now (an output staged under a temporary name until the run commits). `stop`: set by another thread, the
    hashing ends early (its result unused)."""
    digest = None
    source = Path(read_from or path)
    if hash_file:
        h = hashlib.sha256()
        for item in files_of(source):
            if source.is_dir():
                h.update(str(item.relative_to(source)).encode() + b"\0")
            with open(item, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
                    if stop is not None and stop.is_set():
                        return {}
        digest = h.hexdigest()
    return {"path": str(path), "sha256": digest, "parameters": parameters, "bytes": disk_bytes(source)}


def schema() -> dict:
    return json.loads(resources.files("modelzip_cli").joinpath("report.schema.json").read_text())


# ---------------------------------------------------------------------------------------------------
# Rendering (stderr)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_acc(m: dict) -> str:
    return f"{m['accuracy'] * 100:.2f}%" if "accuracy" in m else "-"


CONFIG_LIST_ITEMS = 4  # a longer list (37 layer names) is shown as its length; the report has it whole


def _fmt_config(config: dict) -> str:
    """A step's options on one line, whole: `key=value` for each option set, a long list as its length."""
    parts = []
    for key, value in config.items():
        if value is None or value is False or value == [] or value == {}:
            continue
        if isinstance(value, list | tuple | dict) and len(value) > CONFIG_LIST_ITEMS:
            value = f"<{len(value)} {'keys' if isinstance(value, dict) else 'items'}>"
        elif isinstance(value, dict | list | tuple):
            value = json.dumps(value, default=str, separators=(",", ":"))
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _fmt_latency(lat: dict, key: str) -> str:
    """A median and, below it, its interquartile range: "0.540 (0.512–0.601)"."""
    if key not in lat:
        return "-"
    iqr = lat.get(f"{key}_iqr")
    return f"{lat[key]:.3f}" + (f" ({iqr[0]:.3f}–{iqr[1]:.3f})" if iqr else "")


def _fmt_fidelity(f: dict | None) -> list[str]:
    if not f:
        return ["-", "-", "-"]
    agree = f"{f['top1_agreement']:.2%}" if "top1_agreement" in f else "-"
    return [f"{f['cosine_mean']:.4f} / {f['cosine_min']:.4f}", agree, f"{f['max_abs_diff']:.4g}"]


def render(report: Report, console) -> None:
    """A short human summary; the JSON report is the full record."""
    from rich.markup import escape
    from rich.table import Table

    if report.model is not None:
        m = report.model
        console.print(f"[bold]{report.input['path']}[/]  {m['format']}  arch={m.get('arch')}  "
                      f"params={m['parameters']:,}  bytes={report.input['bytes']:,}")
        for e in m.get("edits", []):
            console.print(f"  edit: {e.get('kind')}")
        t = Table("layer", "type", "shape", "dtype/scheme", "sparsity", "bytes")
        for row in m["layers"]:
            sp = row.get("sparsity")
            t.add_row(row["name"], row.get("type", "-"), "×".join(map(str, row["shape"])) or "scalar",
                      row["scheme"], "-" if sp is None else f"{sp:.1%}", _fmt_bytes(row["bytes"]))
        console.print(t)
    for step in report.steps:
        if step.op == "analyze":
            _render_analysis(step, console)
    per_step = [s for s in report.steps if "metrics" in s.after]
    for step in report.steps:
        console.print(f"[bold]{step.op}[/] {escape(_fmt_config(step.config))}  ({step.duration_s:.1f}s)")
        for note in step.notes:
            console.print(f"  note: {escape(note)}")
    if per_step:
        t = Table("step", "op", "params", "bytes", "accuracy", "batch 1 ms", "batch N ms")
        for s in per_step:
            m, lat = s.after["metrics"], s.after["metrics"]["latency_ms"]
            t.add_row(str(s.config.get("step", "")), s.op, f"{s.after['parameters']:,}", _fmt_bytes(s.after["bytes"]),
                      _fmt_acc(m), f"{lat['batch_1']:.3f}", f"{lat['batch_n']:.3f}")
        console.print(t)
    if report.metrics:
        fidelity = any("fidelity" in m for m in report.metrics.values())
        lm = any("perplexity" in m for m in report.metrics.values())
        t = Table("model", *(["perplexity", "next-token agree"] if lm else ["accuracy", "loss"]), "params", "bytes",
                  "batch 1 ms", "batch N ms", *(["cosine mean/min", "top-1 agree", "max |Δ|"] if fidelity else []))
        for label, m in report.metrics.items():
            lat = m.get("latency_ms", {})
            extra = _fmt_fidelity(m.get("fidelity")) if fidelity else []
            quality = ([f"{m['perplexity']:.3f}" if "perplexity" in m else "-",
                        f"{m['next_token_agreement']:.2%}" if "next_token_agreement" in m else "-"] if lm else
                       [_fmt_acc(m), f"{m['loss']:.4f}" if "loss" in m else "-"])
            t.add_row(Path(label).name, *quality, f"{m.get('parameters', 0):,}", _fmt_bytes(m.get("bytes")),
                      _fmt_latency(lat, "batch_1"), f"{_fmt_latency(lat, 'batch_n')} N={lat.get('n', '-')}", *extra)
        console.print(t)
        rounds = {m.get("latency_ms", {}).get("rounds") for m in report.metrics.values()} - {None}
        if rounds:
            console.print(f"latency: median (interquartile range) over {min(rounds)} interleaved rounds")
    if report.summary and "latency" in report.summary:
        for label, claim in report.summary["latency"].items():
            console.print(f"{Path(label).name} against {Path(report.summary['reference']).name}: "
                          f"batch 1 {claim['batch_1']}, batch N {claim['batch_n']}")
    if report.summary and "compression_ratio" in report.summary:
        sm = report.summary
        drop = f", accuracy drop {sm['accuracy_drop']:.2f} pts" if "accuracy_drop" in sm else ""
        console.print(f"size −{sm['size_reduction_pct']:.1f}%, parameters −{sm['parameter_reduction_pct']:.1f}%, "
                      f"compression {sm['compression_ratio']:.1f}×{drop}")
    if report.input and report.output:
        i, o = report.input, report.output
        console.print(f"{i['path']} ({_fmt_bytes(i['bytes'])}, {i['parameters']:,} params) → "
                      f"{o['path']} ({_fmt_bytes(o['bytes'])}, {o['parameters']:,} params), "
                      f"{i['bytes'] / max(1, o['bytes']):.2f}× smaller on disk")
    if report.gate:
        g = report.gate
        status = "[green]passed[/]" if g.passed else "[red]FAILED[/]"
        parts = ([f"accuracy drop {g.accuracy_drop:.2f} pts (max {g.max_accuracy_drop})"]
                 if g.accuracy_drop is not None else []) + (
            [f"fidelity {g.fidelity:.4f} (min {g.min_fidelity})"] if g.fidelity is not None else []) + (
            [f"perplexity +{g.ppl_increase:.2f}% (max {g.max_ppl_increase}%)"] if g.ppl_increase is not None else [])
        check = g.export_check
        if check and check.get("relative") is not None:  # export: the written directory loaded back in its runtime
            parts.append(f"export reproduces the model to {check['relative']:.1e} of max |output| "
                         f"(max {check['tolerance']:g})")
        if g.export_agreement is not None:  # export/check.py: the exported file against its PyTorch model
            a = g.export_agreement
            parts.append(f"export perplexity {a['ppl_change_pct']:+.2f}% (max ±{a['max_ppl_pct']}%)"
                         if a["criterion"] == "perplexity" else
                         f"export cosine {a['cosine_mean']:.4f} (min {a['min_cosine']})")
        on = f" on {g.judged_on}" if g.judged_on else ""
        console.print(f"quality gate: {', '.join(parts)}{escape(on)} {status}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    if report.report_path:
        console.print(f"report: {report.report_path}", markup=False, highlight=False)


def _render_analysis(step: Step, console) -> None:
    """`analyze`: one row per layer, one column per candidate: loss, and bytes saved."""
    from rich.table import Table

    cands = list(dict.fromkeys(r["candidate"] for r in step.layers))
    plan = step.after.get("plan", {})
    assigned = {n: c for s in plan.get("steps", []) for n in s.get("include", [])
                for c in [_label_of(s)]}
    t = Table("layer", *cands, *(["plan"] if plan else []), title="loss of each layer alone (bytes saved)")
    for name in dict.fromkeys(r["name"] for r in step.layers):
        cells = {r["candidate"]: (f"{r['loss']:.2e} ({_fmt_bytes(r['bytes_saved'])})" if r["applies"] else "-")
                 for r in step.layers if r["name"] == name}
        t.add_row(name, *(cells.get(c, "-") for c in cands), *([assigned.get(name, "float")] if plan else []))
    console.print(t)
    if plan:
        budget = (f"fidelity ≥ {plan['budget_fidelity']}" if plan.get("budget_fidelity") is not None
                  else f"accuracy drop ≤ {plan.get('budget_accuracy_drop')} points")
        console.print(f"plan: {plan['layers']} layers compressed, {budget}, measured loss {plan['measured_loss']:.4g} "
                      f"({plan['unit']}) on {plan['measured_on']}")


def _label_of(step: dict) -> str:
    if step["op"] == "quantize":
        return "int8" if step.get("method") == "dynamic" else f"int{step.get('bits', 8)}"
    ratio = step.get("ratio", step.get("rank-ratio", step.get("rank_ratio")))
    return f"{step['op']}:{ratio}"
