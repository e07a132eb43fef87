"""Weight-only kernels (wo_kernels.py): every packed kernel computes what dequantize-and-matmul computes, a
kernel the machine lacks falls back to float, and the file stays what it was."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.checkpoint.io import load_checkpoint, save_checkpoint
from modelzip_cli.kernels import weight_only as wo_kernels
from modelzip_cli.kernels.weight_only import Stored
from modelzip_cli.measure.metrics import causal_lm, num_threads
from modelzip_cli.nn.weight_only import WeightOnlyLinear
from modelzip_cli.pipeline.data import load_data
from tests.conftest import DIGITS_TEACHER, DIGITS_TEST

# The packed kernels take bf16 activations: measured relative error against the fp32 reference ≈ 3e-3.
TOL = 1e-2
# int8dyn rounds each row of activations to int8 (step = row max / 127): ≈ 8e-3 on Gaussian inputs
TOL_W8A8 = 2e-2


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch, tmp_path):
    """Measurements of other tests (in memory or on disk) must not decide this test's kernels."""
    monkeypatch.setenv(wo_kernels.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(wo_kernels.KERNEL_ENV, raising=False)  # conftest pins the reference kernel elsewhere
    monkeypatch.setattr(wo_kernels, "CHOICES", {})
    wo_kernels.available.cache_clear()
    yield
    wo_kernels.available.cache_clear()


def _check(layer: WeightOnlyLinear, kernel: str, tol: float) -> None:
    width = layer.in_features
    for shape in [(1, width), (9, width), (2, 5, width)]:  # one row (decoding), several, a 3-D batch
        x = torch.randn(*shape)
        ref = F.linear(x, layer.dequantized_weight(), layer.bias)
        with torch.inference_mode():
            y = layer(x)
        assert layer.kernel_for(x.numel() // width) == kernel
        assert y.dtype == torch.float32 and y.shape == ref.shape
        assert _rel(y, ref) <= tol, (kernel, shape)


@pytest.mark.parametrize("bits,kernel,tol", [(4, "vnni4", TOL_W8A8), (4, "int4pack", TOL), (4, "bf16", TOL),
                                              (8, "vnni8", TOL_W8A8), (8, "int8pack", TOL),
                                              (8, "int8chan", TOL), (8, "int8dyn", TOL_W8A8), (8, "bf16", TOL)])
@pytest.mark.parametrize("group", [32, 64, 128])
# 200: not a whole number of groups (the stored weight is padded, so is the input); 576: 4.5 groups of 128, which
# the int4 kernel takes as 9 groups of 64 (no padding)
@pytest.mark.parametrize("width", [256, 200, 576])
def test_kernel_matches_dequantize_and_matmul(monkeypatch, bits, kernel, tol, group, width):
    if not wo_kernels.available(kernel):
        pytest.skip(f"{kernel} does not run here")
    torch.manual_seed(0)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, kernel)
    _check(WeightOnlyLinear.from_float(nn.Linear(width, 48), bits, group).eval(), kernel, tol)


@pytest.mark.parametrize("bits,kernel", [(4, "vnni4"), (4, "int4pack"), (4, "float"), (8, "vnni8")])
def test_an_input_of_the_wrong_width_raises_as_float_does_even_at_a_known_size(monkeypatch, bits, kernel):
    """The bound call is found by the input's element count: (2, 288) has the count of (1, 576), and the C
    kernel reads rows of the layer's width without a check of its own."""
    if not wo_kernels.available(kernel):
        pytest.skip(f"{kernel} does not run here")
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, kernel)
    layer = WeightOnlyLinear.from_float(nn.Linear(576, 64), bits, 128).eval()
    with torch.inference_mode():
        layer(torch.randn(1, 576))
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 288))


def test_vnni8_takes_zero_points_and_large_groups(monkeypatch):
    """A file may hold int8 zero points (modelzip writes 0) and one group per row of any multiple of 16: vnni8
    computes (q − zp)·s all the same (the zero points' term and the activations' +128 offset are taken off)."""
    if not wo_kernels.available("vnni8"):
        pytest.skip("vnni8 does not run here")
    torch.manual_seed(0)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, "vnni8")
    for width, group in [(256, 64), (576, 576), (1040, 1040)]:
        layer = WeightOnlyLinear.from_float(nn.Linear(width, 40), 8, group).eval()
        layer.zero_points = torch.randint(-20, 20, layer.zero_points.shape, dtype=torch.int8)
        _check(layer, "vnni8", TOL_W8A8)


@pytest.mark.parametrize("bits,kernel", [(4, "vnni4"), (8, "vnni8")])
def test_c_kernels_write_float32_cpu_outputs_whatever_torchs_defaults_and_refuse_other_devices(monkeypatch, bits,
                                                                                              kernel):
    """The C code writes float32 into the output's address: a float64 default dtype made it read garbage back,
    and an input on another device (meta here, CUDA alike) of a size seen before reached the C code by the
    bound call and crashed the process."""
    if not wo_kernels.available(kernel):
        pytest.skip(f"{kernel} does not run here")
    torch.manual_seed(0)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, kernel)
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 32), bits, 64).eval()
    x = torch.randn(2, 256)
    ref = F.linear(x, layer.dequantized_weight(), layer.bias)
    with torch.inference_mode():
        layer(x)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            y = layer(x)
        finally:
            torch.set_default_dtype(before)
        assert y.dtype == torch.float32 and _rel(y, ref) <= TOL_W8A8
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 256, device="meta"))


def test_vnni_kernels_refuse_groups_whose_int32_sums_could_wrap():
    w = Stored(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int8), lambda: torch.zeros(1, 1))
    for bits, kernel in [(8, "vnni8"), (4, "vnni4")]:
        top = wo_kernels.VNNI_MAX_GROUP[bits]
        unsupported = wo_kernels.KERNEL_TABLE[kernel].unsupported
        assert "wider" in unsupported(wo_kernels.Geometry(bits, top * 2, 16, top * 2, 1), w)
        assert "wider" not in (unsupported(wo_kernels.Geometry(bits, top, 16, top, 1), w) or "")


def test_requantized_int8_weight_is_within_half_a_channel_step_of_the_stored_one():
    """int8chan / int8dyn requantize a grouped int8 weight to one scale per output channel: the bound the
    report's note states, checked on a weight whose groups have scales 100× apart."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 32)
    with torch.no_grad():
        linear.weight[:, :64] *= 100
    layer = WeightOnlyLinear.from_float(linear, 8, 64)
    q, s = wo_kernels._requantized(layer._geo, layer._stored())
    stored = layer.dequantized_weight()
    assert ((q.float() * s[:, None] - stored).abs() <= s[:, None] / 2 + 1e-6).all()
    assert not torch.equal(q.float() * s[:, None], stored)  # it does round: the note is not hypothetical


def test_a_layer_runs_the_kernel_its_call_needs_after_a_switch(monkeypatch):
    """The bound call is kept per input size, dtype and use_kernel block: changing any of them, or the stored
    tensors, gives what a fresh layer gives."""
    torch.manual_seed(0)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, "int4pack")
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), 4, 64).eval()
    x = torch.randn(3, 256)
    with torch.inference_mode():
        packed = layer(x)
        with wo_kernels.use_kernel("float"):
            assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(), layer.bias))
        assert torch.equal(layer(x), packed)
        half = layer(x.bfloat16())
        assert half.dtype == torch.bfloat16 and _rel(half.float(), packed) <= TOL
        assert torch.equal(layer(x.reshape(3, 1, 256)).reshape(3, 64), packed)  # same size, another shape
    other = WeightOnlyLinear.from_float(nn.Linear(256, 64), 4, 64)
    layer.qweight, layer.scales = other.qweight.clone(), other.scales.clone()  # assigned, not copied into
    with torch.inference_mode():
        assert _rel(layer(x), F.linear(x, layer.dequantized_weight(), layer.bias)) <= TOL
    assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(), layer.bias))  # grad mode: bias trains


def test_the_probe_times_weights_cold_only_in_a_model_too_big_for_the_l2_caches(monkeypatch):
    """A model that fits the L2 caches keeps its weights hot between calls, where float wins small layers."""
    packed = (torch.zeros(512, 64),)
    assert len(wo_kernels._copies(packed, 1, cold=False)) == 1
    assert len(wo_kernels._copies(packed, 1, cold=True)) == wo_kernels.PROBE_COPIES
    assert len(wo_kernels._copies(packed, 128, cold=True)) == 1  # many rows: bound by arithmetic
    before = wo_kernels.working_set()
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), 4, 64)
    assert wo_kernels.working_set() == before + 4 * 256 * 64
    del layer
    assert wo_kernels.working_set() == before


@pytest.mark.parametrize("bits,kernel", [(4, "int4pack"), (8, "int8pack")])
def test_per_channel_weight_runs_packed(monkeypatch, bits, kernel):
    """One group per row of 576 (4.5 groups of 128): the int4 kernel takes it as 9 groups of 64, one scale."""
    torch.manual_seed(0)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, kernel)
    _check(WeightOnlyLinear.from_float(nn.Linear(576, 64), bits, 0).eval(), kernel, TOL)


@pytest.mark.parametrize("bits,kernel,out,group", [(4, "int4pack", 10, 64), (4, "int4pack", 64, 48),
                                                   (8, "int8pack", 16, 40)])
def test_layer_the_kernel_cannot_tile_falls_back_to_float(monkeypatch, bits, kernel, out, group):
    torch.manual_seed(0)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, kernel)
    layer = WeightOnlyLinear.from_float(nn.Linear(96, out), bits, group).eval()
    _check(layer, "float", 1e-6)
    assert "multiple of 16" in layer.kernel_notes()[kernel] or "32" in layer.kernel_notes()[kernel]


@pytest.mark.parametrize("group,probed", [(64, {"int8chan", "bf16", "float"}), (0, {"int8pack", "bf16", "float"})])
def test_the_probe_chooses_among_one_call_kernels_that_keep_the_activations(monkeypatch, group, probed):
    """Never int8dyn (it rounds activations: only where forced), never int8pack on a grouped weight (one call
    per group: contention at run time puts it far behind what the probe saw)."""
    seen = []
    monkeypatch.setattr(wo_kernels, "_probe", lambda geo, packs, *args: seen.append(set(packs)) or "float")
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), 8, group)
    probed = probed | ({"vnni8"} if wo_kernels.available("vnni8") else set())  # per group, as the weights are
    assert layer.kernel_for(1) == "float" and seen == [probed]


def test_measurements_are_kept_per_cpu_capability(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 makes an AVX-512 machine run AVX2 kernels: its choices are measured anew."""
    key = wo_kernels.machine_key()
    wo_kernels.machine_key.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "SIMULATED")
    try:
        assert wo_kernels.machine_key() != key
    finally:
        wo_kernels.machine_key.cache_clear()


def test_new_probe_rules_measure_again(monkeypatch):
    """What an older probe chose (kept in the file of measurements) is not reused once its rules change."""
    key = wo_kernels.machine_key()
    wo_kernels.machine_key.cache_clear()
    monkeypatch.setattr(wo_kernels, "PROBE_VERSION", wo_kernels.PROBE_VERSION + 1)
    try:
        assert wo_kernels.machine_key() != key
    finally:
        wo_kernels.machine_key.cache_clear()


@pytest.mark.parametrize("op,bits,gone", [("_weight_int4pack_mm_for_cpu", 4, ("int4pack",)),
                                          ("_weight_int8pack_mm", 8, ("int8pack", "int8chan"))])
def test_model_loaded_where_a_kernel_is_unavailable_runs_through_the_others(monkeypatch, op, bits, gone):
    """A torch or CPU without torch's int4 or int8 kernel (simulated: the op raises) still runs the layer,
    on what measures fastest among the kernels that run."""
    torch.manual_seed(0)

    def missing(*args, **kwargs):
        raise RuntimeError(f"{op}: not implemented for this CPU")

    monkeypatch.setattr(torch.ops.aten, op, missing)
    assert not any(wo_kernels.available(k) for k in gone)
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), bits, 64).eval()
    x = torch.randn(3, 256)
    with torch.inference_mode():
        y = layer(x)
    assert layer.kernel_for(3) not in gone
    assert _rel(y, F.linear(x, layer.dequantized_weight(), layer.bias)) <= TOL_W8A8


def test_unavailable_kernel_runs_through_the_fallback(monkeypatch):
    """A machine whose torch lacks the int4 kernel (simulated: the op raises) still runs the model."""
    torch.manual_seed(0)

    def missing(*args, **kwargs):
        raise RuntimeError("_weight_int4pack_mm_for_cpu: not implemented for this CPU")

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", missing)
    assert not wo_kernels.available("int4pack")
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), 4, 64).eval()
    x = torch.randn(3, 256)
    ref = F.linear(x, layer.dequantized_weight(), layer.bias)
    with torch.inference_mode():
        auto = layer(x)  # measured among the kernels that run
    assert layer.kernel_for(3) in ("vnni4", "bf16", "float") and _rel(auto, ref) <= TOL_W8A8
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, "int4pack")
    forced = WeightOnlyLinear.from_float(nn.Linear(256, 64), 4, 64).eval()
    forced.load_state_dict(layer.state_dict())
    with torch.inference_mode():
        assert torch.equal(forced(x), ref)
    assert forced.kernel_for(3) == "float" and "not available" in forced.kernel_notes()["int4pack"]


def test_gradients_flow_through_the_float_path():
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), 4, 64)
    x = torch.randn(2, 256, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, layer.dequantized_weight().sum(0).expand(2, -1), atol=1e-5)


def test_quantized_file_reloads_onto_the_packed_kernel_and_stays_the_same(cli, tmp_path, monkeypatch):
    out = tmp_path / "q4.safetensors"
    r = cli("quantize", DIGITS_TEACHER, "--method", "weight-only", "--bits", "4", "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    rows = {row["name"]: row for row in r.json["steps"][0]["layers"]}
    quantized = [n for n, row in rows.items() if "weight-only" in str(row.get("scheme"))]
    assert quantized and all(set(rows[n]["kernel"]) == {"1_rows", "16_rows", "128_rows"} for n in quantized)
    assert any("weight-only kernels measured on this machine" in n for n in r.json["steps"][0]["notes"])
    digest = hashlib.sha256(out.read_bytes()).hexdigest()

    x = load_data(DIGITS_TEST).inputs[:32]
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, "float")
    loaded = load_checkpoint(out)
    keys = set(loaded.model.state_dict())
    with torch.inference_mode():
        reference = loaded.model(x)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, "int4pack")
    packed = load_checkpoint(out)
    with torch.inference_mode():
        y = packed.model(x)
    kernels = {n: m.kernel_for(32) for n, m in packed.model.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert [n for n, k in kernels.items() if k == "int4pack"], kernels  # the 512/256/128-wide layers
    assert kernels["layers.9"] == "float"  # 10 classes: not a multiple of the kernel's 16
    assert _rel(y, reference) <= TOL
    assert set(packed.model.state_dict()) == keys  # nothing packed reaches the state dict
    again = tmp_path / "again.safetensors"
    save_checkpoint(packed.model, packed.manifest, again)
    assert again.read_bytes() == out.read_bytes()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random Llama-architecture causal LM saved as transformers saves it, and token data for it."""
    import transformers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama")
    save_file({"inputs": torch.randint(0, 128, (8, 24))}, str(root / "tokens.safetensors"))
    return root / "llama", root / "tokens.safetensors"


def test_eval_and_compare_report_prefill_and_decode_speed_of_a_causal_lm(cli, tmp_path, tiny_llama):
    model, data = tiny_llama
    q4 = tmp_path / "q4.safetensors"
    assert cli("quantize", model, "--method", "weight-only", "--bits", "4", "--group-size", "32", "-o", q4,
               "-q").code == 0
    r = cli("compare", model, q4, "--data", data, "--json", "-q")
    assert r.code == 0, r.stderr
    for path in (model, q4):
        speed = r.json["metrics"][str(path)]["generation"]
        assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
        assert speed["prompt_tokens"] == 24 and speed["new_tokens"] == 32
    r = cli("eval", q4, "--data", data, "--json", "-q")
    assert r.code == 0, r.stderr
    assert r.json["metrics"][str(q4)]["generation"]["decode_tokens_per_s"] > 0
    assert causal_lm(load_checkpoint(DIGITS_TEACHER).model) is None  # not a language model: no such figures


def test_use_kernel_block_gives_the_reference_numerics_whatever_the_layer_chose(monkeypatch):
    """What `export` compares its graph with: inside wo_kernels.use_kernel("float"), dequantize-and-matmul."""
    torch.manual_seed(0)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, "int8pack")
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), 8, 64).eval()
    x = torch.randn(4, 256)
    ref = F.linear(x, layer.dequantized_weight(), layer.bias)
    with torch.inference_mode():
        packed = layer(x)
        with wo_kernels.use_kernel("float"):
            exact = layer(x)
        again = layer(x)
    assert torch.equal(exact, ref) and not torch.equal(packed, ref) and torch.equal(again, packed)


def test_int8_weight_read_at_an_unaligned_address_runs(monkeypatch):
    """A tensor loaded from a file may start at any byte; torch's int8 kernel crashed on such a weight."""
    torch.manual_seed(0)
    monkeypatch.setenv(wo_kernels.KERNEL_ENV, "int8pack")
    layer = WeightOnlyLinear.from_float(nn.Linear(64, 512), 8, 64).eval()
    storage = torch.empty(layer.qweight.numel() + 3, dtype=torch.int8)
    storage[3:] = layer.qweight.flatten()
    layer.qweight = storage[3:].view(512, 64)  # (the buffer, at an odd address)
    _check(layer, "int8pack", TOL)


@pytest.mark.parametrize("on_two_threads,expected", [({"int8chan": 2.0, "float": 1.0}, "float"),
                                                     ({"int8chan": 0.5, "float": 1.0}, "int8chan")])
def test_a_kernel_that_wins_on_one_thread_must_win_on_the_process_threads_too(monkeypatch, on_two_threads,
                                                                               expected):
    """The probe's one-thread winner is timed against float again on the threads the process runs with: a
    kernel that does not spread over threads as float's GEMM does (int8chan on AVX2 kernels) loses there."""
    timed = []

    def fake(calls, x, threads, clock, rounds=wo_kernels.PROBE_ROUNDS):
        timed.append((threads, set(calls)))
        return {"int8chan": 0.1, "bf16": 0.5, "float": 1.0} if threads == 1 else on_two_threads

    monkeypatch.setattr(wo_kernels, "_best_times", fake)
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), 8, 64)
    geo, w = layer._geo, layer._stored()
    packs = {n: wo_kernels.KERNEL_TABLE[n].pack(geo, w) for n in ("int8chan", "bf16", "float")}
    with num_threads(2):
        assert wo_kernels._probe(geo, packs, 128, torch.float32, None, cold=False) == expected
    assert timed == [(1, {"int8chan", "bf16", "float"}), (2, {"int8chan", "float"})]
    timed.clear()
    with num_threads(1):  # one thread: the first timing was on the process's threads already
        assert wo_kernels._probe(geo, packs, 128, torch.float32, None, cold=False) == "int8chan"
    assert timed == [(1, {"int8chan", "bf16", "float"})]
    timed.clear()
    with num_threads(2):  # one row: bound by reading the weights, where one thread's ranking holds
        assert wo_kernels._probe(geo, packs, 1, torch.float32, None, cold=False) == "int8chan"
    assert timed == [(1, {"int8chan", "bf16", "float"})]



@pytest.mark.parametrize("bits, width", [(4, 200), (4, 256), (8, 200)])
def test_layer_table_figures_of_a_packed_layer_equal_its_dense_weight(bits, width):
    """The layer table counts a weight-only layer's zeros from its integers (no dense copy): the same counts."""
    from modelzip_cli.checkpoint.layers import layer_table

    torch.manual_seed(0)
    linear = nn.Linear(width, 48)
    linear.weight.data[:, :40] = 0  # whole zero groups and zeros inside groups
    linear.weight.data[::3] *= (torch.rand(16, width) > 0.5)
    q = WeightOnlyLinear.from_float(linear, bits, 64)
    w = q.dequantized_weight()
    row = layer_table(nn.Sequential(q), with_bytes=False)[0]
    assert row["shape"] == list(w.shape) == [48, width]
    assert row["nonzero"] == int(torch.count_nonzero(w)) < w.numel()
    assert row["params"] == w.numel() + 48


def test_without_a_c_compiler_vnni4_is_unavailable_and_a_forced_layer_runs_on_float(monkeypatch, tmp_path):
    """modelzip's own C kernel is built on first use: where that cannot be (no compiler, here a CC that does not
    exist, and no library built before), it is unavailable with the reason, and a layer forced onto it runs."""
    from modelzip_cli.kernels import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(wo_kernels.CACHE_ENV, str(tmp_path))
    caches = (native._vnni, native.wo4_vnni, native.wo8_vnni, wo_kernels.available)
    for cache in caches:
        cache.cache_clear()
    try:
        assert native.wo4_vnni()[0] is None and native.wo8_vnni()[0] is None
        if native._cpu_flags() >= set(native.VNNI_FLAGS) and torch.backends.cpu.get_cpu_capability() in ("AVX512",
                                                                                                          "AMX"):
            assert "could not build" in native.wo4_vnni()[1]
        assert not wo_kernels.available("vnni4") and not wo_kernels.available("vnni8")
        monkeypatch.setenv(wo_kernels.KERNEL_ENV, "vnni4")
        layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), 4, 64).eval()
        x = torch.randn(3, 256)
        with torch.inference_mode():
            assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(), layer.bias))
        assert layer.kernel_for(3) == "float" and "vnni4" in layer.kernel_notes()
    finally:
        for cache in caches:
            cache.cache_clear()


def test_vnni4_library_is_built_once_under_the_hash_of_its_source(monkeypatch, tmp_path):
    import shutil

    from modelzip_cli.kernels import native

    if not native._cpu_flags() >= set(native.VNNI_FLAGS) or not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no AVX-512 VNNI or no C compiler here")
    monkeypatch.setenv(wo_kernels.CACHE_ENV, str(tmp_path))
    lib, why = native._build("wo4_vnni.c", native.CFLAGS)
    assert lib is not None, why
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].name.startswith("wo4_vnni-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert native._build("wo4_vnni.c", native.CFLAGS)[0] is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert native._build("wo4_vnni.c", (*native.CFLAGS, "-DPREFETCH=256"))[0] is not None
    assert len(list((tmp_path / "native").iterdir())) == 2  # other flags: another library


@pytest.mark.parametrize("kernel", ["float", "bf16", "vnni4", "vnni8", "int4pack", "int8chan"])
@pytest.mark.parametrize("rows", [1, 20])
def test_weights_written_in_place_are_the_weights_that_run(kernel, rows):
    """A kernel's packed copy and bound call are rebuilt when the stored integers, scales, zero points or bias
    are written in place (version counters), so the layer never runs a weight it no longer holds."""
    bits = 4 if kernel in ("vnni4", "int4pack") else 8
    if not wo_kernels.available(kernel):
        pytest.skip(f"{kernel} does not run here")
    torch.manual_seed(rows)
    layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), bits, 128)
    x = torch.randn(rows, 256)
    with wo_kernels.use_kernel(kernel), torch.no_grad():
        layer(x)
        layer(x)  # the bound call of this size is kept now
        layer.qweight.copy_(layer.qweight.flip(0))
        layer.scales.mul_(2)
        layer.zero_points.copy_(layer.zero_points.flip(0))
        layer.bias.add_(1)
        ref = F.linear(x, layer.dequantized_weight(), layer.bias)
        assert _rel(layer(x), ref) < 2e-2
