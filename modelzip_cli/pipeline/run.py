"""Running a model over data where it is: outputs, and accuracy and loss on labelled data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelzip_cli.pipeline.data import Dataset, as_model_input, float_dtype


def device_of(model: nn.Module) -> torch.device:
    """Where the model's tensors are (CPU for a model without parameters or buffers)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")



@torch.inference_mode()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 512) -> dict:
    """Accuracy (0–1) and mean cross-entropy on a labelled dataset, computed where the model is."""
    model.eval()
    device, dtype = device_of(model), float_dtype(model)
    correct, loss_sum = 0, 0.0
    for x, y, _ in data.batches(batch_size):
        logits = model(as_model_input(x, dtype).to(device)).float()
        y = y.to(device)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = len(data)
    return {"accuracy": correct / n, "loss": loss_sum / n, "samples": n}



@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs for `inputs`, computed and returned where the model is."""
    model.eval()
    device = device_of(model)
    inputs = as_model_input(inputs, float_dtype(model))
    outputs = [model(inputs[i:i + batch_size].to(device)).float() for i in range(0, inputs.shape[0], batch_size)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # one batch: no copy (a causal LM's logits)
