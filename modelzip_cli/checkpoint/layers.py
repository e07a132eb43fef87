"""What a model stores, layer by layer: parameters, scheme, sparsity and the bytes its codecs write.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from modelzip_cli.checkpoint.format import Encoded, encode_module, encode_state
from modelzip_cli.kernels.native import count_nonzero


def _logical_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own weight-like tensors, dense, whatever their storage (float, sparse, quantized)."""
    out: dict[str, torch.Tensor] = {}
    logical = getattr(module, "logical_weights", None)  # modelzip's own packed modules
    if callable(logical):
        return logical()
    for attr in ("weight", "bias"):  # torch.ao quantized modules expose weight()/bias() methods
        fn = getattr(module, attr, None)
        if callable(fn) and not isinstance(fn, nn.Module):
            with contextlib.suppress(Exception):
                t = fn()
                if isinstance(t, torch.Tensor):
                    out[attr] = t.dequantize() if t.is_quantized else t
    for name, p in module.named_parameters(recurse=False):
        out[name] = p.detach()
    return out



def count_parameters(model: nn.Module) -> int:
    """Values of every weight-like tensor, a tensor shared by two layers (tied embeddings) counted once."""
    # Only tensors living in the model's own parameters and buffers can be shared; a dequantized temporary
    # may reuse a freed temporary's address, so it is always counted.
    stored = {t.data_ptr() for t in (*model.parameters(), *model.buffers()) if t.numel() and not t.is_meta}
    seen: set[tuple] = set()
    total = 0
    for m in model.modules():
        for t in _logical_weights(m).values():
            if t.numel() and not t.is_meta and t.data_ptr() in stored:
                key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
                if key in seen:
                    continue
                seen.add(key)
            total += t.numel()
    return total



def _scheme(module: nn.Module, state: dict) -> str:
    scheme = getattr(module, "scheme", None)
    if isinstance(scheme, str):
        return scheme
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.is_quantized:
            return str(v.dtype).removeprefix("torch.")
        if isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor) and v[0].is_quantized:
            return str(v[0].dtype).removeprefix("torch.")
    for v in state.values():
        if isinstance(v, torch.Tensor):
            return str(v.dtype).removeprefix("torch.")
    return "-"



def stored_bytes(state: dict) -> int:
    """Bytes the checkpoint codecs would store for this state (sparse and quantized encodings included)."""
    tensors, _, _ = encode_state(state)
    return sum(t.numel() * t.element_size() for t in tensors.values())



def _own_state_keys(module: nn.Module) -> list[str]:
    """The module's own state keys (not its children's); torch.ao keeps packed weights one level down."""
    return [k for k in module.state_dict() if "." not in k or k.startswith("_packed_params")]



def _weight_figures(module: nn.Module) -> tuple[list[int], int, int] | None:
    """Shape of the module's weight, its own parameter count and the weight's non-zeros (None: no weights).
    Packed modules answer without building their dense weight (a 7B model's MLP would take 180 MB)."""
    figures = getattr(module, "weight_figures", None)
    if callable(figures):
        shape, nnz = figures()
        return shape, math.prod(shape) + (module.bias.numel() if module.bias is not None else 0), nnz
    weights = _logical_weights(module)
    if not weights:
        return None
    w = weights.get("weight", next(iter(weights.values())))
    return list(w.shape), sum(t.numel() for t in weights.values()), count_nonzero(w.detach())


def layer_table(model: nn.Module, names: set[str] | None = None, encoded: Encoded | None = None, *,
                with_bytes: bool = True) -> list[dict]:
    """One row per module that owns weights: name, type, shape, scheme, params, nonzeros, sparsity, bytes.

    Bytes come from one encoding of the whole model (`encoded`, made here when not given); without
    `with_bytes` the rows have no bytes and nothing is encoded."""
    sizes = (encoded or encode_module(model)).sizes() if with_bytes else None
    rows = []
    for name, module in model.named_modules():
        if names is not None and name not in names:
            continue
        figures = _weight_figures(module)
        if figures is None:
            continue
        shape, params, nnz = figures
        keys = _own_state_keys(module)
        state = module.state_dict()
        prefix = f"{name}." if name else ""
        rows.append({
            "name": name or "(root)", "type": type(module).__name__, "shape": shape,
            "scheme": _scheme(module, {k: state[k] for k in keys}),
            "params": params, "nonzero": nnz, "sparsity": round(1 - nnz / max(1, math.prod(shape)), 6),
        })
        if sizes is not None:
            rows[-1]["bytes"] = sum(sizes.get(prefix + k, 0) for k in keys)
    return rows



def model_figures(model: nn.Module, encoded: Encoded | None = None) -> dict:
    """Parameters and stored bytes: the before/after figures every step records."""
    return {"parameters": count_parameters(model), "bytes": (encoded or encode_module(model)).total_bytes()}
