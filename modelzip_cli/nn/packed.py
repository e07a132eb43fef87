"""What every module that stores its weights packed (int8, weight-only int4/int8) shows the rest of modelzip."""

from __future__ import annotations

import torch

from modelzip_cli.kernels.native import count_nonzero


class PackedWeights:
    """Mixin: the dense weights (and bias) that parameter counts, layer tables and sparsity figures read."""

    def logical_weights(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.dequantized_weight()}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def weight_figures(self) -> tuple[list[int], int]:
        """The dense weight's shape and its number of non-zero values (what a layer table shows)."""
        w = self.dequantized_weight()
        return list(w.shape), count_nonzero(w)
