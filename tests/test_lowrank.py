"""lowrank: truncated SVD of Linear layers anywhere in the tree, automatic ranks, honest skips."""

from __future__ import annotations

import pytest
import torch

from modelzip_cli.checkpoint.io import load_checkpoint
from modelzip_cli.pipeline.context import Context
from modelzip_cli.techniques.lowrank import LowRankConfig, _budget_ranks, _energy_rank, lowrank

from .conftest import (
    DIGITS_TEACHER,
    DIGITS_TEST,
    MNIST1D_TEST,
    MNIST1D_TRANSFORMER,
    fresh_outputs,
    one_line_error,
    same_process_outputs,
)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("flag,value,min_factor,max_drop", [
    ("--energy", "0.9", 1.0, 1.0),
    ("--rank-ratio", "0.25", 2.0, 2.0),
    ("--params-ratio", "0.4", 2.4, 2.0),
])
def test_digits_fewer_parameters_small_drop_fresh_reload(cli, tmp_path, flag, value, min_factor, max_drop):
    out = tmp_path / "lr.safetensors"
    r = cli("lowrank", DIGITS_TEACHER, flag, value, "-o", out, "--eval-data", DIGITS_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    rep = r.json
    before, after = load_checkpoint(DIGITS_TEACHER).model, load_checkpoint(out).model
    assert _params(before) / _params(after) > min_factor
    assert (rep["metrics"]["input"]["accuracy"] - rep["metrics"]["output"]["accuracy"]) * 100 <= max_drop
    factored = [row for row in rep["steps"][0]["layers"] if row["rank"]]
    assert factored and all(0 < row["relative_error"] < 1 and row["svd"] == "exact" for row in factored)
    for row in factored:
        module = after.get_submodule(row["name"])
        assert isinstance(module, torch.nn.Sequential) and module[0].bias is None
        assert module[0].out_features == row["rank"]
    assert torch.equal(fresh_outputs(out, DIGITS_TEST, tmp_path), same_process_outputs(after, DIGITS_TEST))
    if flag == "--energy":
        assert all(row["energy_kept"] >= 0.9 for row in factored)


def test_transformer_blocks_factorized_or_skipped_with_notes(cli, tmp_path):
    out = tmp_path / "t.pt"
    r = cli("lowrank", MNIST1D_TRANSFORMER, "--include", "blocks.*", "--energy", "0.95", "-o", out,
            "--eval-data", MNIST1D_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    rows = r.json["steps"][0]["layers"]
    assert {row["name"] for row in rows} == {f"blocks.{b}.{n}" for b in (0, 1)
                                             for n in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.0", "mlp.2")}
    notes = " ".join(r.json["steps"][0]["notes"])
    for row in rows:  # each either factorized below break-even or left with a note that says why
        assert row["rank"] is not None or f"{row['name']} (" in notes
    assert any(row["rank"] for row in rows)
    model = load_checkpoint(out).model
    assert torch.equal(fresh_outputs(out, MNIST1D_TEST, tmp_path), same_process_outputs(model, MNIST1D_TEST))

    r = cli("lowrank", MNIST1D_TRANSFORMER, "--include", "blocks.*", "--energy", "0.8", "-o", tmp_path / "t8.pt",
            "--json", "-q")
    assert all(row["rank"] for row in r.json["steps"][0]["layers"])  # every block Linear factorized
    model = load_checkpoint(tmp_path / "t8.pt").model
    assert isinstance(model.blocks[1].attn.q, torch.nn.Sequential)


def test_layer_that_would_not_shrink_is_left_alone():
    lin = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    result = lowrank(lin, LowRankConfig(rank_ratio=0.75), Context(example_input=torch.rand(1, 16)))
    model, step, edits = result.model, result, result.edits
    assert isinstance(model[0], torch.nn.Linear) and edits == []
    assert any("left as it was" in n and "0 (16×16)" in n for n in step.notes)


def test_randomized_path_is_seeded_and_close_to_exact():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(1200, 1200))
    v, _ = torch.linalg.qr(torch.randn(1100, 1100))
    s = torch.exp(-torch.arange(1100.0) / 60)  # decaying spectrum, like trained weights
    w = (u[:, :1100] * s) @ v.T
    results = {}
    for path in ("exact", "randomized"):
        runs = []
        for _ in range(2):
            m = torch.nn.Sequential(torch.nn.Linear(1100, 1200), torch.nn.Linear(1200, 4))
            m[0].weight.data.copy_(w)
            step = lowrank(m, LowRankConfig(rank_ratio=0.1, svd=path, include=["0"]), Context(seed=3))
            runs.append((m[0][0].weight.clone(), step.layers[0]))
        assert torch.equal(runs[0][0], runs[1][0])  # same seed, same factors
        results[path] = runs[0][1]
    assert results["randomized"]["svd"] == "randomized"
    assert results["randomized"]["relative_error"] <= results["exact"]["relative_error"] * 1.01


def test_rank_choice_helpers():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert _energy_rank(s, 1.0) == 4 and _energy_rank(s, 0.5) == 1 and _energy_rank(s, 13 / 14.25) == 2
    spectra = {"a": torch.tensor([10.0, 1.0, 0.1]), "b": torch.tensor([1.0, 1.0, 1.0])}
    ranks = _budget_ranks(spectra, {"a": (3, 3), "b": (3, 3)}, budget=18)
    assert sum(ranks.values()) == 3 and ranks["a"] >= 1


def test_lowrank_bad_inputs_exit_2_and_write_nothing(cli, tmp_path):
    q = tmp_path / "q.safetensors"
    assert cli("quantize", DIGITS_TEACHER, "--method", "dynamic", "-o", q, "-q").code == 0
    cases = {
        "rank ratio 0": ["--rank-ratio", "0"],
        "rank ratio above 1": ["--rank-ratio", "1.5"],
        "energy 0": ["--energy", "0"],
        "energy above 1": ["--energy", "1.01"],
        "two rank options": ["--rank-ratio", "0.5", "--energy", "0.9"],
        "no rank option": [],
        "no Linear selected": ["--rank-ratio", "0.5", "--include", "layers.1"],
        "quantized input": ["--rank-ratio", "0.5", "INPUT", str(q)],
    }
    before = set(tmp_path.iterdir())
    for what, args in cases.items():
        src = DIGITS_TEACHER
        if "INPUT" in args:
            src, args = args[-1], args[:-2]
        r = cli("lowrank", src, *args, "-o", tmp_path / "out.safetensors")
        assert r.code == 2, f"{what}: {r.code} {r.stderr}"
        one_line_error(r)
    assert set(tmp_path.iterdir()) == before


def test_parameter_budget_never_leaves_a_layer_at_rank_0():
    # the weak layer's first singular value is worth less per parameter than the strong one's later ones
    spectra = {"strong": torch.tensor([10.0, 9.0, 8.0, 7.0]), "weak": torch.tensor([0.01, 0.001, 0.0, 0.0])}
    ranks = _budget_ranks(spectra, {"strong": (4, 4), "weak": (4, 4)}, budget=8 * 3)
    assert ranks["weak"] >= 1 and sum(ranks.values()) == 3
