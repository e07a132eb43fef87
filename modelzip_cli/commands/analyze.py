"""`analyze`: what compressing each layer alone costs, and a plan that compresses each layer as far as a
whole-model budget allows.

For every selected Linear and every candidate (int8, int4, prune:R, lowrank:R), and every selected
Embedding table for int8 and int4 (weight-only: a looked-up row is dequantized; in encoders the vocabulary
table is often the largest tensor), the layer alone is replaced by its compressed form inside the float
model, and the model is scored on the data against its own float outputs (1 − mean cosine; accuracy points
lost with labels), beside the bytes it saves and the change in that layer's measured time on its own
recorded inputs. Each candidate layer is built by the technique's own code (the one `chain` runs), on that
layer alone.

A plan (`--budget-fidelity` / `--budget-accuracy-drop`): per layer the candidate that saves most while the
summed single-layer losses stay within the budget (greedy by loss per byte saved, leaving a fifth of the
budget for data the plan has not seen), then the whole plan is built by `chain`'s own step code and scored
on the data; while it misses, the last upgrades are undone. The plan is a recipe (`chain --recipe`), with a
`[plan]` table that records how it was made.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modelzip_cli.checkpoint.edits import is_quantized
from modelzip_cli.checkpoint.format import Manifest, encode_state
from modelzip_cli.checkpoint.io import Loaded
from modelzip_cli.commands.chain import RecipeStep, check_order, parse_recipe
from modelzip_cli.commands.transform import CommonOptions, apply_technique, load_dataset, load_input, split_held_out
from modelzip_cli.errors import UsageError
from modelzip_cli.measure.report import Report, Step, file_info
from modelzip_cli.pipeline.context import Context
from modelzip_cli.pipeline.data import Dataset
from modelzip_cli.techniques import MethodConfig, make_config, quantize
from modelzip_cli.techniques.select import select_modules
from modelzip_cli.techniques.sensitivity import Scorer, swapped

DEFAULT_CANDIDATES = "int8,int4,prune:0.3,prune:0.5,lowrank:0.5"
PLAN_MARGIN = 0.2  # the greedy pass spends at most 80% of the budget: held-out data differs a little
MAX_VERIFY = 8  # whole-plan measurements before giving up backing off


@dataclass(frozen=True)
class Candidate:
    """One way to compress one layer: the config of the step that does it, without the layer list."""

    label: str  # as the user wrote it: int8, prune:0.3, ...
    config: MethodConfig

    def step(self, layers: list[str]) -> MethodConfig:
        return self.config.model_copy(update={"include": sorted(layers)})


CANDIDATES = {  # label → (op, method, values); prune and lowrank take the ratio after a colon
    "int8": ("quantize", "dynamic", {}),
    "int4": ("quantize", "weight-only", {"bits": 4}),
    "prune": ("prune", "magnitude", {"scope": "layer", "finetune_epochs": 0}),
    "lowrank": ("lowrank", None, {"finetune_epochs": 0}),
}
RATIO_KEYS = {"prune": "ratio", "lowrank": "rank_ratio"}


def parse_candidates(text: str) -> list[Candidate]:
    """"int8,int4,prune:0.3,lowrank:0.5" → candidates; a bad one is one line naming it."""
    out: list[Candidate] = []
    for raw in [t.strip() for t in text.split(",") if t.strip()]:
        m = re.fullmatch(r"(int8|int4|prune|lowrank)(?::([0-9.]+))?", raw)
        if not m or (m[1] in ("prune", "lowrank")) != (m[2] is not None):
            raise UsageError(f"--techniques: {raw!r} is not a candidate",
                             hint="use int8, int4, prune:R (0 < R < 1) or lowrank:R (0 < R ≤ 1)")
        ratio = float(m[2]) if m[2] is not None else None
        if ratio is not None and not (0 < ratio < 1 or (m[1] == "lowrank" and ratio == 1)):
            raise UsageError(f"--techniques: the ratio of {raw!r} must be in (0, 1)")
        op, method, values = CANDIDATES[m[1]]
        if m[1] in RATIO_KEYS:
            values = {**values, RATIO_KEYS[m[1]]: ratio}
        cand = Candidate(raw, make_config(op, method, values, where="--techniques: "))
        if cand.label not in {c.label for c in out}:
            out.append(cand)
    if not out:
        raise UsageError("--techniques lists no candidate", hint=f"e.g. --techniques {DEFAULT_CANDIDATES}")
    return out


@dataclass
class AnalyzeOptions:
    data: Path
    techniques: str = DEFAULT_CANDIDATES
    include: list[str] | None = None
    exclude: list[str] | None = None
    samples: int | None = None  # samples scored per candidate (default: 32 without labels, all ≤ 2048 with)
    budget_fidelity: float | None = None
    budget_accuracy_drop: float | None = None
    plan_out: Path | None = None
    report: Path | None = None
    plot: Path | None = None  # a heat map of the losses (PNG)
    force: bool = False
    eval_data: Path | None = None  # held-out data a plan's budget is judged on (default: a seeded half of data)


@dataclass
class Analysis:
    rows: list[dict] = field(default_factory=list)  # one per (layer, candidate)
    unit: str = "1 - cosine"
    plan: dict | None = None
    embeddings: list[str] = field(default_factory=list)  # the Embedding tables among the rows


def embedding_names(model: nn.Module, opts: AnalyzeOptions) -> list[str]:
    """The Embedding tables --include / --exclude select (none selected is not an error: a model may have none)."""
    from modelzip_cli.techniques.select import matches

    return [n for n, m in model.named_modules() if n and isinstance(m, nn.Embedding)
            and (not opts.include or matches(n, opts.include)) and not (opts.exclude and matches(n, opts.exclude))]


# ---------------------------------------------------------------------------------------------------
# One layer, one candidate


def _holder(layer: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.add_module("layer", copy.deepcopy(layer))
    return holder


def _stored_bytes(module: nn.Module) -> int:
    tensors, _, _ = encode_state(module.state_dict())
    return sum(t.numel() * t.element_size() for t in tensors.values())


EMBEDDING_CANDIDATES = ("int8", "int4")  # weight-only tables; pruning or factorizing a lookup is not offered


def embedding_step(cand: Candidate) -> Candidate:
    """The candidate as it applies to an Embedding table: weight-only at its bits."""
    values = {"bits": 8 if cand.label == "int8" else 4, "embeddings": True}
    return Candidate(cand.label, make_config("quantize", "weight-only", values))


def build_candidate(layer: nn.Module, cand: Candidate, inputs: torch.Tensor | None, absmax: torch.Tensor | None,
                    ctx: Context) -> nn.Module | None:
    """`layer` compressed by `cand`, with the technique's own code on that layer alone; None when the
    technique leaves it as it is (a rank at or above break-even, an Embedding it does not apply to)."""
    if isinstance(layer, nn.Embedding):
        if cand.label not in EMBEDDING_CANDIDATES:
            return None
        cand = embedding_step(cand)
    elif cand.label == "int8":  # the smoothing strength is chosen as quantize does, on the layer's recorded inputs
        from modelzip_cli.nn import int8

        smooth = None
        if inputs is not None:
            _, smooth, _ = quantize.best_smoothing(layer, absmax, inputs, "per-token")
        return int8.DynamicInt8Linear.from_float(layer, "per-token", smooth)
    from modelzip_cli.techniques import OPS

    cfg = cand.step(["layer"])
    holder = _holder(layer)
    result = OPS[cfg.op].apply(holder, cfg, Context(seed=ctx.seed), Manifest(arch=None))
    new = result.model.get_submodule("layer")
    return None if not result.edits else new


def _time_ms(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    with torch.inference_mode():
        module(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


# ---------------------------------------------------------------------------------------------------
# The analysis


def analyze(loaded: Loaded, data: Dataset, opts: AnalyzeOptions, ctx: Context,
            held_out: Dataset | None = None) -> Analysis:
    model = loaded.model.eval()
    candidates = parse_candidates(opts.techniques)
    names = [n for n, _ in select_modules(model, include=opts.include, exclude=opts.exclude, types=(nn.Linear,),
                                          what="Linear")]
    tables = embedding_names(model, opts)
    labelled = data.targets is not None and opts.budget_fidelity is None
    n = opts.samples or (min(len(data), 2048) if labelled else 32)
    subset = Dataset(inputs=data.inputs[:n], targets=data.targets[:n] if data.targets is not None else None,
                     path=data.path)
    scorer = Scorer(model, subset.inputs, subset.targets if labelled else None)
    # every layer's inputs recorded once, on a few calibration batches (smoothing and timing use them)
    qcfg = quantize.DynamicConfig(calib_batches=2, calib_batch_size=32)
    absmax, inputs = quantize._calibration_inputs(model, names, Context(seed=ctx.seed, calib_data=subset,
                                                                        progress=ctx.progress), qcfg)
    analysis = Analysis(unit=scorer.unit)
    analysis.embeddings = tables
    table_cands = [c for c in candidates if c.label in EMBEDDING_CANDIDATES]
    with ctx.progress("analyze", len(names) * len(candidates) + len(tables) * len(table_cands)) as bar:
        for name in names + tables:
            layer = model.get_submodule(name)
            x = inputs.get(name)
            base_bytes = _stored_bytes(layer)
            base_ms = _time_ms(layer, x) if x is not None else None
            for cand in (table_cands if name in tables else candidates):
                new = build_candidate(layer, cand, x, absmax.get(name), ctx)
                row = {"name": name, "candidate": cand.label, "shape": list(layer.weight.shape),
                       "scheme": cand.label + (" weight-only (table)" if name in tables else ""), "bytes": base_bytes,
                       "bytes_saved": 0, "loss": 0.0,
                       "latency_ms": base_ms, "latency_delta_ms": 0.0, "applies": new is not None}
                if new is not None:
                    with swapped(model, name, new):
                        row["loss"] = round(scorer.loss(model), 6)
                    row["bytes"] = _stored_bytes(new)
                    row["bytes_saved"] = base_bytes - row["bytes"]
                    if x is not None:
                        row["latency_ms"] = round(_time_ms(new, x), 4)
                        row["latency_delta_ms"] = round(row["latency_ms"] - base_ms, 4)
                analysis.rows.append(row)
                bar.advance(layer=name.rsplit(".", 2)[-2] if "." in name else name, candidate=cand.label)
    if opts.budget_fidelity is not None or opts.budget_accuracy_drop is not None:
        analysis.plan = make_plan(loaded, data, analysis, candidates, opts, ctx, held_out)
    return analysis


# ---------------------------------------------------------------------------------------------------
# Plans


def greedy(rows: list[dict], budget: float) -> list[tuple[str, str]]:
    """Upgrades (layer, candidate) in the order taken: each time the one with the least added loss per added
    byte saved, while the summed single-layer losses stay within `budget`. A layer takes one candidate."""
    options: dict[str, list[dict]] = {}
    for r in rows:
        if r["applies"] and r["bytes_saved"] > 0:
            options.setdefault(r["name"], []).append(r)
    current: dict[str, dict] = {}
    spent, taken = 0.0, []
    while True:
        best = None
        for name, opts in options.items():
            cur = current.get(name)
            cur_loss, cur_saved = (max(cur["loss"], 0.0), cur["bytes_saved"]) if cur else (0.0, 0)
            for r in opts:
                gain = r["bytes_saved"] - cur_saved
                cost = max(r["loss"], 0.0) - cur_loss
                if gain <= 0 or spent + cost > budget:
                    continue
                key = cost / gain
                if best is None or key < best[0]:
                    best = (key, name, r, cost)
        if best is None:
            return taken
        _, name, r, cost = best
        current[name] = r
        spent += cost
        taken.append((name, r["candidate"]))


def assignment(taken: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, cand in taken:
        out[name] = cand
    return out


STEP_ORDER = ("prune", "lowrank", "quantize")  # float-only steps first; quantize takes what is left in float


def plan_steps(assigned: dict[str, str], candidates: list[Candidate], tables: list[str] = ()) -> list[MethodConfig]:
    """The recipe steps of an assignment (layer → candidate label); Embedding `tables` get weight-only steps."""
    steps = []
    for op in STEP_ORDER:
        for cand in candidates:
            layers = [n for n, c in assigned.items() if c == cand.label and n not in tables]
            if cand.config.op == op and layers:
                steps.append(cand.step(layers))
    for cand in candidates:
        layers = [n for n, c in assigned.items() if c == cand.label and n in tables]
        if layers:
            steps.append(embedding_step(cand).step(layers))
    return steps


def _run_steps(loaded: Loaded, steps: list[MethodConfig], data: Dataset, ctx: Context) -> nn.Module:
    """The model the steps make, by the same code `chain` runs (calibrating on `data`)."""
    check_order([RecipeStep(i, cfg) for i, cfg in enumerate(steps, 1)])
    work = Loaded(model=copy.deepcopy(loaded.model), manifest=copy.deepcopy(loaded.manifest))
    for cfg in steps:
        c = Context(seed=ctx.seed, calib_data=data, example_input=ctx.example_input)
        apply_technique(cfg, work, c)
    return work.model.eval()


def make_plan(loaded: Loaded, data: Dataset, analysis: Analysis, candidates: list[Candidate],
              opts: AnalyzeOptions, ctx: Context, held_out: Dataset | None = None) -> dict:
    """The plan: chosen and verified on `data`; its figure, `measured_loss`, is on `held_out` (data that chose
    nothing), when given."""
    fidelity_budget = opts.budget_fidelity is not None
    budget = (1 - opts.budget_fidelity) if fidelity_budget else opts.budget_accuracy_drop
    labelled = not fidelity_budget
    taken = greedy(analysis.rows, budget * (1 - PLAN_MARGIN))
    verify = Dataset(inputs=data.inputs[:256 if not labelled else 2048],
                     targets=data.targets[:2048] if labelled else None, path=data.path)
    scorer = Scorer(loaded.model, verify.inputs, verify.targets if labelled else None)
    tried = []
    kept = len(taken)
    for attempt in range(MAX_VERIFY):
        steps = plan_steps(assignment(taken[:kept]), candidates, analysis.embeddings)
        if not steps:
            loss = 0.0
            tried.append({"upgrades": 0, "loss": 0.0})
            break
        model = _run_steps(loaded, steps, verify, ctx)
        loss = scorer.loss(model)
        tried.append({"upgrades": kept, "loss": round(loss, 6)})
        if loss <= budget:
            break
        kept = kept - max(1, math.ceil(kept * 0.15 * (attempt + 1)))  # undo the last upgrades, more each time
        kept = max(kept, 0)
    else:
        steps, loss = [], 0.0
        tried.append({"upgrades": 0, "loss": 0.0})
    assigned = assignment(taken[:kept]) if steps else {}
    saved = sum(r["bytes_saved"] for r in analysis.rows if assigned.get(r["name"]) == r["candidate"])
    split = held_out is not None and held_out.path == data.path
    tuned_on = f"{len(verify)} samples of {data.path.name}" + (" (tuning part)" if split else "")
    measured_loss, measured_on = loss, tuned_on
    if held_out is not None:
        check = Dataset(inputs=held_out.inputs[:256 if not labelled else 2048],
                        targets=held_out.targets[:2048] if labelled else None, path=held_out.path)
        final = _run_steps(loaded, steps, verify, ctx) if steps else loaded.model
        measured_loss = Scorer(loaded.model, check.inputs, check.targets if labelled else None).loss(final)
        measured_on = f"{len(check)} held-out samples of {held_out.path.name}"
    meta = {"budget_fidelity" if fidelity_budget else "budget_accuracy_drop":
            opts.budget_fidelity if fidelity_budget else opts.budget_accuracy_drop,
            "measured_loss": round(measured_loss, 6), "unit": scorer.unit, "measured_on": measured_on,
            "tuning_loss": round(loss, 6), "tuned_on": tuned_on,
            "bytes_saved_estimate": int(saved), "layers": len(assigned)}
    return {"meta": meta, "steps": [cfg.to_recipe() for cfg in steps], "assigned": assigned, "verification": tried}


def _printable(text: str) -> str:
    """`text` on one line, every character that is not printable escaped: fit for a TOML comment."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def plan_toml(plan: dict, model: Path) -> str:
    """The plan as a chain recipe (TOML written by tomli-w). The model's path is only in a comment, escaped:
    a path with a newline never adds a line (a step) to the plan."""
    import tomli_w

    head = ["# modelzip plan, written by `modelzip analyze`: a recipe for",
            f"#   modelzip chain {_printable(str(model))} --recipe THIS_FILE --data CALIBRATION_DATA", ""]
    body = tomli_w.dumps({"plan": plan["meta"], "steps": plan["steps"]})
    return "\n".join(head) + "\n" + body


# ---------------------------------------------------------------------------------------------------
# The command


def run_analyze(model_path: Path, opts: AnalyzeOptions, common: CommonOptions, progress) -> Report:
    from modelzip_cli.checkpoint.layers import count_parameters
    from modelzip_cli.files import Outputs, Target, check_targets

    if opts.budget_fidelity is not None and opts.budget_accuracy_drop is not None:
        raise UsageError("give one of --budget-fidelity and --budget-accuracy-drop")
    if opts.budget_fidelity is not None and not 0 < opts.budget_fidelity <= 1:
        raise UsageError(f"--budget-fidelity is a mean cosine in (0, 1], got {opts.budget_fidelity}")
    if opts.budget_accuracy_drop is not None and not opts.budget_accuracy_drop >= 0:
        raise UsageError(f"--budget-accuracy-drop must be ≥ 0 points, got {opts.budget_accuracy_drop}")
    if opts.plan_out is not None and opts.budget_fidelity is None and opts.budget_accuracy_drop is None:
        raise UsageError("--plan-out needs a budget", hint="pass --budget-fidelity F or --budget-accuracy-drop P")
    if opts.samples is not None and opts.samples < 1:
        raise UsageError(f"--samples must be ≥ 1, got {opts.samples}")
    parse_candidates(opts.techniques)
    if opts.plan_out is not None and opts.plan_out.suffix != ".toml":
        raise UsageError(f"--plan-out {opts.plan_out} must end in .toml")
    targets = [Target(role, path, suffixes) for role, path, suffixes in (
        ("plan", opts.plan_out, (".toml",)), ("report", opts.report, (".json",)), ("plot", opts.plot, (".png",)))
        if path is not None]
    inputs = [model_path, opts.data, *([opts.eval_data] if opts.eval_data else [])]
    check_targets(targets, inputs=inputs, force=opts.force)  # before any work
    loaded = load_input(model_path, common)
    if is_quantized(loaded.manifest):
        raise UsageError(f"{model_path} is already quantized; analyze works on float models")
    labels = opts.budget_accuracy_drop is not None
    data = load_dataset(opts.data, loaded, require_targets=labels)
    budget = opts.budget_fidelity is not None or opts.budget_accuracy_drop is not None
    held_out, split = None, None
    if budget:  # a plan's budget is judged on data that chose nothing: --eval-data, else a seeded half of --data
        if opts.eval_data is not None and Path(opts.eval_data).resolve() != Path(opts.data).resolve():
            held_out = load_dataset(opts.eval_data, loaded, require_targets=labels)
        else:
            data, held_out = split_held_out(data, common.seed)
            split = (f"--data split (seed {common.seed}): {len(data)} samples choose and verify the plan, the other "
                     f"{len(held_out)} judge its budget")
    ctx = Context(seed=common.seed, progress=progress,
                  example_input=loaded.manifest.example_input() if loaded.manifest.input_shape else None)
    torch.manual_seed(common.seed)
    t0 = time.perf_counter()
    from modelzip_cli.measure.metrics import num_threads

    with num_threads(common.threads or torch.get_num_threads()):
        analysis = analyze(loaded, data, opts, ctx, held_out)
    notes = [f"loss: {analysis.unit} of the whole model with that layer alone compressed, against the float "
             "model on the data; bytes_saved: stored bytes of the layer; latency_delta_ms: the layer's own "
             "time on its recorded inputs (negative: faster)"]
    warnings: list[str] = []
    after: dict = {}
    plan_text = None
    if split:
        notes.append(split)
    if analysis.plan is not None:
        plan = analysis.plan
        after["plan"] = {**plan["meta"], "steps": plan["steps"], "verification": plan["verification"]}
        meta = plan["meta"]
        limit = 1 - opts.budget_fidelity if opts.budget_fidelity is not None else opts.budget_accuracy_drop
        if meta["measured_loss"] > limit:
            warnings.append(f"the plan misses its budget on held-out data: {meta['unit']} {meta['measured_loss']:.4g} "
                            f"> {limit:.4g} on {meta['measured_on']} ({meta['tuning_loss']:.4g} on the data that "
                            "chose it); ask for a tighter budget")
        if opts.plan_out is not None:
            plan_text = plan_toml(plan, model_path)
            parse_recipe(opts.plan_out, text=plan_text)  # a valid recipe, checked before anything is written
            after["plan"]["path"] = str(opts.plan_out)
            notes.append(f"plan written to {opts.plan_out}: modelzip chain {model_path} --recipe {opts.plan_out} "
                         f"--data {opts.data}")
    step = Step(op="analyze", config={"techniques": opts.techniques, "include": opts.include,
                                      "exclude": opts.exclude, "samples": opts.samples,
                                      "budget_fidelity": opts.budget_fidelity,
                                      "budget_accuracy_drop": opts.budget_accuracy_drop},
                layers=analysis.rows, after=after, duration_s=round(time.perf_counter() - t0, 3), notes=notes)
    report = Report(command="analyze", input=file_info(model_path, count_parameters(loaded.model)), steps=[step],
                    warnings=warnings, report_path=None if opts.report is None else str(opts.report))
    with Outputs() as staged:  # plan, plot and report are renamed into place together
        if plan_text is not None:
            staged.write(opts.plan_out, lambda tmp: tmp.write_text(plan_text, encoding="utf-8"))
        if opts.plot is not None:
            from modelzip_cli.measure.plot import plot_sensitivity

            plot_sensitivity(analysis.rows, opts.plot, staged)
        if opts.report is not None:
            staged.write(opts.report, lambda tmp: tmp.write_text(report.to_json()))
        staged.commit()
    return report
