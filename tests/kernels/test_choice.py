"""kernels/choice.py: a kernel choice holds inside its block only, nested blocks included."""

from __future__ import annotations

import ast
from pathlib import Path

from modelzip_cli.kernels import choice
from modelzip_cli.kernels import weight_only as wo_kernels
from modelzip_cli.nn import int8

PACKAGE = Path(__file__).resolve().parents[2] / "modelzip_cli"


def test_a_choice_is_scoped_and_nests():
    outside = choice.current()
    with int8.use_backend("plain"):
        with int8.use_kernel("float"), wo_kernels.use_kernel("bf16"):
            assert (int8.backend(), int8.kernel(), wo_kernels.forced()) == ("plain", "float", "bf16")
        assert int8.backend() == "plain" and choice.current().weight_only is None
    assert choice.current() == outside


def test_no_module_sets_kernel_state_for_the_process():
    """No `global` statement anywhere in modelzip: scoped choices, registries and caches only."""
    offenders = [f"{p.relative_to(PACKAGE)}:{n.lineno}" for p in PACKAGE.rglob("*.py")
                 for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Global)]
    assert offenders == []
