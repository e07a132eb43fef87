"""`modelzip data`: data files from text (with a model's own tokenizer, offline) or from image folders.

Text: one sample per non-empty line, tokenized by the tokenizer in a model directory (never fetched),
padded or cut to `max_length`; the file holds `inputs` (int64 token ids) and `attention_mask`.
Images: one subfolder per class (the ImageFolder convention, classes in name order), each image resized
to size×size RGB and normalised by per-channel means and standard deviations (ImageNet's by default);
the file holds `inputs` (float N×3×size×size) and `targets`. `split` writes a stratified train/test pair.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzip_cli.errors import InputError, UsageError, first_line
from modelzip_cli.files import atomic_write, check_output
from modelzip_cli.limits import check_memory, check_regular

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_STD = 1e-3  # pixels are in [0, 1]: a smaller std only blows them up (1e-45 made them inf)
MAX_IMAGE_PIXELS = 50_000_000  # one image's pixels (Pillow's own limit is 89M, and it only warns below 179M)
MAX_IMAGES = 1_000_000  # per class folder
MAX_LENGTH = 1 << 16  # tokens per sample: the longest context of a real model is far shorter
TEXT_CHUNK = 1024  # lines tokenized at once
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
    """One sample per non-empty line, read as a stream and tokenized in chunks into tensors sized once (after
    checking them against the memory limit): 8 MB of short lines no longer become 5 GB of Python lists."""
    if max_length < 2:
        raise UsageError(f"--max-length must be ≥ 2, got {max_length}")
    if max_length > MAX_LENGTH:
        raise UsageError(f"--max-length must be ≤ {MAX_LENGTH:,}, got {max_length:,}")
    paths = outputs_for(output, split, force)
    check_regular(corpus, "text file")
    n = sum(1 for _ in _lines(corpus))
    if not n:
        raise InputError(f"text file {corpus} has no non-empty line", hint="one sample per line")
    check_memory(n * max_length * 8 * 2 * (2 if split is not None else 1),
                 f"{n:,} lines of {max_length} tokens (ids and mask, int64)", hint="use a smaller --max-length")
    tokenizer = load_tokenizer(tokenizer_dir)
    ids, mask = torch.empty(n, max_length, dtype=torch.long), torch.empty(n, max_length, dtype=torch.long)
    chunk: list[str] = []
    done = 0
    for i, line in enumerate(_lines(corpus), 1):
        chunk.append(line)
        if len(chunk) == TEXT_CHUNK or i == n:
            try:
                enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt")
            except Exception as exc:  # a tokenizer that cannot pad (no pad token) or encode this text
                raise InputError(f"the tokenizer in {tokenizer_dir} cannot encode {corpus} ({first_line(exc, 200)})",
                                 hint="pass a model directory whose tokenizer pads") from None
            ids[done:done + len(chunk)], mask[done:done + len(chunk)] = enc["input_ids"], enc["attention_mask"]
            done, chunk = done + len(chunk), []
    tensors = {"inputs": ids, "attention_mask": mask}
    return Written(paths, _write(tensors, paths, split, seed), [max_length])


def _lines(corpus: Path):
    """The stripped non-empty lines of a UTF-8 text file, one at a time."""
    try:
        with corpus.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()
    except UnicodeDecodeError:
        raise InputError(f"text file {corpus} is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"text file {corpus} cannot be read ({exc.strerror})") from None


def load_tokenizer(path: Path):
    """The tokenizer saved in a model directory, read offline; never fetched."""
    from modelzip_cli.hf import check_files, require_transformers

    transformers = require_transformers()
    if not path.is_dir():
        raise InputError(f"--tokenizer {path} is not a directory", hint="pass the model directory")
    check_files(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # unknown schemas, binary vocab files, nesting: tokenizers raises many types
        raise InputError(f"no usable tokenizer in {path} ({first_line(exc, 200)})",
                         hint="pass a model directory with tokenizer.json or vocab files") from None


def image_files(folder: Path) -> dict[str, list[Path]]:
    """Class name → its image files: class folders inside `folder` (a link out of it, to `/` say, is an error,
    not a walk of the filesystem), their files found without following links to folders, each a regular file."""
    root = folder.resolve()
    out: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue
        if not entry.resolve().is_relative_to(root) or entry.resolve() == root:
            raise InputError(f"class folder {entry} links outside the image folder {folder}",
                             hint="copy or move the images into the class folder")
        found = []
        for top, dirs, names in os.walk(entry, followlinks=False):
            dirs.sort()
            found += [Path(top) / name for name in sorted(names) if Path(name).suffix.lower() in IMAGE_SUFFIXES]
            if len(found) > MAX_IMAGES:
                raise InputError(f"class folder {entry} holds more than {MAX_IMAGES:,} images",
                                 hint="split the images into several data files")
        for p in found:
            check_regular(p, "image")
        out[entry.name] = found
    return out


def _read_image(Image, path: Path, size: int) -> torch.Tensor:
    """One image as (size, size, 3) uint8. Pillow refuses images of more than MAX_IMAGE_PIXELS (decompression
    bombs of any format), and a JPEG is decoded at a reduced scale when that is enough."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width}×{im.height} pixels")
                im.draft("RGB", (size, size))
                rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, its bomb errors, …
        raise InputError(f"image {path} is not readable ({first_line(exc, 200)})", hint="remove or fix it") from None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3)


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
    files = image_files(folder)
    classes = [c for c in files if files[c]]
    if len(classes) < 2:
        raise InputError(f"image folder {folder} has {len(classes)} class folder(s) with images",
                         hint="put each class's images in its own subfolder; at least two classes")
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("modelzip data images needs Pillow", hint="pip install pillow") from None
    n = sum(len(files[c]) for c in classes)
    check_memory(n * 3 * size * size * 4 * (2 if split is not None else 1),
                 f"{n:,} images of 3×{size}×{size} float32", hint="use a smaller --size, or fewer images per file")
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    inputs, targets = torch.empty(n, 3, size, size), torch.empty(n, dtype=torch.long)  # filled one image at a time
    i = 0
    for label, c in enumerate(classes):
        for p in files[c]:
            x = _read_image(Image, p, size)  # (H, W, 3) uint8
            inputs[i] = ((x.permute(2, 0, 1).float() / 255) - m) / s  # (3, H, W)
            targets[i] = label
            i += 1
    tensors = {"inputs": inputs, "targets": targets}
    counts = _write(tensors, paths, split, seed, labels=tensors["targets"])
    return Written(paths, counts, [3, size, size], classes)
