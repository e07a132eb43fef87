"""Helpers for tests that forge and corrupt files: rewrite a checkpoint's manifest or tensors, snapshot folders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST_KEY = "modelzip"  # where a modelzip checkpoint keeps its manifest (CONTRACT.md, Checkpoints)


def read_checkpoint(path: Path) -> tuple[dict, str]:
    """(tensors, manifest text) of a modelzip .safetensors or .pt checkpoint."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})[MANIFEST_KEY]
    archive = torch.load(path, weights_only=True)
    return dict(archive["tensors"]), archive[MANIFEST_KEY]


def write_checkpoint(path: Path, tensors: dict, manifest_text: str) -> Path:
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={MANIFEST_KEY: manifest_text})
    else:
        torch.save({MANIFEST_KEY: manifest_text, "tensors": tensors}, path)
    return path


def forge(src: Path, dst: Path, *, manifest: Callable[[Any], Any] | None = None,
          text: Callable[[str], str] | None = None, tensors: Callable[[dict, dict], None] | None = None) -> Path:
    """Copy checkpoint `src` to `dst`, changing on the way: the manifest as JSON (`manifest(d)` edits d in
    place or returns a replacement), the manifest's raw text, or the tensors (`tensors(t, manifest_dict)`
    edits the dict in place)."""
    t, raw = read_checkpoint(src)
    if manifest is not None:
        d = json.loads(raw)
        out = manifest(d)
        raw = json.dumps(d if out is None else out)
    if tensors is not None:
        tensors(t, json.loads(raw))
    if text is not None:
        raw = text(raw)
    return write_checkpoint(dst, t, raw)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: relative path → (size, mtime in ns). Equal snapshots: nothing was written."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def first_encoded(manifest: dict, codec: str) -> str:
    """The name of the first tensor stored with `codec` (bitmask, qtensor, …)."""
    return next(name for name, enc in manifest["encodings"].items() if enc.get("codec") == codec)
