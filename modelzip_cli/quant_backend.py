"""The one place that calls a quantization backend.

Measured on this machine (2 CPUs, torch 2.13): torch.ao.quantization's x86 int8 kernels beat fp32 by
3–4× on Linear layers at batch 64, while torchao 0.18's eager int8 path reached only 1.25× (see
bench/results/quantize.json). torch.ao is deprecated, so every call to it lives here, with its
deprecation warnings silenced, ready to be swapped when it is removed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

ENGINE = "x86"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.ao warns on every call that it is deprecated; the user's terminal is not the place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _engine() -> None:
    if ENGINE in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = ENGINE


def dynamic(model: nn.Module, names: set[str]) -> nn.Module:
    """int8 weights, activations quantized per batch at run time (Linear, LSTM, GRU)."""
    from torch.ao.quantization import quantize_dynamic

    _engine()
    with quiet():
        return quantize_dynamic(model, qconfig_spec=set(names), dtype=torch.qint8, inplace=False)


def _qconfig_mapping(skip: set[str], qat: bool):
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping

    mapping = get_default_qat_qconfig_mapping(ENGINE) if qat else get_default_qconfig_mapping(ENGINE)
    for name in sorted(skip):
        mapping.set_module_name(name, None)
    return mapping


def prepare_static(model: nn.Module, example: torch.Tensor, skip: set[str], *, qat: bool = False) -> nn.Module:
    """Trace the model (torch.fx), fuse Conv/Linear + BatchNorm + ReLU, insert observers (or fake-quant for QAT)."""
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    _engine()
    with quiet():
        if qat:
            return prepare_qat_fx(model.train(), _qconfig_mapping(skip, qat=True), (example,))
        return prepare_fx(model.eval(), _qconfig_mapping(skip, qat=False), (example,))


def convert_static(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet():
        return convert_fx(prepared.eval())


def freeze_observers(prepared: nn.Module) -> None:
    """QAT: stop updating observer ranges and BatchNorm statistics (the last fine-tuning epochs).

    Fused Conv+BN modules keep the flag across `train()`; plain BatchNorm layers are put in eval mode,
    which the training loop's `model.train()` undoes, so this runs at the start of every frozen epoch."""
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import disable_observer

    with quiet():
        prepared.apply(disable_observer)
        prepared.apply(freeze_bn_stats)
    for m in prepared.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
