"""Dataset files → validated tensors and loaders (docs/FORMAT.md, "Data files")."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelzip_cli import tokens
from modelzip_cli.errors import InputError, first_line
from modelzip_cli.limits import check_archive, check_memory, check_regular


@dataclass
class Dataset:
    inputs: torch.Tensor  # (N, ...) float32, or int64 token ids
    targets: torch.Tensor | None  # (N,) int64
    path: Path

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None):
        """(inputs, targets, indices) per batch; indices let callers look up cached per-sample values.

        Shuffling gathers the whole dataset once per epoch, so each batch is a slice, not a gather."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator)
            inputs = self.inputs[order]
            targets = self.targets[order] if self.targets is not None else None
        else:
            order, inputs, targets = torch.arange(n), self.inputs, self.targets
        for start in range(0, n, batch_size):
            end = start + batch_size
            yield inputs[start:end], (targets[start:end] if targets is not None else None), order[start:end]


def load_data(path: str | Path, *, require_targets: bool = True) -> Dataset:
    """Read `inputs` and `targets` from .safetensors, .pt (weights_only) or .npz; validate them."""
    path = Path(path)
    check_regular(path, "data file")  # a FIFO would hang the read, a device never end it
    if path.suffix in {".pt", ".pth", ".npz"}:
        check_archive(path, "data file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            raw = load_file(str(path))
        elif path.suffix in {".pt", ".pth"}:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                raw = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            raise InputError(f"data file {path}: unknown suffix {path.suffix!r}",
                             hint="use .safetensors, .pt or .npz")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"data file {path} is not readable ({first_line(exc)})",
                         hint="the file may be truncated, corrupt or hold pickled objects") from None
    if not isinstance(raw, dict) or "inputs" not in raw:
        raise InputError(f"data file {path} has no 'inputs' tensor",
                         hint="store the samples under the key 'inputs' (and labels under 'targets')")
    inputs = torch.as_tensor(raw["inputs"])
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise InputError(f"data file {path}: 'inputs' must be N×… with N ≥ 1, got shape {tuple(inputs.shape)}")
    widened = sum(t.numel() * (4 if t.is_floating_point() else 8)  # the widest each becomes below
                  for t in (raw.get(k) for k in ("inputs", "targets", "attention_mask")) if isinstance(t, torch.Tensor))
    check_memory(widened, f"data file {path}: its tensors as int64 token ids or float32 values",
                 hint="store fewer samples per file")  # 770 MB of int8 became 6.1 GB of int64
    inputs = inputs.long() if not inputs.is_floating_point() and inputs.dtype != torch.bool else inputs.float()
    if inputs.is_floating_point():
        bad = int((~torch.isfinite(inputs)).sum())  # float64 values beyond float32's range count too
        if bad:
            raise InputError(f"data file {path}: 'inputs' holds {bad} non-finite value{'s' * (bad != 1)} "
                             "(NaN or ±inf)", hint="remove or impute them")
    targets = raw.get("targets")
    if targets is None:
        if require_targets:
            raise InputError(f"data file {path} has no 'targets' tensor",
                             hint="store int64 class labels under the key 'targets'")
    else:
        targets = torch.as_tensor(targets)
        if targets.is_floating_point() or targets.ndim != 1:
            raise InputError(f"data file {path}: 'targets' must be N integer labels, "
                             f"got {targets.dtype} of shape {tuple(targets.shape)}")
        targets = targets.long()
        if targets.shape[0] != inputs.shape[0]:
            raise InputError(f"data file {path}: {inputs.shape[0]} inputs but {targets.shape[0]} targets",
                             hint="inputs and targets must have the same length")
        if int(targets.min()) < 0:
            raise InputError(f"data file {path}: label {int(targets.min())} is negative",
                             hint="labels are class indices 0 … classes − 1")
    mask = raw.get("attention_mask")
    if mask is not None:
        inputs = _with_mask(path, inputs, torch.as_tensor(mask))
    return Dataset(inputs=inputs.contiguous(), targets=targets, path=path)


def _with_mask(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token ids (N, L) and their attention mask → (N, 2, L): the mask travels with its ids through
    batching, shuffling and slicing, and the Hugging Face adapter splits them again."""
    if ids.is_floating_point() or ids.ndim != 2:
        raise InputError(f"data file {path}: 'attention_mask' goes with int64 token ids of shape N×L, "
                         f"got 'inputs' {ids.dtype} of shape {tuple(ids.shape)}")
    if mask.shape != ids.shape or mask.is_floating_point():
        raise InputError(f"data file {path}: 'attention_mask' must be integers of the shape of 'inputs' "
                         f"{tuple(ids.shape)}, got {mask.dtype} of shape {tuple(mask.shape)}")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise InputError(f"data file {path}: 'attention_mask' holds values other than 0 and 1")
    return tokens.pack(ids, mask)


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first floating parameter, else buffer (quantized modules
    keep float32 scales beside parameters of the model's dtype), else float32."""
    for tensors in (model.parameters(), model.buffers()):
        for t in tensors:
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def as_model_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float inputs cast to the model's dtype (fp16, bf16, fp64 models); token ids stay integers."""
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


def check_fits(model: nn.Module, data: Dataset, input_shape: list[int] | None = None) -> int:
    """Check the data fits the model; return the model's number of outputs."""
    feature = list(data.inputs.shape[1:])
    if input_shape and data.inputs.is_floating_point() and list(input_shape[1:]) != feature:
        raise InputError(f"data file {data.path}: samples of shape {feature} do not fit the model, "
                         f"which takes {list(input_shape[1:])}", hint="pass data made for this model")
    try:  # (torch.fx modules print their own traceback when they fail: the error below is the one line)
        with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
            out = model(as_model_input(data.inputs[:2], float_dtype(model)))
    except Exception as exc:
        raise InputError(f"data file {data.path}: samples of shape {feature} do not fit the model "
                         f"({first_line(exc)})", hint="pass data made for this model") from None
    if data.targets is None:
        return out.shape[-1]
    if out.ndim != 2:
        raise InputError(f"data file {data.path} has labels, but the model outputs shape {tuple(out.shape)}, "
                         "not (N, classes)", hint="pass unlabelled data (no 'targets') to measure fidelity")
    classes = out.shape[1]
    if int(data.targets.max()) >= classes:
        raise InputError(f"data file {data.path}: label {int(data.targets.max())} but the model has "
                         f"{classes} outputs", hint="pass data made for this model")
    return classes
