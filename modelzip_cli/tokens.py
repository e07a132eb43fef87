"""The one convention for token batches: ids (N, L), or ids over their attention mask packed as (N, 2, L).

The mask travels with its ids through batching, shuffling and slicing as one tensor; whatever runs a model
on it (the Hugging Face adapter, ONNX feeds, perplexity, activation statistics) splits it here.
"""

from __future__ import annotations

import torch


def pack(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([ids, mask.long()], dim=1)  # (N, L) + (N, L) → (N, 2, L)


def is_packed(x: torch.Tensor) -> bool:
    return x.ndim == 3 and not x.is_floating_point()


def ids_and_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) ids with an all-ones mask, or (N, 2, L) split into ids and mask."""
    if is_packed(x):
        return x[:, 0], x[:, 1]
    return x, torch.ones_like(x)


def mask_of(x: torch.Tensor) -> torch.Tensor | None:
    """The attention mask a packed batch carries, or None."""
    return x[:, 1] if is_packed(x) else None
