"""`modelzip data`: data files from text (with a model's own tokenizer, offline) or from image folders.

Text: one sample per non-empty line, tokenized by the tokenizer in a model directory (never fetched),
padded or cut to `max_length`; the file holds `inputs` (int64 token ids) and `attention_mask`.
Images: one subfolder per class (the ImageFolder convention, classes in name order), each image resized
to size×size RGB and normalised by per-channel means and standard deviations (ImageNet's by default);
the file holds `inputs` (float N×3×size×size) and `targets`. `split` writes a stratified train/test pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzip_cli.errors import InputError, UsageError, first_line
from modelzip_cli.files import atomic_write, check_output

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_STD = 1e-3  # pixels are in [0, 1]: a smaller std only blows them up (1e-45 made them inf)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Written:
    paths: list[Path]
    samples: list[int]
    shape: list[int]
    classes: list[str] | None = None


def outputs_for(output: Path, split: float | None, force: bool) -> list[Path]:
    """`d.safetensors`, or with --split the pair `d.train.safetensors` and `d.test.safetensors`; checked
    before any work."""
    if split is not None and not 0 < split < 1:
        raise UsageError(f"--split is the training fraction, in (0, 1), got {split}")
    paths = [output] if split is None else [output.with_name(f"{output.stem}.{part}{output.suffix}")
                                           for part in ("train", "test")]
    for path in paths:
        check_output(path, inputs=[], force=force, suffixes=(".safetensors",))
    return paths


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def _split(tensors: dict[str, torch.Tensor], labels: torch.Tensor | None, fraction: float,
           seed: int) -> list[dict[str, torch.Tensor]]:
    """A seeded split, stratified by label when there are labels: each class keeps `fraction` in train."""
    n = next(iter(tensors.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    groups = [torch.arange(n)] if labels is None else [(labels == c).nonzero().flatten() for c in labels.unique()]
    train, test = [], []
    for idx in groups:
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = max(1, min(len(idx) - 1, round(fraction * len(idx)))) if len(idx) > 1 else len(idx)
        train.append(idx[:cut])
        test.append(idx[cut:])
    parts = [torch.cat(train).sort().values, torch.cat(test).sort().values]
    if min(len(p) for p in parts) == 0:
        raise UsageError("--split leaves one side empty", hint="use more samples or a split nearer 0.5")
    return [{k: v[p] for k, v in tensors.items()} for p in parts]


def _write(tensors: dict[str, torch.Tensor], paths: list[Path], split: float | None, seed: int,
           labels: torch.Tensor | None = None) -> list[int]:
    parts = [tensors] if split is None else _split(tensors, labels, split, seed)
    for part, path in zip(parts, paths, strict=True):
        _save(part, path)
    return [next(iter(p.values())).shape[0] for p in parts]


def text(corpus: Path, tokenizer_dir: Path, output: Path, *, max_length: int = 128, split: float | None = None,
         seed: int = 0, force: bool = False) -> Written:
    if max_length < 2:
        raise UsageError(f"--max-length must be ≥ 2, got {max_length}")
    paths = outputs_for(output, split, force)
    if not corpus.is_file():
        raise InputError(f"text file {corpus}: no such file", hint="one sample per line")
    try:
        lines = [line.strip() for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise InputError(f"text file {corpus} is not UTF-8 text") from None
    if not lines:
        raise InputError(f"text file {corpus} has no non-empty line", hint="one sample per line")
    tokenizer = load_tokenizer(tokenizer_dir)
    enc = tokenizer(lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    tensors = {"inputs": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    return Written(paths, _write(tensors, paths, split, seed), [max_length])


def load_tokenizer(path: Path):
    """The tokenizer saved in a model directory, read offline; never fetched."""
    from modelzip_cli.hf import require_transformers

    transformers = require_transformers()
    if not path.is_dir():
        raise InputError(f"--tokenizer {path} is not a directory", hint="pass the model directory")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # unknown schemas, binary vocab files, nesting: tokenizers raises many types
        raise InputError(f"no usable tokenizer in {path} ({first_line(exc, 200)})",
                         hint="pass a model directory with tokenizer.json or vocab files") from None


def images(folder: Path, output: Path, *, size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
           std: tuple[float, ...] = IMAGENET_STD, split: float | None = None, seed: int = 0,
           force: bool = False) -> Written:
    if size < 1:
        raise UsageError(f"--size must be ≥ 1, got {size}")
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) and abs(v) <= 1e3 for v in mean) \
            or not all(MIN_STD <= v <= 1e3 for v in std):  # NaN fails every comparison
        raise UsageError(f"--mean and --std take three finite numbers each (R,G,B), |mean| ≤ 1000 and "
                         f"{MIN_STD:g} ≤ std ≤ 1000, got {list(mean)} and {list(std)}",
                         hint="the defaults are ImageNet's: 0.485,0.456,0.406 and 0.229,0.224,0.225")
    paths = outputs_for(output, split, force)
    if not folder.is_dir():
        raise InputError(f"image folder {folder}: no such folder", hint="one subfolder per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = {c: sorted(p for p in (folder / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    classes = [c for c in classes if files[c]]
    if len(classes) < 2:
        raise InputError(f"image folder {folder} has {len(classes)} class folder(s) with images",
                         hint="put each class's images in its own subfolder; at least two classes")
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("modelzip data images needs Pillow", hint="pip install pillow") from None
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    inputs, targets = [], []
    for label, c in enumerate(classes):
        for p in files[c]:
            try:
                with Image.open(p) as im:
                    rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
            except (OSError, ValueError) as exc:
                raise InputError(f"image {p} is not readable ({exc})", hint="remove or fix it") from None
            x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3)
            inputs.append(((x.permute(2, 0, 1).float() / 255) - m) / s)  # (3, H, W)
            targets.append(label)
    tensors = {"inputs": torch.stack(inputs), "targets": torch.tensor(targets, dtype=torch.long)}
    counts = _write(tensors, paths, split, seed, labels=tensors["targets"])
    return Written(paths, counts, [3, size, size], classes)
