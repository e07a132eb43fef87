"""Plain-int8 modules (modelzip_cli/int8.py): numerics against float, both kernels, state dicts, QAT."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelzip_cli import load_model
from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.errors import UsageError
from modelzip_cli.kernels import weight_only as wo_kernels
from modelzip_cli.measure.metrics import sqnr_db
from modelzip_cli.nn import int8
from modelzip_cli.pipeline.data import load_data
from modelzip_cli.pipeline.run import evaluate

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, MNIST1D_TEACHER, MNIST1D_TEST, MNIST1D_TRAIN

KERNELS = ["float", "int_mm"]


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Run the test once per kernel: the int_mm path is exercised even where auto would not pick it."""
    with int8.use_kernel(request.param):
        yield request.param


def _calibrated(model: nn.Module, names: list[str], batches, observer: str = "minmax") -> nn.Module:
    prepared = int8.prepare_static(model, names, observer)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    converted, unseen = int8.convert(prepared)
    assert unseen == []
    return converted.eval()


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------------------------------------------
# One layer against its float original


@pytest.mark.parametrize("act", int8.ACTIVATIONS)
def test_dynamic_linear_sqnr(kernel, act):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(32, 7, 256)  # 3-d input: rows are every (batch, token)
    q = int8.DynamicInt8Linear.from_float(lin, act)
    with torch.no_grad():
        assert sqnr_db(lin(x), q(x)) > 30
    assert q(x).shape == (32, 7, 128)


def test_dynamic_per_token_does_not_depend_on_the_rest_of_the_batch(kernel):
    torch.manual_seed(0)
    q = int8.DynamicInt8Linear.from_float(nn.Linear(64, 32), "per-token")
    x = torch.randn(16, 64)
    x[3] *= 100  # an outlier row changes a per-tensor scale, not the other rows' per-token scales
    with torch.no_grad():
        assert torch.allclose(q(x)[:3], q(x[:3]), rtol=1e-6, atol=1e-6)


def test_static_linear_and_convs_sqnr(kernel):
    torch.manual_seed(0)
    layers = {
        "linear": (nn.Linear(128, 64), lambda n: torch.randn(n, 128).relu()),
        "conv1d": (nn.Conv1d(8, 16, 5, stride=2, padding=1), lambda n: torch.randn(n, 8, 40)),
        "conv2d": (nn.Conv2d(3, 8, 3, padding=1, groups=1), lambda n: torch.randn(n, 3, 12, 12)),
        "conv2d grouped": (nn.Conv2d(8, 8, 3, padding="same", groups=4), lambda n: torch.randn(n, 8, 10, 10)),
    }
    for what, (layer, make) in layers.items():
        model = nn.Sequential(copy.deepcopy(layer))
        q = _calibrated(model, ["0"], [make(32) for _ in range(4)])
        x = make(16)
        with torch.no_grad():
            assert sqnr_db(layer(x), q(x)) > 30, what
        assert isinstance(q[0], int8.StaticInt8Linear | int8.StaticInt8Conv), what


def test_kernels_agree():
    torch.manual_seed(0)
    lin = nn.Linear(300, 70)
    x = torch.randn(9, 300) * 3
    dyn = int8.DynamicInt8Linear.from_float(lin)
    static = _calibrated(nn.Sequential(copy.deepcopy(lin)), ["0"], [torch.randn(64, 300) * 3])
    outputs = {}
    with torch.no_grad():
        for k in KERNELS:
            with int8.use_kernel(k):
                outputs[k] = (dyn(x), static(x))
    assert torch.allclose(outputs["float"][1], outputs["int_mm"][1], rtol=1e-5, atol=1e-5)  # static: same numerics
    assert sqnr_db(outputs["float"][0], outputs["int_mm"][0]) > 35  # dynamic: float activations on "float"
    assert not torch.equal(outputs["float"][0], outputs["int_mm"][0])


def test_weights_are_within_half_a_step_and_counted_like_float():
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    q = int8.DynamicInt8Linear.from_float(lin)
    w = q.logical_weights()["weight"]
    assert w.shape == lin.weight.shape
    assert ((w - lin.weight).abs() <= q.weight_scale[:, None] / 2 + 1e-7).all()
    assert count_parameters(nn.Sequential(q)) == count_parameters(nn.Sequential(lin))
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
    assert q.scheme == "int8 dynamic (per-token activations)"


def test_layers_without_bias(kernel):
    torch.manual_seed(0)
    lin, conv = nn.Linear(16, 8, bias=False), nn.Conv1d(2, 4, 3, bias=False)
    x, xc = torch.randn(4, 16), torch.randn(4, 2, 9)
    dyn = int8.DynamicInt8Linear.from_float(lin)
    static = _calibrated(nn.Sequential(copy.deepcopy(lin)), ["0"], [x])
    sc = _calibrated(nn.Sequential(copy.deepcopy(conv)), ["0"], [xc])
    assert "bias" not in dyn.state_dict() and "0.bias" not in static.state_dict()
    with torch.no_grad():
        assert sqnr_db(lin(x), dyn(x)) > 30 and sqnr_db(lin(x), static[0](x)) > 30
        assert sqnr_db(conv(xc), sc(xc)) > 30
    with int8.use_backend("torch-ao"), torch.no_grad():
        assert dyn(x).shape == (4, 8)


def test_half_precision_inputs_keep_their_dtype(kernel):
    lin = nn.Linear(32, 8).to(torch.bfloat16)
    q = int8.DynamicInt8Linear.from_float(lin)
    assert q.bias.dtype == torch.bfloat16
    with torch.no_grad():
        assert q(torch.randn(4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_affine_qparams_map_the_range_onto_int8_with_zero_exact():
    scale, zp = int8.affine_qparams(-1.0, 3.0)
    assert round(-1.0 / scale) + zp == -128 and round(3.0 / scale) + zp == 127
    assert int8.affine_qparams(0.5, 2.0)[1] == -128  # a range that excludes 0 is widened to it
    scale, zp = int8.affine_qparams(0.0, 0.0)  # an all-zero input: a usable scale, not a division by zero
    assert scale > 0 and -128 <= zp <= 127


def test_derived_weight_follows_new_state():
    torch.manual_seed(0)
    a, b = nn.Linear(16, 4), nn.Linear(16, 4)
    qa, qb = int8.DynamicInt8Linear.from_float(a), int8.DynamicInt8Linear.from_float(b)
    x = torch.randn(3, 16)
    with int8.use_kernel("float"), torch.no_grad():
        before = qa(x)  # builds qa's cached dequantized weight
        copied = copy.deepcopy(qa)
        qa.load_state_dict(qb.state_dict())  # copies into the same storage
        assert torch.equal(qa(x), qb(x))
        assert torch.equal(copied(x), before)
        assert torch.equal(qa.double()(x.double()).float(), qb.double()(x.double()).float())


def test_bad_settings_are_usage_errors(monkeypatch):
    with pytest.raises(UsageError):
        int8.DynamicInt8Linear(4, 4, act="per-channel")
    with pytest.raises(UsageError):
        int8.prepare_static(nn.Sequential(nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect")), ["0"])
    with pytest.raises(UsageError):
        int8.prepare_static(nn.Sequential(nn.Linear(2, 2)), ["0"], observer="histogram")
    with pytest.raises(UsageError):
        int8.quantize_dynamic(nn.Sequential(nn.ReLU()), ["0"])
    with pytest.raises(UsageError):
        int8.use_kernel("fbgemm").__enter__()
    monkeypatch.setenv(int8.KERNEL_ENV, "fbgemm")
    int8._default_kernel.cache_clear()
    try:
        with pytest.raises(UsageError):
            int8.kernel()
    finally:
        monkeypatch.delenv(int8.KERNEL_ENV)
        int8._default_kernel.cache_clear()


@pytest.mark.parametrize("prepare", [int8.prepare_static, int8.prepare_qat])
def test_a_layer_no_data_reached_stays_float(prepare):
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4), "conv": nn.Conv1d(2, 2, 3)})
    original = copy.deepcopy(model)
    prepared = prepare(model, ["used", "unused", "conv"]).train()
    with torch.no_grad():
        prepared["used"](torch.randn(2, 4))
    converted, unseen = int8.convert(prepared)
    assert unseen == ["unused", "conv"]
    assert isinstance(converted["used"], int8.StaticInt8Linear)
    assert type(converted["unused"]) is nn.Linear and type(converted["conv"]) is nn.Conv1d
    for name in unseen:
        assert converted[name].state_dict().keys() == original[name].state_dict().keys()
        assert all(torch.equal(v, original[name].state_dict()[k]) for k, v in converted[name].state_dict().items())


# ---------------------------------------------------------------------------------------------------
# State dicts: plain tensors only, exact round trip through a safetensors file


def _modules() -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]:
    """name → (quantized module, an empty one built from the same arguments, an input)."""
    torch.manual_seed(0)
    lin, conv = nn.Linear(40, 12), nn.Conv2d(2, 6, 3, stride=2, padding=1)
    static_lin = _calibrated(nn.Sequential(copy.deepcopy(lin)), ["0"], [torch.randn(8, 40)])[0]
    static_conv = _calibrated(nn.Sequential(copy.deepcopy(conv)), ["0"], [torch.randn(8, 2, 9, 9)])[0]
    return {
        "dynamic": (int8.DynamicInt8Linear.from_float(lin, "per-tensor"),
                    int8.DynamicInt8Linear(40, 12, act="per-tensor"), torch.randn(5, 40)),
        "static linear": (static_lin, int8.StaticInt8Linear(40, 12), torch.randn(5, 40)),
        "static conv": (static_conv, int8.StaticInt8Conv(2, 2, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1),
                        torch.randn(5, 2, 9, 9)),
    }


@pytest.mark.parametrize("name", ["dynamic", "static linear", "static conv"])
def test_state_dict_round_trips_exactly_through_safetensors(tmp_path, kernel, name):
    q, empty, x = _modules()[name]
    state = q.state_dict()
    assert all(not t.is_quantized and t.dtype in (torch.int8, torch.int32, torch.float32) for t in state.values())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    empty.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    assert all(torch.equal(state[k], v) for k, v in empty.state_dict().items())
    with torch.no_grad():
        assert torch.equal(empty(x), q(x))


def test_no_legacy_quantization_call_in_the_runtime():
    source = Path(int8.__file__).read_text()
    assert not re.search(r"torch\.(quantize_per_tensor|quantize_per_channel|_make_per_)", source)
    assert not re.search(r"torch\.ao\.|import torch\.ao|from torch import ao", source)
    assert not re.search(r"\bq(u?int8|int32)\b", source)  # no quantized dtype (torch.qint8, torch.quint8, ...)


# ---------------------------------------------------------------------------------------------------
# Real models


def test_digits_teacher_accuracy_every_method(kernel):
    teacher = load_model(DIGITS_TEACHER)
    test, train = load_data(DIGITS_TEST), load_data(DIGITS_TRAIN)
    names = _linear_names(teacher)
    base = evaluate(teacher, test)["accuracy"]
    calib = [x for x, _, _ in train.batches(32)][:16]
    models = {f"dynamic {act}": int8.quantize_dynamic(copy.deepcopy(teacher), names, act).eval()
              for act in int8.ACTIVATIONS}
    models.update({f"static {obs}": _calibrated(copy.deepcopy(teacher), names, calib, obs) for obs in int8.OBSERVERS})
    for what, model in models.items():
        assert set(int8.modules_of(model)) == set(names), what
        drop = (base - evaluate(model, test)["accuracy"]) * 100
        assert drop <= 0.5, f"{what}: {drop:.2f} points"


def _fine_tune(model: nn.Module, data, epochs: int = 1) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(epochs):
        for x, y, _ in data.batches(64):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("teacher, train_file, test_file", [(DIGITS_TEACHER, DIGITS_TRAIN, DIGITS_TEST),
                                                            (MNIST1D_TEACHER, MNIST1D_TRAIN, MNIST1D_TEST)])
def test_qat_converts_to_what_it_trained(teacher, train_file, test_file):
    model = load_model(teacher)
    test = load_data(test_file)
    names = [n for n, m in model.named_modules() if isinstance(m, int8.QUANTIZABLE)]
    base = evaluate(model, test)["accuracy"]
    qat = _fine_tune(int8.prepare_qat(model, names), load_data(train_file))
    with torch.no_grad():
        simulated = qat(test.inputs)
    converted, unseen = int8.convert(copy.deepcopy(qat))
    assert unseen == [] and set(int8.modules_of(converted)) == set(names)
    with torch.no_grad():
        with int8.use_kernel("float"):  # the same float arithmetic as the fake-quant forward
            assert torch.allclose(converted(test.inputs), simulated, rtol=1e-5, atol=1e-5)
        with int8.use_kernel("int_mm"):  # exact integer sums: an input on a rounding tie may land one step off
            assert sqnr_db(simulated, converted(test.inputs)) > 60
    assert (base - evaluate(converted, test)["accuracy"]) * 100 <= 1.0


def test_mnist1d_cnn_static_loses_at_most_one_point():
    model = load_model(MNIST1D_TEACHER)
    test, train = load_data(MNIST1D_TEST), load_data(MNIST1D_TRAIN)
    names = [n for n, m in model.named_modules() if isinstance(m, int8.QUANTIZABLE)]
    base = evaluate(model, test)["accuracy"]
    q = _calibrated(model, names, [x for x, _, _ in train.batches(32)][:16])
    assert {type(q.get_submodule(n)) for n in names} == {int8.StaticInt8Conv, int8.StaticInt8Linear}
    assert (base - evaluate(q, test)["accuracy"]) * 100 <= 1.0


# ---------------------------------------------------------------------------------------------------
# Backends: torch.ao's kernels built from the same integers, where torch.ao imports


def _torch_ao():
    """The backend module, where torch.ao imports; skips elsewhere. Where torch.ao imports and its engine is
    there, the backend must say it is available: its probe once broke (the stand-in module it builds from
    lacked an argument the plain modules had gained) and every torch.ao test skipped instead of failing."""
    import torch

    from modelzip_cli.kernels import torch_ao as quant_backend

    try:
        import torch.ao.nn.quantized.dynamic  # noqa: F401
    except ImportError:
        pytest.skip("torch.ao cannot be imported here (the plain backend is tested above)")
    if quant_backend.ENGINE not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch has no {quant_backend.ENGINE} engine here")
    assert quant_backend.available(), "torch.ao imports here, yet the backend reports it unavailable"
    return quant_backend


def test_torch_ao_backend_runs_the_stored_integers():
    backend = _torch_ao()
    torch.manual_seed(0)
    lin = nn.Linear(256, 512)
    x = torch.randn(64, 256).relu()
    dyn = int8.DynamicInt8Linear.from_float(lin)
    prepared = int8.prepare_static(nn.Sequential(copy.deepcopy(lin)), ["0"], reduced=True)
    with torch.no_grad():
        prepared(torch.randn(64, 256).relu())
    static7 = int8.convert(prepared)[0][0]
    static8 = _calibrated(nn.Sequential(copy.deepcopy(lin)), ["0"], [torch.randn(64, 256).relu()])[0]
    with backend.quiet():
        assert torch.equal(backend._torch_ao_linear(dyn).weight().int_repr(), dyn.qweight)
    with torch.no_grad():
        with int8.use_backend("plain"):
            plain_static = static7(x)
        with int8.use_backend("torch-ao"):
            assert int8.kernels_for(nn.Sequential(dyn, static7, static8), 64) == {
                "0": "torch-ao", "1": "torch-ao", "2": int8.kernel()}  # 8-bit static: fbgemm would overflow
            assert sqnr_db(lin(x), dyn(x)) > 30
            assert sqnr_db(plain_static, static7(x)) > 50  # the same numerics, to float rounding
            assert dyn(x[None]).shape == (1, 64, 512)


def test_auto_uses_torch_ao_only_where_it_measured_faster():
    _torch_ao()
    teacher = load_model(DIGITS_TEACHER)
    q = int8.quantize_dynamic(teacher, _linear_names(teacher), act="per-tensor")
    with int8.use_backend("auto"):
        assert set(int8.kernels_for(q, 1).values()) == {int8.kernel()}  # batch 1: tiny products, plain
        assert int8.kernels_for(q, 256)["layers.3"] == "torch-ao"  # 256·512·256 MACs
        assert int8.kernels_for(q, 256)["layers.9"] == int8.kernel()  # 128 → 10
    with int8.use_backend("plain"):
        assert set(int8.kernels_for(q, 256).values()) == {int8.kernel()}


def test_auto_keeps_per_token_layers_on_their_own_numerics_where_int_mm_is_fast():
    """fbgemm rounds a dynamic layer's activations per tensor to 7 bits; where `_int_mm` runs (VNNI) auto
    leaves a per-token layer on the plain kernels (int_mm or vnni8, the same numerics); elsewhere (no int8
    GEMM) torch.ao is still the only fast one."""
    _torch_ao()
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024)  # above AUTO_MIN_WEIGHTS
    per_token = nn.Sequential(int8.DynamicInt8Linear.from_float(lin))
    x = torch.randn(64, 1024)
    with int8.use_backend("auto"), torch.no_grad():
        with int8.use_kernel("int_mm"):
            assert int8.kernels_for(per_token, 64)["0"] in ("int_mm", "vnni8")
            with int8.use_backend("plain"):
                plain = per_token(x)
            assert torch.equal(per_token(x), plain)
        with int8.use_kernel("float"):
            assert int8.kernels_for(per_token, 64) == {"0": "torch-ao"}
    with int8.use_backend("torch-ao"), int8.use_kernel("int_mm"):  # asked for by name: as asked
        assert int8.kernels_for(per_token, 64) == {"0": "torch-ao"}


def _per_token_reference(dyn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, dyn.in_features).float()
    s = flat.abs().amax(1, keepdim=True).clamp_min(int8.EPS) / 127
    return (torch.round(flat / s) @ dyn.qweight.float().t()) * (s * dyn.weight_scale) + dyn.bias


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("width", [128, 576, 200])
def test_per_token_layer_runs_its_numerics_on_every_kernel(rows, width):
    """The kernels a per-token dynamic layer may run (vnni8 where the VNNI kernel builds and the width is a
    multiple of 16, `_int_mm`) all compute int8 activations per row times the int8 weight: the reference
    below, to float rounding; and the probe's choice is one of them."""
    if not int8.int_mm_is_fast():
        pytest.skip("no fast _int_mm here: per-token layers run the float kernel")
    torch.manual_seed(rows + width)
    dyn = int8.DynamicInt8Linear.from_float(nn.Linear(width, 96))
    x = torch.randn(2, rows, width) * torch.linspace(0.1, 4, width)  # channels of different ranges
    ref = _per_token_reference(dyn, x)
    kernels, geo, stored = dyn._per_token_kernels()
    with int8.use_backend("plain"), int8.use_kernel("int_mm"), torch.no_grad():
        y = dyn(x)
        chosen = kernels.choose(geo, stored, 2 * rows, torch.float32, dyn.bias)
        assert chosen in int8.PER_TOKEN_KERNELS
        torch.testing.assert_close(y.reshape(-1, 96), ref, rtol=1e-5, atol=1e-4)
        for name in int8.PER_TOKEN_KERNELS:
            kernel = wo_kernels.KERNEL_TABLE[name]
            if kernel.unsupported(geo, stored) is None and wo_kernels.available(name):
                run = kernel.bind(geo, kernel.pack(geo, stored), dyn.bias, torch.float32)
                torch.testing.assert_close(run(x).reshape(-1, 96), ref, rtol=1e-5, atol=1e-4)
        assert (width % 16 == 0) or chosen == "int8dyn"  # vnni8 takes groups of a multiple of 16


def test_per_token_layer_rounds_a_half_step_as_torch_does_on_one_row_and_many():
    """x / s, not x · (1 / s): at a half step the two pick different integers (−63 against −64 below), and a
    token's output would depend on the call's row count (vnni8 on one row, `_int_mm` on many)."""
    if not int8.int_mm_is_fast():
        pytest.skip("no fast _int_mm here: per-token layers run the float kernel")
    torch.manual_seed(0)
    dyn = int8.DynamicInt8Linear.from_float(nn.Linear(16, 8))
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 4.625, -2.3125  # x1 = −max/2: −63.5 steps
    bf = torch.randn(128, 576).to(torch.bfloat16)  # bf16 rows land on half steps often
    wide = int8.DynamicInt8Linear.from_float(nn.Linear(576, 64))
    with int8.use_backend("plain"), int8.use_kernel("int_mm"), torch.no_grad():
        torch.testing.assert_close(dyn(x), _per_token_reference(dyn, x), rtol=1e-5, atol=1e-5)
        batch = wide(bf).float()
        alone = torch.cat([wide(row[None]) for row in bf]).float()
    torch.testing.assert_close(alone, batch, rtol=0, atol=1e-2)  # bf16 output rounding only
    torch.testing.assert_close(batch, _per_token_reference(wide, bf.float()), rtol=1e-2, atol=1e-2)


def test_per_token_bound_call_is_left_when_the_kernel_choice_changes():
    """A per-token call bound under one kernel choice is not taken under another: `use_kernel("float")` runs
    the float kernel (activations not rounded), `use_backend("torch-ao")` fbgemm's, grad mode the reference."""
    if not int8.int_mm_is_fast():
        pytest.skip("no fast _int_mm here: per-token layers run the float kernel")
    torch.manual_seed(0)
    dyn = int8.DynamicInt8Linear.from_float(nn.Linear(1024, 1024))
    x = torch.randn(3, 1024)
    with torch.no_grad():
        dyn(x)
        assert dyn._derived.fast is not None  # bound
        torch.testing.assert_close(dyn(x), _per_token_reference(dyn, x), rtol=1e-5, atol=1e-4)
        with int8.use_backend("plain"), int8.use_kernel("float"):
            torch.testing.assert_close(dyn(x), x @ dyn.dequantized_weight().t() + dyn.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dyn(x), _per_token_reference(dyn, x), rtol=1e-5, atol=1e-4)  # grad mode
    from modelzip_cli.kernels import torch_ao

    if torch_ao.available():
        with int8.use_backend("torch-ao"), torch.no_grad():
            assert not torch.equal(dyn(x), _per_token_reference(dyn, x))  # per tensor, 7 bits


@pytest.mark.parametrize("rows", [1, 20, 130])
def test_per_token_layer_follows_weights_written_in_place(rows):
    """A kernel's packed copy is rebuilt when the stored integers or scales are written in place (their
    version counters): the layer computes with what it holds now."""
    torch.manual_seed(rows)
    dyn = int8.DynamicInt8Linear.from_float(nn.Linear(256, 64))
    x = torch.randn(rows, 256)
    with torch.no_grad():
        dyn(x)
        dyn.qweight.copy_(-dyn.qweight)
        dyn.weight_scale.mul_(3)
        dyn.bias.add_(1)
        y = dyn(x)
    if int8.kernel() == "float":
        w = dyn.qweight.float() * dyn.weight_scale[:, None]
        torch.testing.assert_close(y, x @ w.t() + dyn.bias, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(y, _per_token_reference(dyn, x), rtol=1e-4, atol=1e-4)


def test_auto_probes_torch_ao_once_and_falls_back_to_plain_when_its_dtypes_fail(monkeypatch):
    """Issue 26 item 14: torch.ao imports but its quantized dtypes fail (as on a torch that removed them):
    `--backend auto` runs the plain kernels instead of failing on the first large layer."""
    from modelzip_cli.kernels import torch_ao as quant_backend

    def refuse(*args, **kwargs):
        raise RuntimeError("quantized dtypes are gone")

    for fn in ("quantize_per_tensor", "quantize_per_channel", "quantize_per_tensor_dynamic"):
        monkeypatch.setattr(torch, fn, refuse)
    quant_backend.available.cache_clear()
    monkeypatch.setattr(quant_backend, "available", functools.cache(quant_backend.available.__wrapped__))
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024)  # above AUTO_MIN_WEIGHTS: auto would pick torch.ao
    dyn = int8.DynamicInt8Linear.from_float(lin)
    x = torch.randn(64, 1024)
    with torch.no_grad():
        with int8.use_backend("plain"):
            plain = dyn(x)
        with int8.use_backend("auto"):
            assert torch.equal(dyn(x), plain)
            assert int8.kernels_for(nn.Sequential(dyn), 64)["0"] in (int8.kernel(), "vnni8")
    assert not quant_backend.available()
