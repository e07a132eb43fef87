"""checkpoint/edits.py: every edit kind reads back through its own class, and nothing else names it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from modelzip_cli.checkpoint.edits import Edit, LowRankEdit, WeightOnlyEdit, is_quantized, replay_edits
from modelzip_cli.checkpoint.format import Manifest
from modelzip_cli.errors import InputError

PACKAGE = Path(__file__).resolve().parents[2] / "modelzip_cli"
EXAMPLES = {  # kind → fields of a valid edit
    "prune_magnitude": {"ratio": 0.5, "scope": "layer", "layers": ["0"]},
    "prune_unstructured": {"method": "wanda", "ratio": 0.5, "layers": ["0"]},
    "prune_structured": {"ratio": 0.25, "history": [["0", True, [1, 2]]]},
    "prune_heads": {"ratio": 0.5, "blocks": [["a.q", "a.k", "a.v", "a.o", 4, [0]]]},
    "lowrank": {"ranks": {"0": 2}},
    "quantize_weight_only": {"modules": ["0"], "bits": 4, "group_size": 32},
    "quantize_dynamic": {"modules": ["0"], "activations": "per-token", "smoothed": ["0"]},
    "quantize_static": {"modules": ["0"], "qat": True, "reduced_range": True},
    "fold_batchnorm": {"pairs": [["0", "1"]]},
}


def test_every_kind_round_trips_through_its_class():
    assert set(EXAMPLES) <= set(Edit.KINDS)
    for kind, fields in EXAMPLES.items():
        edit = Edit.parse({"kind": kind, **fields})
        assert type(edit).kind == kind
        assert Edit.parse(edit.to_dict()) == edit


def test_a_forged_or_unknown_edit_is_one_line():
    with pytest.raises(InputError, match="unknown kind 'rm -rf'"):
        Edit.parse({"kind": "rm -rf"})
    with pytest.raises(InputError, match=r"edit 3 \(quantize_weight_only\).*bits"):
        Edit.parse({"kind": "quantize_weight_only", "modules": [], "bits": 3, "group_size": 0}, 3)
    with pytest.raises(InputError, match="lowrank"):
        Edit.parse({"kind": "lowrank", "ranks": {"0": 2}, "extra": 1})


def test_replay_rebuilds_the_modules_and_flags_come_from_the_classes():
    manifest = Manifest(arch="zoo:none", edits=[LowRankEdit(ranks={"0": 2}).to_dict(),
                                                WeightOnlyEdit(modules=["0.1"], bits=8, group_size=0).to_dict()])
    model = replay_edits(nn.Sequential(nn.Linear(8, 6)), manifest)
    assert [type(m).__name__ for m in model[0]] == ["Linear", "WeightOnlyLinear"]
    assert model[0][0].out_features == 2
    assert is_quantized(manifest) and not is_quantized(Manifest(arch="zoo:none", edits=manifest.edits[:1]))
    assert model(torch.ones(1, 8)).shape == (1, 6)


def test_no_edit_kind_is_spelled_outside_its_class():
    """("lowrank" is also the op's name, which commands spell; the other kinds are edits' names only.)"""
    kinds = "|".join(re.escape(k) for k in EXAMPLES if k != "lowrank")
    pattern = re.compile(rf"""["']({kinds})["']""")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and "kind: ClassVar[str]" not in line]
    assert offenders == []
