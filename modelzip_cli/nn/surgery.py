"""Module surgery shared by techniques and by the replay of their edits on load.

One implementation of each change (swap a module, remove attention heads, fold a BatchNorm, factorize a
Linear), used when a technique makes the change and when a checkpoint's edit log is replayed.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from modelzip_cli.errors import CORRUPT, InputError
from modelzip_cli.nn import int8


def to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a model's float tensors to `dtype` (a technique's result back to its input's dtype), except the
    scales of modelzip's quantized modules (int8, weight-only), which stay float32: they compute in float32
    and give their output in the input's dtype."""
    keep = [(m, name, b) for m in model.modules() if callable(getattr(m, "logical_weights", None))
            for name, b in m.named_buffers(recurse=False) if b.is_floating_point()]
    model.to(dtype)
    for m, name, b in keep:
        setattr(m, name, b)
    return model



def submodule(model: nn.Module, name: str, types: tuple[type, ...], what: str) -> nn.Module:
    """The submodule an edit names, which must exist and be one of `types`."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise InputError(f"there is no module {name!r} in the model", hint=CORRUPT) from None
    if not isinstance(m, types):
        raise InputError(f"module {name!r} is a {type(m).__name__}, not a {what}", hint=CORRUPT)
    return m



def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)



@contextlib.contextmanager
def quiet_pruning() -> Iterator[None]:
    """Torch-Pruning prints and warns while tracing; keep the user's terminal clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield



def dependency_graph(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning's dependency graph: which layers must shrink together."""
    import torch_pruning as tp

    with quiet_pruning(), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)



def run_with_hooks(model: nn.Module, example: torch.Tensor, hooks: list) -> None:
    """One forward pass on `example` (no gradients) with these hook handles in place; removed afterwards."""
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()



QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))



HEAD_COUNT_ATTRS = ("num_attention_heads", "n_heads", "num_heads", "heads")



def attention_blocks(model: nn.Module, example: torch.Tensor) -> tuple[list[dict], list[tuple[str, str]]]:
    """The attention modules whose heads can be removed — `{"q", "k", "v", "o", "head_size"}` (qualified
    names) — and (name, why) for each attention module found but left (fused or grouped projections)."""
    order: list[str] = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    run_with_hooks(model, example, [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
                                    for n, m in linears.items()])
    blocks, left = [], []
    for name, m in model.named_modules():
        names = next((t for t in QKV_NAMES if all(isinstance(getattr(m, c, None), nn.Linear) for c in t)), None)
        if names is None:
            continue
        q, k, v = (f"{name}.{c}" if name else c for c in names)
        widths = {linears[x].out_features for x in (q, k, v)}
        head_size = getattr(m, "attention_head_size", None) or getattr(m, "head_dim", None)
        count = next((getattr(m, a) for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int)), None)
        if head_size is None and count and len(widths) == 1 and next(iter(widths)) % count == 0:
            head_size = next(iter(widths)) // count  # only a head count kept: the size follows
        if not isinstance(head_size, int) or len(widths) != 1 or next(iter(widths)) % head_size:
            left.append((name, "attention with grouped or unequal q/k/v widths left as it was"))
            continue
        width = widths.pop()
        after = order[order.index(v) + 1:] if v in order else []
        o = next((x for x in after if x not in (q, k, v) and linears[x].in_features == width), None)
        if o is None:
            left.append((name, f"no output projection found after {v}; its heads left as they were"))
            continue
        blocks.append({"q": q, "k": k, "v": v, "o": o, "head_size": head_size})
    return blocks, left



def head_channels(heads: list[int], head_size: int) -> list[int]:
    return [h * head_size + i for h in heads for i in range(head_size)]



def remove_heads(model: nn.Module, block: dict, heads: list[int]) -> None:
    """Remove `heads` (indices among the block's current heads) from q, k, v and the output projection, and
    lower the attention module's head count where it keeps one."""
    import torch_pruning as tp

    idxs = head_channels(sorted(heads), block["head_size"])
    with quiet_pruning():
        for x in ("q", "k", "v"):
            tp.prune_linear_out_channels(model.get_submodule(block[x]), idxs)
        tp.prune_linear_in_channels(model.get_submodule(block["o"]), idxs)
    attn = model.get_submodule(block["q"].rpartition(".")[0]) if "." in block["q"] else model
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, getattr(attn, attr) - len(heads))
    if isinstance(getattr(attn, "all_head_size", None), int):
        attn.all_head_size -= len(idxs)



def heads_row(block: dict, heads: list[int]) -> list:
    return [block["q"], block["k"], block["v"], block["o"], block["head_size"], sorted(heads)]



def factorized(in_features: int, out_features: int, rank: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))



def plain_int8(layer: nn.Module, kind: str, activations: str = "per-token", reduced_range: bool = False,
               smoothed: bool = False) -> nn.Module:
    """An empty plain-int8 module shaped like the float `layer` (the stored tensors fill it)."""
    if kind == "dynamic":
        return int8.DynamicInt8Linear(layer.in_features, layer.out_features, layer.bias is not None, activations,
                                      layer.weight.dtype, smoothed)
    if isinstance(layer, nn.Linear):
        return int8.StaticInt8Linear(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.dtype,
                                     reduced_range)
    int8.check_conv(layer)
    return int8.StaticInt8Conv(layer.weight.ndim - 2, layer.in_channels, layer.out_channels, layer.kernel_size,
                               layer.stride, layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                               layer.weight.dtype, reduced_range)



CONVS = (nn.Conv1d, nn.Conv2d)



def conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor, convs: set[str]) -> list[list[str]]:
    """[conv, batchnorm] for every BatchNorm that reads exactly the output of one of `convs` (and nothing
    else reads it first), found by running the example."""
    produced: dict[int, str] = {}
    pairs: list[list[str]] = []
    hooks = []
    for name, m in model.named_modules():
        if name in convs and isinstance(m, CONVS):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: produced.__setitem__(id(o), n)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.affine:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, i, n=name: pairs.append([produced[id(i[0])], n]) if id(i[0]) in produced else None))
    run_with_hooks(model, example, hooks)
    seen, unique = set(), []
    for conv, bn in pairs:  # a module run twice is paired once
        if conv not in seen and bn not in {b for _, b in unique}:
            seen.add(conv)
            unique.append([conv, bn])
    return unique



@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[list[str]], values: bool = True) -> None:
    """Fold each BatchNorm into its conv (weight and bias; `values=False` only reshapes, for replays) and put
    an Identity where the BatchNorm was."""
    for conv_name, bn_name in pairs:
        conv = submodule(model, conv_name, CONVS, "Conv1d or Conv2d")
        bn = submodule(model, bn_name, (nn.modules.batchnorm._BatchNorm,), "BatchNorm")
        if bn.num_features != conv.out_channels:
            raise InputError(f"{bn_name} ({bn.num_features} features) does not follow {conv_name} "
                             f"({conv.out_channels} channels)", hint=CORRUPT)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        if values:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.ndim - 1)).to(conv.weight.dtype))
            conv.bias.copy_(((conv.bias - bn.running_mean) * scale + bn.bias).to(conv.bias.dtype))
        replace_module(model, bn_name, nn.Identity())
