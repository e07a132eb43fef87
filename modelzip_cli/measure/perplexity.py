"""Language-model figures: perplexity and next-token agreement of causal LMs on token windows.

A causal LM's compared output is its logits (B, L, V); the token at position t+1 is scored from position t.
Perplexity is exp of the token-weighted mean negative log-likelihood over the positions where both the
predicting and the predicted token are real (attention mask 1), so padding never counts. Next-token
agreement is the share of those positions where a model's top-1 prediction equals the reference model's.
Models are run batch by batch side by side, so no model's logits for the whole set are ever held.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.tokens import ids_and_mask

BATCH = 4  # windows per forward: (4, L, V) logits of each model at a time


def is_causal_lm(model: nn.Module) -> bool:
    return bool(getattr(model, "causal_lm", False))



@torch.inference_mode()
def lm_figures(models: list[nn.Module], inputs: torch.Tensor, batch_size: int = BATCH) -> list[dict]:
    """Per model: perplexity, mean NLL and scored tokens on `inputs`; for every model after the first,
    next-token agreement with the first and the fidelity of its logits to the first's (measure.fidelity's
    figures: cosine per window, mean and minimum, and max |Δ|), all computed batch by batch."""
    nll = [0.0] * len(models)
    agree = [0] * len(models)
    cosines: list[list[torch.Tensor]] = [[] for _ in models]
    max_diff = [0.0] * len(models)
    tokens = 0
    for m in models:
        m.eval()
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start:start + batch_size]
        ids, mask = ids_and_mask(x)
        valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)  # (B, L-1): both tokens real
        target = ids[:, 1:][valid]  # (T,)
        tokens += int(target.numel())
        reference = first = None
        for i, m in enumerate(models):
            device = next((t.device for t in m.parameters()), torch.device("cpu"))
            full = m(x.to(device)).float().cpu()  # (B, L, V)
            logits = full[:, :-1][valid]  # (T, V)
            nll[i] += float(F.cross_entropy(logits, target, reduction="sum"))
            top1 = logits.argmax(-1)
            if reference is None:
                reference, first = top1, full
            agree[i] += int((top1 == reference).sum())
            if i:
                cosines[i].append(F.cosine_similarity(full.flatten(1), first.flatten(1), dim=1, eps=1e-12))
                max_diff[i] = max(max_diff[i], float((full - first).abs().max()))
    out = []
    for i in range(len(models)):
        mean = nll[i] / tokens if tokens else float("nan")
        row = {"perplexity": math.exp(mean) if tokens else float("nan"), "nll": mean, "tokens": tokens}
        if i:
            row["next_token_agreement"] = agree[i] / tokens if tokens else float("nan")
            cosine = torch.cat(cosines[i])
            row["fidelity"] = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                               "max_abs_diff": max_diff[i], "samples": int(cosine.numel())}
        out.append(row)
    return out


def ppl_increase_pct(before: float, after: float) -> float:
    """How much perplexity rose, in percent of the reference's."""
    return (after / before - 1) * 100
