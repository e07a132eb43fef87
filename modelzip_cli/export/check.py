"""Whether an exported quantized model agrees with the PyTorch model it came from: the one tolerance every
quantized export (ONNX int8/int4, GGUF) is held to before `export` says done.

The figures are measured on `--eval-data` (else the example input): the cosine of the exported file's outputs
to the PyTorch model's, sample by sample, and for causal language models on token windows (GGUF) the
perplexity of both. The export agrees when

- causal LM with perplexity on both sides: perplexity within MAX_PPL_PCT percent (either way);
- otherwise: mean cosine ≥ the way's minimum (MIN_COSINE; a file re-quantized by another tool, ONNX
  Runtime's quantizer, is a second rounding of the float parent and is held to MIN_COSINE_REQUANTIZED).

A disagreement is a failed quality gate (exit 1, the file and the report are written, the report gives
both sides' figures): nothing silently wrong is ever exit 0.
"""

from __future__ import annotations

MIN_COSINE = 0.999  # the file holds modelzip's own integers: only float rounding may differ
MIN_COSINE_REQUANTIZED = 0.99  # --int8 ort: ONNX Runtime's quantizer rounds the float parent again
MAX_PPL_PCT = 1.0  # percent of the PyTorch model's perplexity, either way


def agreement(fid: dict, *, perplexity: tuple[float, float] | None = None, min_cosine: float = MIN_COSINE,
              max_ppl_pct: float = MAX_PPL_PCT) -> dict:
    """The agreement figures and verdict: `fid` (measure.fidelity of the file's outputs to the PyTorch model's)
    and, for causal LMs on token windows, `perplexity` (PyTorch, file)."""
    result = {"cosine_mean": round(fid["cosine_mean"], 6), "cosine_min": round(fid["cosine_min"], 6),
              "min_cosine": min_cosine, "samples": fid.get("samples")}
    if perplexity is not None:
        before, after = perplexity
        change = (after / before - 1) * 100
        result.update(criterion="perplexity", perplexity_pytorch=round(before, 4), perplexity_export=round(after, 4),
                      ppl_change_pct=round(change, 4), max_ppl_pct=max_ppl_pct,
                      passed=bool(abs(change) <= max_ppl_pct))
    else:
        result.update(criterion="cosine", passed=bool(fid["cosine_mean"] >= min_cosine))
    return result


def describe(result: dict) -> str:
    """One line with both sides' figures, for the warning of a failed check."""
    if result["criterion"] == "perplexity":
        return (f"perplexity {result['perplexity_pytorch']:.3f} (PyTorch) → {result['perplexity_export']:.3f} "
                f"(exported), {result['ppl_change_pct']:+.2f}%, beyond ±{result['max_ppl_pct']}%")
    return (f"cosine to the PyTorch model mean {result['cosine_mean']:.4f} (min {result['cosine_min']:.4f}), "
            f"below {result['min_cosine']}")


def apply_gate(report, result: dict, what: str) -> None:
    """Record `result` as the report's export gate; a disagreement fails it with one line naming `what`."""
    from modelzip_cli.measure.report import Gate

    gate = report.gate if report.gate is not None else Gate()
    gate.export_agreement = result
    if not result["passed"]:
        gate.fail(f"{what} does not agree with its PyTorch model: {describe(result)}")
        report.warnings.append(f"quality gate failed: {gate.failures[-1]}")
    report.gate = gate
