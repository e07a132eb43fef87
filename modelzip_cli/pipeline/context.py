"""What a technique may use besides its config: seed, example input, data, device, and a progress sink.

Techniques never print or touch files; they report progress through `Context.progress`, which the CLI
backs with a rich progress bar on stderr and tests leave silent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from modelzip_cli.pipeline.data import Dataset


class Bar(Protocol):
    def advance(self, steps: int = 1, **fields: Any) -> None: ...


class _NullBar:
    def advance(self, steps: int = 1, **fields: Any) -> None:
        pass


@contextlib.contextmanager
def null_progress(description: str, total: int) -> Iterator[Bar]:
    yield _NullBar()


@dataclass
class Context:
    seed: int = 0
    example_input: torch.Tensor | None = None  # batch of 1, from the manifest or the data
    data: Dataset | None = None  # training / fine-tuning data
    val_data: Dataset | None = None
    calib_data: Dataset | None = None
    eval_data: Dataset | None = None  # held-out data for figures only (never trained or stopped on)
    progress: Callable[[str, int], contextlib.AbstractContextManager[Bar]] = null_progress
    trusted_refs: frozenset[str] = frozenset()  # architectures the user named on the command line
    trust_code: bool = False  # --trust-code: pickled modules the technique reads may be unpickled
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where training runs (--device)
    offload: Path | None = None  # --offload-activations: the folder layer-by-layer calibration keeps activations in
    # --min-fidelity of a quantize command: layers that cost most fidelity are left float until it is met
    min_fidelity: float | None = None
    # what --min-fidelity chooses those layers on without --calib-data: a part of --eval-data the gate never sees
    tune_data: Dataset | None = None

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def calibrate(self, model: torch.nn.Module, batches: int, batch_size: int) -> None:
        """The one calibration pass: the first `batches` batches of the calibration data through `model`,
        without gradients, with a progress bar (observers and hooks on the model record what they need)."""
        with self.progress("calibrate", batches) as bar, torch.no_grad():
            for i, (x, _, _) in enumerate(self.calib_data.batches(batch_size)):
                if i >= batches:
                    break
                model(x)
                bar.advance()
