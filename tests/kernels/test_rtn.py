"""kernels/rtn.c: round-to-nearest in C gives the bits of torch's reference (`nn.weight_only.rtn`)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from modelzip_cli.kernels import native
from modelzip_cli.nn.weight_only import WeightOnlyLinear, rtn

HAVE_CC = bool(shutil.which("gcc") or shutil.which("cc"))


def _reference(weight: torch.Tensor, bits: int, group: int) -> WeightOnlyLinear:
    out, cols = weight.shape
    layer = WeightOnlyLinear(cols, out, False, bits, group)
    layer._store(rtn(weight, bits, layer.group_size))
    return layer


def _hard_weight(out: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian rows and the rows that test the clamps and ties: zeros, all positive, all negative, constant,
    values on the rounding boundaries (x.5 steps of a scale, and a zero point of 6.5), a huge and a tiny group."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, cols, generator=g) * 0.02
    w[0] = 0
    w[1] = w[1].abs() + 0.5
    w[2] = -w[2].abs() - 0.5
    w[3] = 0.25
    w[4] = torch.arange(cols) % 31 * 0.5 - 7.5  # halves: round-half-to-even decides
    w[5] = w[5] * 1e6
    w[6] = w[6] * 1e-14
    w[7] = torch.arange(cols) % 31 * 0.5 - 6.5  # [−6.5, 8.5]: scale 1, zero point round(6.5) = 6, half to even
    return w.to(dtype)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler here")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_native_rtn_gives_the_bits_of_torchs_reference(bits, dtype, group):
    weight = _hard_weight(40, 256, dtype)
    layer = WeightOnlyLinear(256, 40, False, bits, group)
    assert layer._quantize_natively(weight)  # the C pass ran (group 256: one group per row)
    ref = _reference(weight, bits, group)
    for name in ("qweight", "scales", "zero_points"):
        assert torch.equal(getattr(layer, name), getattr(ref, name)), name
    assert layer.weight_figures() == ref.weight_figures() == ([40, 256], int(torch.count_nonzero(
        ref.dequantized_weight())))


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler here")
def test_what_the_c_pass_does_not_take_goes_to_torch_with_the_same_result():
    """A width the groups do not tile, float16, a value that is not finite: torch's rtn decides."""
    ragged = _hard_weight(16, 576, torch.float32)
    layer = WeightOnlyLinear(576, 16, False, 4, 128)
    assert not layer._quantize_natively(ragged)
    half = _hard_weight(16, 256, torch.float16)
    assert not WeightOnlyLinear(256, 16, False, 4, 64)._quantize_natively(half)
    bad = _hard_weight(16, 256, torch.float32)
    bad[9, 77] = float("nan")
    assert not WeightOnlyLinear(256, 16, False, 4, 64)._quantize_natively(bad)
    for w, group in ((ragged, 128), (half, 64)):
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w
        got, ref = WeightOnlyLinear.from_float(linear, 4, group), _reference(w, 4, group)
        assert torch.equal(got.qweight, ref.qweight) and torch.equal(got.scales, ref.scales)


def test_without_a_c_compiler_weight_only_quantization_runs_on_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MODELZIP_CACHE_DIR", str(tmp_path))
    native.rtn.cache_clear()
    try:
        weight = _hard_weight(24, 128, torch.bfloat16)
        layer = WeightOnlyLinear(128, 24, False, 4, 32)
        assert native.rtn() is None and not layer._quantize_natively(weight)
        linear = nn.Linear(128, 24, bias=False)
        linear.weight.data = weight
        got, ref = WeightOnlyLinear.from_float(linear, 4, 32), _reference(weight, 4, 32)
        assert torch.equal(got.qweight, ref.qweight) and got.weight_figures() == ref.weight_figures()
    finally:
        native.rtn.cache_clear()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8,
                                   torch.int8, torch.int16, torch.int32, torch.int64])
def test_counts_in_c_are_torchs(dtype):
    """Non-zeros (−0.0 is zero, NaN is not) and, for floats, whether every value is finite: the C pass's answer
    is torch's, at the end of a block and of the tensor too."""
    n = native.COUNT_FROM + 32768 + 5  # a ragged last block
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(n, generator=g) * 3).to(dtype)
    t[::3] = 0
    if dtype.is_floating_point:
        t[1::7] = -0.0
        t[5] = float("nan")
    assert native.rtn() is not None
    assert native.count_nonzero(t) == int(torch.count_nonzero(t))
    if not dtype.is_floating_point:
        assert native.all_finite(t) is None
        return
    t[5] = 1.0
    assert native.all_finite(t) is True
    t[-1] = torch.finfo(dtype).max  # finite, every exponent bit but one set
    assert native.all_finite(t) is True
    for bad, where in ((float("nan"), -1), (float("inf"), 32768), (-float("inf"), 0)):
        u = t.clone()
        u[where] = bad
        assert native.all_finite(u) is False


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler here")
def test_scan_counts_and_checks_in_one_pass_and_rtn_counts_what_it_wrote():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.bfloat16, torch.float32):
        t = torch.randn(native.COUNT_FROM + 77, generator=g).to(dtype)
        t[::5] = 0
        t[1::9] = -0.0
        assert native.scan(t) == (int(torch.count_nonzero(t)), True)
        t[-1] = float("inf")
        assert native.scan(t) == (int(torch.count_nonzero(t)), False)
    weight = _hard_weight(64, 512, torch.bfloat16)
    for bits in (4, 8):
        layer = WeightOnlyLinear(512, 64, False, bits, 128)
        assert layer._quantize_natively(weight)
        counted = layer.weight_figures()  # the count rtn.c returned as it wrote the integers
        del layer.__dict__["_counted"]
        assert counted == layer.weight_figures() == _reference(weight, bits, 128).weight_figures()
        layer.qweight.zero_()  # changed in place: counted again, not remembered
        assert layer.weight_figures()[1] == int(torch.count_nonzero(layer.dequantized_weight())) != counted[1]
