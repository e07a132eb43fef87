"""torch.ao's fbgemm int8 kernels, as an optional accelerator of modelzip's plain-int8 modules.

The one module of modelzip that touches torch.ao: nn.int8 asks `accelerate` for a layer's kernel, and
torch.ao itself is imported when a layer first asks for it. Where
torch.ao cannot be imported (a torch without it, or the test switch that blocks it) the builder answers
None and the plain kernels run.

Why it is still here: on a CPU without AVX512-VNNI (this project's machines are AVX2), fbgemm is the only
int8 GEMM PyTorch reaches, and it reaches it only through torch.ao's quantized ops. Built from the plain
module's own integers (an observer that reports the stored scales, so no integer moves), a dynamic
Linear runs about 3× faster than fp32 at batch 64 and a static one likewise (bench/results/int8.json).
Convolutions are not accelerated: torch.ao's static int8 conv measured no faster than fp32 here.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

ENGINE = "fbgemm"
# fbgemm's dynamic Linear takes one activation range per call, so a sample's result depends on the others
# in its call. Sequences are sent in groups of at most this many rows (whole samples): a large evaluation
# batch then rounds like the batch of 32 × 48 tokens it is deployed at, not coarser (measured on MiniLM:
# cosine 0.990 with 417 sequences in one call, 0.995 in calls of 32).
DYNAMIC_RANGE_ROWS = 2048
AMIN = -128  # nn.int8's static activation grid starts here


class _Probe:
    """What `_torch_ao_linear` reads of a plain int8 Linear: a 4×8 one with unit scales."""

    in_features, out_features = 8, 4
    weight_scale = torch.ones(4)

    def float_params(self, keep: bool = True) -> tuple[torch.Tensor, None]:  # the plain modules' signature
        return torch.ones(4, 8), None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.ao warns on every call that it is deprecated; the user's terminal is not the place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@functools.cache
def available() -> bool:
    """torch.ao's int8 Linear works here: probed once, by building one from a tiny plain module exactly as a
    layer would and running it, and by finding the static op. A torch whose torch.ao imports but whose quantized
    dtypes or ops fail (as when they are removed) answers False, and every layer runs the plain kernels."""
    try:
        with quiet():
            import torch.ao.nn.quantized.dynamic  # noqa: F401
            from torch.ao.quantization.observer import PerChannelMinMaxObserver  # noqa: F401

            if ENGINE not in torch.backends.quantized.supported_engines:
                return False
            with torch.inference_mode(False), torch.no_grad():
                probe = _torch_ao_linear(_Probe())
                ok = probe(torch.ones(2, 8)).shape == (2, 4)
            getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")  # noqa: B009 (the static path's op)
    except Exception:  # ImportError, or a torch whose torch.ao or quantized dtypes are gone or broken
        return False
    return bool(ok)


def _torch_ao_linear(module: nn.Module) -> nn.Module:
    """torch.ao's dynamic Linear holding exactly `module`'s int8 weight, scales and bias."""
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import PlaceholderObserver, QConfig
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    class StoredScales(PerChannelMinMaxObserver):
        """Reports the plain module's scales instead of measuring: every stored integer stays as it is."""

        def calculate_qparams(self):
            scale = module.weight_scale.detach().double()
            return scale, torch.zeros(scale.shape, dtype=torch.int64)

    # qweight · scale, re-quantized by the same scale: the integers come back. Not kept (fbgemm packs its own)
    w, b = module.float_params(keep=False)
    float_linear = nn.Linear(module.in_features, module.out_features, b is not None)
    with torch.no_grad():
        float_linear.weight.copy_(w)
        if b is not None:
            float_linear.bias.copy_(b)
    float_linear.qconfig = QConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.quint8, is_dynamic=True),
        weight=StoredScales.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    torch.backends.quantized.engine = ENGINE
    return nnqd.Linear.from_float(float_linear)


def accelerate(module: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A fbgemm forward for a plain int8 Linear (`kind` "dynamic" or "static": nn.int8's modules), or None."""
    static = kind == "static"
    if not available() or not (kind == "dynamic" or static and module.reduced_range):
        return None  # a full 8-bit static input would overflow fbgemm's int16 sums (int8.affine_qparams)
    with quiet():
        linear = _torch_ao_linear(module)
    k, n = module.in_features, module.out_features
    if not static:  # activations: per tensor, 7 bits (fbgemm's reduce_range)

        def forward(x: torch.Tensor) -> torch.Tensor:
            per_sample = x[0].numel() // k if x.ndim >= 3 else 1  # rows of one sample (tokens of a sequence)
            step = max(1, DYNAMIC_RANGE_ROWS // per_sample)
            if x.ndim < 3 or x.shape[0] <= step:
                y = linear(x.reshape(-1, k).float())  # (..., K) → (M, N)
                return y.reshape(*x.shape[:-1], n).to(x.dtype)
            return torch.cat([forward(x[i:i + step]) for i in range(0, x.shape[0], step)])  # whole samples

        return forward

    packed = linear._packed_params._packed_params
    scale, zp = module.input_qparams()
    zp_u8 = zp - AMIN  # the plain int8 grid [-128, 127] is fbgemm's uint8 grid shifted by 128
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32

    def forward_static(x: torch.Tensor) -> torch.Tensor:
        y = op(x.reshape(-1, k).float().contiguous(), scale, zp_u8, packed)  # (..., K) → (M, N), float
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    return forward_static

