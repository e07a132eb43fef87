"""`--max-memory SIZE`: the peak a run is expected to reach, estimated before any work from the files' headers
(no tensor is read, torch is not needed), and the refusal when it exceeds SIZE (exit 2, nothing written).

The estimate is deliberately simple and errs high: the whole-model path holds the model in float32 about three
times at its peak (the model, the reference copy a step keeps to measure against, the encoded output); a
streamed run holds one module with its transform's temporaries; calibration adds the activations of one block
boundary for every calibration token, in and out.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from modelzip_cli.checkpoint import shards
from modelzip_cli.checkpoint.format import MANIFEST_KEY
from modelzip_cli.errors import UsageError
from modelzip_cli.limits import gb

RUNTIME = 400 << 20  # the interpreter with torch and transformers imported
WHOLE_COPIES = 3  # float32 copies of the model the whole-model path holds at its peak


@dataclass
class Estimate:
    bytes: int
    how: str


def _header_values(path: Path) -> int:
    """Values the tensors of a safetensors file hold, from its header."""
    if not Path(path).is_file():  # a FIFO or a device would block the read: not estimated, refused later
        raise ValueError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(n, 100_000_000)))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def input_values(path: Path) -> int | None:
    """How many values a checkpoint stores, from headers only; None when that cannot be known cheaply."""
    path = shards.resolve(Path(path))
    try:
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if files:
                return sum(_header_values(f) for f in files)
            bins = sorted(path.glob("pytorch_model*.bin"))
            return sum(f.stat().st_size for f in bins) // 2 if bins else None
        if shards.is_index(path):
            return sum(_header_values(f) for f in shards.shard_files(path))
        if path.suffix == ".safetensors":
            return _header_values(path)
        return path.stat().st_size // 2  # a torch archive: at least two bytes a value (fp16), so this errs high
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def hidden_size(path: Path) -> int | None:
    """A Hugging Face config's hidden size (a folder's config.json, or the manifest of a modelzip file)."""
    path = shards.resolve(Path(path))
    config = None
    try:
        if path.is_dir() and (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors" or shards.is_index(path):
            text = (shards.read_index(path)[1] if shards.is_index(path) else shards.read_header(path)[1]).get(
                MANIFEST_KEY)
            kwargs = json.loads(text).get("arch_kwargs") if isinstance(text, str) else None
            config = kwargs.get("config") if isinstance(kwargs, dict) else None
    except Exception:  # an estimate: a file that cannot be read is refused later, with its own error
        return None
    if not isinstance(config, dict):
        return None
    value = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if type(config.get(k)) is int), None)
    return value


def calibration_tokens(path: Path | None) -> int:
    """Tokens (or samples) of a calibration file, from its safetensors header; 0 when unknown."""
    if path is None or Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return 0
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 100_000_000)))
        return math.prod(header["inputs"]["shape"][:2])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return 0


def whole_model(path: Path, calib: Path | None = None, offloaded: bool = False) -> Estimate | None:
    """`offloaded`: --offload-activations keeps the block boundaries on disk (one batch in memory, not counted)."""
    values = input_values(path)
    if values is None:
        return None
    activations = 0 if offloaded else 4 * 4 * calibration_tokens(calib) * (hidden_size(path) or 0)
    how = f"{WHOLE_COPIES} float32 copies of {values:,} values"
    if activations:
        how += f", and {gb(activations)} of calibration activations"
    return Estimate(WHOLE_COPIES * 4 * values + activations + RUNTIME, how)


def check(limit: int | None, estimate: Estimate | None, what: str) -> None:
    """Refuse, before any work, a run whose estimated peak exceeds --max-memory."""
    if limit is None or estimate is None:
        return
    if estimate.bytes > limit:
        raise UsageError(f"{what} needs about {gb(estimate.bytes)} at its peak ({estimate.how}), more than "
                         f"--max-memory {gb(limit)}; nothing was written",
                         hint="raise --max-memory, or run it on a machine with more memory")
