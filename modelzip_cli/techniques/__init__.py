"""The techniques, and the one registry that maps an op name to its configs, function and dry-run plan.

Every technique module defines its config classes (one per method) and an `OP` entry; this is the only
list of ops. Every technique function has the same shape:
    apply(model, config, ctx, manifest) -> Result
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelzip_cli.errors import UsageError
from modelzip_cli.techniques import distill, lowrank, prune, prune_decoder, quantize  # noqa: F401  (registers)
from modelzip_cli.techniques.base import DATA_FLAGS, MethodConfig, Op, Result

OPS: dict[str, Op] = {op.name: op for op in (distill.OP, prune.OP, lowrank.OP, quantize.OP)}

__all__ = ["OPS", "MethodConfig", "Op", "Result", "make_config", "check_data_needs"]


def make_config(op: str, method: str | None, values: dict[str, Any], *, where: str = "") -> MethodConfig:
    """The validated config of `op`/`method` from user values (CLI flags or a recipe step)."""
    if op not in OPS:
        raise UsageError(f"{where}unknown op {op!r}", hint="use one of " + ", ".join(OPS))
    return OPS[op].config(method, values, where=where)


def check_data_needs(cfg: MethodConfig, given: dict[str, Path | None], *, where: str) -> None:
    """Refuse, before any work, a method whose data files are missing. `given`: key → file or None."""
    for need in sorted(cfg.required_data()):
        if given.get(need) is None:
            what, flag = DATA_FLAGS[need]
            raise UsageError(f"{where} needs {what}", hint=f"pass {flag} FILE")
