"""A new method is one file: a config class, a handler registered by that class, and an Edit class.

Nothing else in modelzip is touched: the method is reached from the CLI (`--method`), its help, the report,
the checkpoint's edit log, and the replay that rebuilds the model on load. It is defined inside the test
and unregistered after it, so the rest of the suite sees the registry as shipped.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from pydantic import Field
from torch import nn

from modelzip_cli import load_model
from modelzip_cli.checkpoint.edits import Edit
from modelzip_cli.checkpoint.format import Manifest
from modelzip_cli.techniques.base import HANDLERS, MethodConfig, Result, Selection, register
from modelzip_cli.techniques.select import select_modules

from ..conftest import DIGITS_TEACHER


@pytest.fixture
def drop_bias():
    """`prune --method drop-bias --ratio R`: removes the bias of the R share of Linear layers whose biases are
    smallest (an illustration, not a useful technique)."""

    class DropBiasConfig(MethodConfig, Selection):
        op: ClassVar[str] = "prune"
        method: ClassVar[str] = "drop-bias"
        ratio: float = Field(ge=0, le=1)

    class DropBiasEdit(Edit):
        kind: ClassVar[str] = "test_drop_bias"
        layers: list[str]

        def replay(self, model: nn.Module, manifest: Manifest) -> nn.Module:
            for name in self.layers:
                model.get_submodule(name).bias = None
            return model

    @register(DropBiasConfig)
    def drop(model: nn.Module, cfg: DropBiasConfig, ctx) -> Result:
        linears = [n for n, m in select_modules(model, include=cfg.include, exclude=cfg.exclude, types=(nn.Linear,))
                   if m.bias is not None]
        linears.sort(key=lambda n: float(model.get_submodule(n).bias.norm()))
        chosen = linears[:round(cfg.ratio * len(linears))]
        edit = DropBiasEdit(layers=chosen)
        edit.replay(model, Manifest(arch=None))
        return Result(model, [edit], notes=[f"bias removed from {', '.join(chosen) or 'no layer'}"])

    yield DropBiasConfig
    del HANDLERS[DropBiasConfig]
    del Edit.KINDS[DropBiasEdit.kind]


def test_a_method_in_one_file_runs_end_to_end(drop_bias, cli, tmp_path):
    out = tmp_path / "m.safetensors"
    r = cli("prune", DIGITS_TEACHER, "--method", "drop-bias", "--ratio", "0.5", "-o", out, "--json")
    assert r.code == 0, r.stderr
    step = r.json["steps"][0]
    assert step["config"]["method"] == "drop-bias" and step["config"]["ratio"] == 0.5
    dropped = [n.removeprefix("bias removed from ") for n in step["notes"] if n.startswith("bias removed")]
    assert dropped and dropped[0] != "no layer"

    reference = load_model(DIGITS_TEACHER)
    model = load_model(out)  # rebuilt by replaying the new edit, then loaded strictly
    names = dropped[0].split(", ")
    assert all(model.get_submodule(n).bias is None for n in names)
    for n in names:
        reference.get_submodule(n).bias = None
    x = torch.randn(8, 64)
    assert torch.equal(model(x), reference(x))

    shown = cli("prune", "--method", "drop-bias", "--help").stdout
    assert "--ratio" in shown and "--steps" not in shown  # gradual's option is not drop-bias's


def test_an_unknown_method_is_still_one_line(cli):
    r = cli("prune", DIGITS_TEACHER, "--method", "drop-bias", "--ratio", "0.5")
    assert r.code == 2 and "unknown prune method 'drop-bias'" in r.stderr
