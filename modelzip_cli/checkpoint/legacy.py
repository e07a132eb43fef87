"""First-wave checkpoints (format version 1): torch.ao module layouts read into the plain-int8 modules.

Format 1 stored what torch.ao's quantized modules held: packed Linear parameters (a tuple of a quantized
weight and a float bias), quantized conv weights, "reference" convs (float weight plus its quantization
parameters), each module's *output* scale and zero point, and, on the model, the scale and zero point of
every point where FX conversion quantized a float value. The plain modules (int8.py) want each layer's
*input* scale and zero point instead, so reading a static file walks the float model's graph
(torch.fx.symbolic_trace; no torch.ao) and finds, for each quantized layer, what fed it: another
quantized layer (its output parameters), through ops that keep int8 values as they are (Dropout,
Identity, a ReLU torch.ao fused into the layer before it, a BatchNorm it folded in), or a float value,
which FX quantized with the model-level parameters named after the node that produced it
(`{module_path}_scale_{i}`, or `_scale_{i}` after a function or method, numbered in graph order).

Outputs then match the torch.ao model's to within its final output rounding (tests/test_legacy.py, on the
fixtures in tests/fixtures/v1/). Dynamic LSTM/GRU layers, which torch.ao packed into opaque cell
parameters, cannot be read; such a file gets a one-line error asking to re-quantize the float model.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.checkpoint.edits import DynamicEdit, StaticEdit
from modelzip_cli.checkpoint.format import Manifest, QInts
from modelzip_cli.errors import InputError, first_line
from modelzip_cli.nn import int8

V1_KINDS = {DynamicEdit.kind, StaticEdit.kind}
_MODEL_QPARAM = re.compile(r"^(\w*)_(scale|zero_point)_(\d+)$")  # FX's quantize-node parameters, on the root
_PASS_INT8 = (nn.Dropout, nn.Identity)  # torch.ao runs these on int8 values unchanged
_RELU = (F.relu, torch.relu)
REQUANTIZE = "re-quantize the float model with this version"


def needs_upgrade(manifest: dict) -> bool:
    return manifest.get("format_version", 1) < 2 and any(e.get("kind") in V1_KINDS for e in manifest.get("edits", []))


def upgrade(manifest: Manifest, state: dict[str, Any],
            build: Callable[[list[dict]], nn.Module]) -> tuple[Manifest, dict[str, Any]]:
    """A format-1 manifest and decoded state → their format-2 equivalents. `build(edits)` returns the float
    model with those (format-2) edits replayed: a static layer's input is found on that model's graph."""
    state = dict(state)
    edits: list[dict] = []
    for edit in manifest.edits:
        if edit.get("kind") == DynamicEdit.kind:
            edits.append(_dynamic(edit, state))
        elif edit.get("kind") == StaticEdit.kind:
            edits.append(_static(edit, state, build(list(edits))))
        else:
            edits.append(edit)
    for key in [k for k in state if _MODEL_QPARAM.match(k) or isinstance(state[k], torch.dtype | torch.qscheme)]:
        del state[key]
    return dataclasses.replace(manifest, edits=edits), state


def _weight(q: QInts, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-output-channel scales) of a symmetric torch.ao weight."""
    if q.ints.dtype != torch.int8 or bool(torch.as_tensor(q.zero_point).ne(0).any()):
        raise InputError(f"first-wave layer {name!r} has an asymmetric or unsigned weight, which the plain int8 "
                         "modules do not hold", hint=REQUANTIZE)
    if q.axis not in (None, 0):
        raise InputError(f"first-wave layer {name!r} is quantized along axis {q.axis}",
                         hint=REQUANTIZE)
    out = q.ints.shape[0]
    scale = torch.full((out,), q.scale) if q.axis is None else q.scale.float()
    return q.ints, scale.float().contiguous()


def _packed(state: dict, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(int8 weight, scales, bias) of a torch.ao Linear (`_packed_params`) or quantized conv, removed from
    `state`; None when `name` holds neither."""
    key = f"{name}._packed_params._packed_params"
    if key in state:
        q, bias = state.pop(key)
        state.pop(f"{name}._packed_params.dtype", None)
    elif isinstance(state.get(f"{name}.weight"), QInts):
        q, bias = state.pop(f"{name}.weight"), state.pop(f"{name}.bias", None)
    else:
        return None
    return (*_weight(q, name), bias)


def _store(state: dict, name: str, weight: tuple, input_qparams: tuple[float, int] | None = None) -> None:
    ints, scale, bias = weight
    state[f"{name}.qweight"], state[f"{name}.weight_scale"] = ints, scale
    if bias is not None:
        state[f"{name}.bias"] = bias
    if input_qparams is not None:
        state[f"{name}.input_scale"] = torch.tensor(float(input_qparams[0]), dtype=torch.float32)
        state[f"{name}.input_zero_point"] = torch.tensor(int(input_qparams[1]) + int8.AMIN, dtype=torch.int32)


def _dynamic(edit: dict, state: dict) -> dict:
    for name in edit["modules"]:
        weight = _packed(state, name)
        if weight is None:
            raise InputError(f"first-wave file: {name!r} is a torch.ao dynamic layer other than Linear (LSTM, GRU), "
                             "which cannot be read without torch.ao", hint=REQUANTIZE)
        state.pop(f"{name}.scale", None)
        state.pop(f"{name}.zero_point", None)
        _store(state, name, weight)
    return DynamicEdit(modules=list(edit["modules"]), activations="per-tensor").to_dict()


def _reference(state: dict, name: str) -> bool:
    """A torch.ao "reference" conv (float compute on the quantize-dequantized weight) → a float layer holding
    that weight. Its parameters sit at `name` or, fused with a ReLU, at `name.0`."""
    prefix = next((p for p in (name, f"{name}.0") if f"{p}.weight_scale" in state), None)
    if prefix is None:
        return False
    w, scale, zp = (state.pop(f"{prefix}.{k}") for k in ("weight", "weight_scale", "weight_zero_point"))
    axis = int(state.pop(f"{prefix}.weight_axis", 0))
    for key in ("weight_dtype", "weight_qscheme"):
        state.pop(f"{prefix}.{key}", None)
    shape = [1] * w.ndim
    shape[axis] = -1
    scale, zp = scale.float().reshape(shape), zp.float().reshape(shape)
    q = torch.clamp(torch.round(w.float() / scale) + zp, -128, 127)
    state[f"{name}.weight"] = ((q - zp) * scale).to(w.dtype)
    if f"{prefix}.bias" in state:
        state[f"{name}.bias"] = state.pop(f"{prefix}.bias")
    return True


def _static(edit: dict, state: dict, model: nn.Module) -> dict:
    names = set(edit["modules"])
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:
        raise InputError(f"first-wave static file: the model's forward cannot be traced to map its int8 layers "
                         f"({first_line(exc, 200)})", hint=REQUANTIZE) from None
    modules = dict(model.named_modules())
    int8_out: dict[Any, tuple] = {}  # graph node → output (scale, zero point) of a value torch.ao kept in int8
    float_owner: dict[Any, str] = {}  # graph node → the layer (reference, fused with its ReLU) that produced it
    counters: dict[str, int] = defaultdict(int)
    quantized, folded = [], []

    def model_qparams(src) -> tuple:
        """The scale and zero point FX gave the quantize node it put after `src`."""
        owner = float_owner.get(src) or (src.target if src.op == "call_module" else "")
        prefix = owner.replace(".", "_")
        i = counters[prefix]
        counters[prefix] += 1
        scale, zp = f"{prefix}_scale_{i}", f"{prefix}_zero_point_{i}"
        if scale not in state or zp not in state:
            raise InputError(f"first-wave static file: no activation range {scale!r} for the layer after {src.name}",
                             hint=REQUANTIZE)
        return float(state[scale]), int(state[zp])

    for node in graph.nodes:
        src = node.args[0] if node.args else None
        module = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "call_module" and node.target in names:
            weight = _packed(state, node.target)
            if weight is not None:  # an int8 layer: its input is int8 already, or was quantized by FX
                _store(state, node.target, weight, int8_out[src] if src in int8_out else model_qparams(src))
                int8_out[node] = (float(state.pop(f"{node.target}.scale")), int(state.pop(f"{node.target}.zero_point")))
                quantized.append(node.target)
            elif _reference(state, node.target):
                float_owner[node] = node.target
            continue
        relu = isinstance(module, nn.ReLU) or node.target in _RELU or (node.op, node.target) == ("call_method", "relu")
        if src in int8_out and (relu or isinstance(module, _PASS_INT8)):
            int8_out[node] = int8_out[src]
        elif src in int8_out and isinstance(module, nn.modules.batchnorm._BatchNorm) \
                and f"{node.target}.running_mean" not in state:
            int8_out[node] = int8_out[src]  # folded into the conv before it by torch.ao
            folded.append(node.target)
        elif src in float_owner and relu:
            float_owner[node] = float_owner[src]
    unread = sorted(names - set(quantized) - set(float_owner.values()))
    if unread:  # a layer the model lacks, or one without stored int8 parameters: the edit cannot be replayed
        raise InputError(f"first-wave static file: its edit names {unread[0]!r}, which is not a quantized layer of "
                         "the model", hint=REQUANTIZE)
    return StaticEdit(modules=quantized, qat=bool(edit.get("qat")), observer="first-wave",
                      reduced_range=True, folded=folded or []).to_dict()  # torch.ao x86: 7-bit activations
