"""prune: magnitude, structured and gradual, on the real sample models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelzip_cli.checkpoint.io import build_arch, load_checkpoint, save_model
from modelzip_cli.techniques import prune as prune_mod
from modelzip_cli.techniques.prune import cubic_schedule, kth_magnitude, zero_smallest

from .conftest import (
    DIGITS_TEACHER,
    DIGITS_TEST,
    DIGITS_TRAIN,
    MNIST1D_TEACHER,
    MNIST1D_TEST,
    MNIST1D_TRAIN,
    MNIST1D_TRANSFORMER,
    fresh_outputs,
    one_line_error,
    same_process_outputs,
)


@settings(max_examples=40, deadline=None, derandomize=True)  # the same examples in CI as here
@given(st.lists(st.integers(1, 300), min_size=1, max_size=4), st.floats(0.001, 0.999), st.integers(0, 3),
       st.booleans())
def test_kth_magnitude_matches_a_full_sort(sizes, frac, seed, with_ties):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g) for n in sizes]
    if with_ties:
        tensors = [torch.round(t * 2) / 2 for t in tensors]  # many equal magnitudes
    flat = torch.cat(tensors).abs()
    k = max(1, min(flat.numel(), round(frac * flat.numel())))
    threshold, ties = kth_magnitude(tensors, k)
    assert threshold == float(torch.sort(flat).values[k - 1])
    assert ties == k - int((flat < threshold).sum())
    zero_smallest(tensors, k)
    assert int((torch.cat(tensors) == 0).sum()) >= k
    assert int((torch.cat(tensors) == 0).sum()) == max(k, int((flat == 0).sum()))


def test_kth_magnitude_in_chunks_and_narrowing(monkeypatch):
    monkeypatch.setattr(prune_mod, "CHUNK", 1000)  # force many chunks
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(3_000_000, generator=g), torch.randn(1234, 77, generator=g)]  # > 1M: histogram path
    flat = torch.cat([t.flatten() for t in tensors]).abs()
    for k in (1, 12345, flat.numel() // 2, flat.numel()):
        assert kth_magnitude(tensors, k)[0] == float(torch.kthvalue(flat, k).values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kth_magnitude_with_heavy_ties_counts_distinct_values(monkeypatch, dtype):
    """The path after the sample's bracket missed: millions of tied bf16 magnitudes are counted per distinct
    value (merged when more than KEEP_AT_MOST are held), the same threshold and ties as a full sort."""
    monkeypatch.setattr(prune_mod, "_bracketed", lambda *a: None)
    monkeypatch.setattr(prune_mod, "KEEP_AT_MOST", 64)
    monkeypatch.setattr(prune_mod, "CHUNK", 100_000)
    g = torch.Generator().manual_seed(2)
    tensors = [(torch.randn(1_500_000, generator=g) * 0.02).to(dtype), torch.randn(700, 300, generator=g).to(dtype)]
    flat = torch.cat([t.flatten() for t in tensors]).abs()
    for k in (1, 777, flat.numel() // 2, flat.numel()):
        threshold, ties = kth_magnitude(tensors, k)
        assert threshold == float(torch.sort(flat.float()).values[k - 1])
        assert ties == k - int((flat < threshold).sum())


def test_cubic_schedule():
    s = cubic_schedule(0.9, 5)
    assert len(s) == 5 and s[-1] == pytest.approx(0.9) and all(a < b for a, b in zip(s, s[1:], strict=False))
    assert s[0] == pytest.approx(0.9 * (1 - (1 - 1 / 5) ** 3))


@given(n0=st.integers(1, 4096), fraction=st.floats(0, 0.95))
def test_kept_units_are_aligned_on_wide_layers_and_near_the_ratio(n0, fraction):
    kept = prune_mod.kept_units(n0, fraction)
    exact = n0 - round(fraction * n0)
    assert 1 <= kept <= n0 or (exact == 0 and kept == 0)
    if n0 >= prune_mod.ALIGN_FROM and n0 % prune_mod.ALIGN == 0:
        assert kept % prune_mod.ALIGN == 0 and abs(kept - exact) <= prune_mod.ALIGN // 2
    else:
        assert kept == exact


def _selected_sparsity(model, names=None) -> float:
    ws = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv1d)
          and (names is None or n in names)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def test_magnitude_global_half_on_digits(cli, tmp_path):
    out = tmp_path / "p.safetensors"
    r = cli("prune", DIGITS_TEACHER, "--ratio", "0.5", "-o", out, "--eval-data", DIGITS_TEST, "--json", "--quiet")
    assert r.code == 0, r.stderr
    rep = r.json
    model = load_checkpoint(out).model
    assert _selected_sparsity(model) == pytest.approx(0.5, abs=0.01)
    assert rep["steps"][0]["after"]["selected_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert DIGITS_TEACHER.stat().st_size / out.stat().st_size >= 1.7
    drop = (rep["metrics"]["input"]["accuracy"] - rep["metrics"]["output"]["accuracy"]) * 100
    assert drop <= 1.0
    assert any("no faster" in n for n in rep["steps"][0]["notes"])
    assert rep["output"]["gzip_bytes"] > 0
    assert torch.equal(fresh_outputs(out, DIGITS_TEST, tmp_path), same_process_outputs(model, DIGITS_TEST))
    assert load_checkpoint(out).manifest.edits[0]["kind"] == "prune_magnitude"


def test_magnitude_layer_scope_hits_the_ratio_in_every_layer(cli, tmp_path):
    out = tmp_path / "p.pt"
    assert cli("prune", DIGITS_TEACHER, "--ratio", "0.3", "--scope", "layer", "-o", out, "--quiet").code == 0
    model = load_checkpoint(out).model
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert _selected_sparsity(model, {name}) == pytest.approx(0.3, abs=0.002), name


@pytest.mark.slow
@pytest.mark.parametrize("teacher,train,test,max_drop,tune", [
    (DIGITS_TEACHER, DIGITS_TRAIN, DIGITS_TEST, 1.5, ["--finetune-epochs", "5"]),
    # the 12k-parameter CNN loses half its channels: it needs the learning rate it was trained with
    (MNIST1D_TEACHER, MNIST1D_TRAIN, MNIST1D_TEST, 3.0, ["--finetune-epochs", "30", "--lr", "0.02"]),
])
def test_structured_half_shrinks_layers_and_fine_tunes_back(cli, tmp_path, teacher, train, test, max_drop, tune):
    before = load_checkpoint(teacher).model
    out = tmp_path / "s.safetensors"
    r = cli("prune", teacher, "--ratio", "0.5", "--method", "structured", "--data", train, *tune,
            "-o", out, "--eval-data", test, "--json", "--quiet")
    assert r.code == 0, r.stderr
    after = load_checkpoint(out).model
    widths = {n: (m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels)
              for n, m in after.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv1d)}
    original = {n: (m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels)
                for n, m in before.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv1d)}
    head = list(original)[-1]
    for name, width in original.items():
        assert widths[name] == (width if name == head else width // 2), name
    p_before = sum(p.numel() for p in before.parameters())
    p_after = sum(p.numel() for p in after.parameters())
    if teacher == DIGITS_TEACHER:
        assert p_before / p_after >= 2.5
    rep = r.json
    drop = (rep["metrics"]["input"]["accuracy"] - rep["metrics"]["output"]["accuracy"]) * 100
    assert drop <= max_drop, drop
    assert rep["steps"][0]["after"]["parameters"] == p_after
    assert torch.equal(fresh_outputs(out, test, tmp_path), same_process_outputs(after, test))


def test_transformer_magnitude_and_structured_reload_identically(cli, tmp_path):
    mag = tmp_path / "tm.safetensors"
    r = cli("prune", MNIST1D_TRANSFORMER, "--ratio", "0.5", "-o", mag, "--eval-data", MNIST1D_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    assert r.json["metrics"]["output"]["accuracy"] > 0.5
    model = load_checkpoint(mag).model
    assert torch.equal(fresh_outputs(mag, MNIST1D_TEST, tmp_path), same_process_outputs(model, MNIST1D_TEST))

    st_out = tmp_path / "ts.pt"
    r = cli("prune", MNIST1D_TRANSFORMER, "--ratio", "0.3", "--method", "structured", "--include", "blocks.*.mlp.0",
            "-o", st_out, "--eval-data", MNIST1D_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    model = load_checkpoint(st_out).model
    for block in model.blocks:
        assert block.mlp[0].out_features == prune_mod.kept_units(128, 0.3) == 88 == block.mlp[2].in_features
    assert torch.equal(fresh_outputs(st_out, MNIST1D_TEST, tmp_path), same_process_outputs(model, MNIST1D_TEST))


def test_structured_default_selection_on_transformer_skips_tied_layers_with_notes(cli, tmp_path):
    r = cli("prune", MNIST1D_TRANSFORMER, "--ratio", "0.25", "--method", "structured", "-o",
            tmp_path / "t.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    notes = " ".join(r.json["steps"][0]["notes"])
    assert "attention heads: 2 of 8 removed in 2" in notes and "tied to layers not selected (e.g. " in notes
    rows = {row["name"]: row for row in r.json["steps"][0]["layers"]}
    q, q0 = rows["blocks.0.attn.q"]["shape"], rows["blocks.0.attn.q"]["shape_before"]  # one head of four gone
    assert q == [q0[0] * 3 // 4, q0[1]] and rows["blocks.0.attn.o"]["shape"] == [q0[1], q0[0] * 3 // 4]
    assert rows["blocks.0.mlp.0"]["shape"][0] == 96


def test_structured_ranks_units_by_activations_and_keeps_the_mean_of_what_it_removes():
    """With data, a unit whose activation never varies goes first even with the largest weights, and its
    constant output, folded into the next layer's bias, leaves the outputs as they were; by weight norm it
    would be kept and another unit's loss would show."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x = torch.randn(64, 4)
    x[:, 0] = 1.0  # feature 0 never varies
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(4, 4) * 0.5)
        net[0].weight[0] = torch.tensor([10.0, 0, 0, 0])  # unit 0: always 10, the largest weights
        net[0].weight[1:, 0] = 0
        net[0].bias.copy_(torch.tensor([0.0, 5, 5, 5]))  # units 1–3 always active, varying
    before = net(x).detach()
    for data, kept_outputs in ((x, True), (None, False)):
        m = copy.deepcopy(net)
        pruner = prune_mod.StructuredPruner(m, x[:1], [("0", m[0])], data)
        pruner.prune_to(0.25)
        assert m[0].out_features == 3 == m[2].in_features
        assert torch.allclose(m(x), before, atol=1e-4) == kept_outputs
        assert ("1 by activations" if data is not None else "1 by weight norms") in " ".join(pruner.notes)


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, width), torch.nn.Linear(width, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_structured_uniform_keeps_one_width_per_role_in_a_stack_of_blocks():
    """Outside decoders (the dependency-graph pruner): blocks 24 and 16 wide lose a quarter each (18 and 12), or
    with uniform both keep 12, the narrowest block's share; a layer outside the stack is a role of its own."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([_Block(24), _Block(16)])
            self.head = torch.nn.Linear(8, 20)
            self.out = torch.nn.Linear(20, 3)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.out(torch.relu(self.head(x)))

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    for uniform, widths in ((False, [18, 12]), (True, [12, 12])):
        m = Net()
        layers = [(n, mod) for n, mod in m.named_modules() if n.endswith("up") or n == "head"]
        pruner = prune_mod.StructuredPruner(m, x[:1], layers, uniform=uniform)
        pruner.prune_to(0.25)
        assert [b.up.out_features for b in m.blocks] == widths == [b.down.in_features for b in m.blocks]
        assert m.head.out_features == 15 and m(x).shape == (4, 3)


@pytest.mark.slow
def test_gradual_keeps_more_accuracy_than_one_shot(cli, tmp_path):
    args = ["--ratio", "0.9", "--eval-data", DIGITS_TEST, "--json", "-q", "--seed", "0"]
    one = cli("prune", DIGITS_TEACHER, *args, "-o", tmp_path / "one.pt")
    grad = cli("prune", DIGITS_TEACHER, *args, "--method", "gradual", "--steps", "5", "--data", DIGITS_TRAIN,
               "--finetune-epochs", "2", "-o", tmp_path / "grad.pt")
    assert one.code == 0 and grad.code == 0, grad.stderr
    acc_one = one.json["metrics"]["output"]["accuracy"]
    acc_grad = grad.json["metrics"]["output"]["accuracy"]
    assert acc_grad > acc_one
    assert _selected_sparsity(load_checkpoint(tmp_path / "grad.pt").model) == pytest.approx(0.9, abs=0.01)
    history = grad.json["steps"][0]["after"]["finetune_history"]
    assert [h["step"] for h in history] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_gradual_structured(cli, tmp_path):
    out = tmp_path / "gs.safetensors"
    r = cli("prune", DIGITS_TEACHER, "--ratio", "0.5", "--method", "gradual", "--granularity", "structured",
            "--steps", "3", "--data", DIGITS_TRAIN, "--finetune-epochs", "1", "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    model = load_checkpoint(out).model
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [256, 128, 64, 10]


def test_prune_bad_inputs_exit_2_and_write_nothing(cli, tmp_path):
    tiny = build_arch("zoo:mlp", {"input_size": 64, "hidden_sizes": [4], "num_classes": 10})
    save_model(tiny, tmp_path / "tiny.safetensors")
    cases = {
        "ratio 1": [DIGITS_TEACHER, "--ratio", "1"],
        "ratio negative": [DIGITS_TEACHER, "--ratio", "-0.1"],
        "removes every unit": [tmp_path / "tiny.safetensors", "--ratio", "0.9", "--method", "structured"],
        "unknown method": [DIGITS_TEACHER, "--ratio", "0.5", "--method", "random"],
        "include matches nothing": [DIGITS_TEACHER, "--ratio", "0.5", "--include", "encoder.*"],
        "steps 0": [DIGITS_TEACHER, "--ratio", "0.5", "--method", "gradual", "--steps", "0"],
        "data of wrong size": [DIGITS_TEACHER, "--ratio", "0.5", "--data", MNIST1D_TRAIN],
    }
    before = set(tmp_path.iterdir())
    for what, args in cases.items():
        r = cli("prune", *args, "-o", tmp_path / "out.safetensors")
        assert r.code == 2, f"{what}: {r.code} {r.stderr}"
        one_line_error(r)
    assert set(tmp_path.iterdir()) == before


def test_output_equal_to_input_and_existing_output(cli, tmp_path):
    src = tmp_path / "m.safetensors"
    src.write_bytes(DIGITS_TEACHER.read_bytes())
    assert cli("prune", src, "--ratio", "0.5", "-o", src).code == 2
    assert src.read_bytes() == DIGITS_TEACHER.read_bytes()
    assert cli("prune", src, "--ratio", "0.5", "-q").code == 0  # default name m.pruned.safetensors
    assert (tmp_path / "m.pruned.safetensors").exists() and (tmp_path / "m.pruned.safetensors.json").exists()
    r = cli("prune", src, "--ratio", "0.5", "-q")
    assert r.code == 2 and "--force" in r.stderr
    assert cli("prune", src, "--ratio", "0.5", "-q", "--force").code == 0


def test_quality_gate_exit_1_with_output_written(cli, tmp_path):
    out = tmp_path / "g.safetensors"
    r = cli("prune", DIGITS_TEACHER, "--ratio", "0.95", "-o", out, "--eval-data", DIGITS_TEST,
            "--max-accuracy-drop", "0.5", "--json", "-q")
    assert r.code == 1
    assert out.exists() and r.json["gate"]["passed"] is False
    assert math.isclose(r.json["gate"]["max_accuracy_drop"], 0.5)


def small_net(width: int = 32) -> torch.nn.Module:
    """A user architecture (not in the zoo), referenced as tests.test_prune:small_net."""
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))


def test_user_architecture_needs_an_input_shape_for_structured_pruning(cli, tmp_path):
    torch.manual_seed(0)
    raw = tmp_path / "user.pt"
    torch.save(small_net(32).state_dict(), raw)
    ref = "tests.test_prune:small_net"
    r = cli("prune", raw, "--arch", ref, "--ratio", "0.5", "--method", "structured", "-o", tmp_path / "o.pt")
    assert r.code == 2 and "--input-shape" in one_line_error(r)
    out = tmp_path / "o.safetensors"
    r = cli("prune", raw, "--arch", ref, "--ratio", "0.5", "--method", "structured", "--input-shape", "1,64",
            "-o", out, "-q")
    assert r.code == 0, r.stderr
    loaded = load_checkpoint(out, arch=ref)  # naming the architecture is what trusts it
    assert loaded.manifest.input_shape == [1, 64] and loaded.manifest.arch == ref
    assert loaded.model[0].out_features == 16
