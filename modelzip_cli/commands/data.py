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
from modelzip_cli.files import Outputs, Target, check_targets
from modelzip_cli.limits import check_memory, check_regular, parse, read_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_STD = 1e-3  # pixels are in [0, 1]: a smaller std only blows them up (1e-45 made them inf)
MAX_IMAGE_PIXELS = 50_000_000  # one image's pixels (Pillow's own limit is 89M, and it only warns below 179M)
MAX_IMAGES = 1_000_000  # per class folder
TEXT_CHUNK = 1024  # lines tokenized at once
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_LENGTH = 1 << 17  # tokens per sample: beyond any model's context (the tokenizer aborts on far larger)
MAX_SIZE = 4096  # image side in pixels (one 4096² image is 200 MB of float32)


@dataclass
class Written:
    paths: list[Path]
    samples: list[int]
    shape: list[int]
    classes: list[str] | None = None


def outputs_for(output: Path, split: float | None, force: bool, inputs: list[Path]) -> list[Path]:
    """`d.safetensors`, or with --split the pair `d.train.safetensors` and `d.test.safetensors`; checked
    before any work against the inputs (the corpus, the tokenizer's folder, the image folder)."""
    if split is not None and not 0 < split < 1:
        raise UsageError(f"--split is the training fraction, in (0, 1), got {split}")
    paths = [output] if split is None else [output.with_name(f"{output.stem}.{part}{output.suffix}")
                                           for part in ("train", "test")]
    roles = ["output"] if split is None else ["training output", "test output"]
    check_targets([Target(role, path, (".safetensors",)) for role, path in zip(roles, paths, strict=True)],
                  inputs=inputs, force=force)
    return paths


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
    return _write_parts([tensors] if split is None else _split(tensors, labels, split, seed), paths)


def _write_parts(parts: list[dict[str, torch.Tensor]], paths: list[Path]) -> list[int]:
    from safetensors.torch import save_file

    with Outputs() as staged:  # both halves of a split, or neither
        for part, path in zip(parts, paths, strict=True):
            staged.write(path, lambda tmp, part=part: save_file({k: v.contiguous() for k, v in part.items()},
                                                                str(tmp)))
        staged.commit()
    return [next(iter(p.values())).shape[0] for p in parts]


def text(corpus: Path, tokenizer_dir: Path, output: Path, *, max_length: int = 128, split: float | None = None,
         seed: int = 0, force: bool = False) -> Written:
    """One sample per non-empty line, read as a stream and tokenized in chunks into tensors sized once (after
    checking them against the memory limit): 8 MB of short lines no longer become 5 GB of Python lists."""
    if not 2 <= max_length <= MAX_LENGTH:
        raise UsageError(f"--max-length must be in [2, {MAX_LENGTH}], got {max_length}")
    paths = outputs_for(output, split, force, [corpus, tokenizer_dir])
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


# The files a saved tokenizer is made of, in any transformers family (one of them is enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
                   "vocab.json", "tokenizer.tiktoken")


def load_tokenizer(path: Path):
    """The tokenizer saved in a model directory, read offline; never fetched. Any family whose directory
    holds a `tokenizer.json` works, even where its own tokenizer class cannot be built here (a class this
    transformers lacks, or one that needs sentencepiece); one without a padding token pads with its end
    (or unknown) token, which the attention mask then hides."""
    from modelzip_cli.hf import check_files, require_transformers

    transformers = require_transformers()
    if not path.is_dir():
        raise InputError(f"--tokenizer {path} is not a directory", hint="pass the model directory")
    check_files(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"no tokenizer files in {path} (none of {', '.join(TOKENIZER_FILES)})",
                         hint="pass the directory the tokenizer was saved to (tokenizer.save_pretrained(DIR))")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                               trust_remote_code=False)
    except Exception as exc:  # each family's class raises its own kinds (ValueError, ImportError, OSError, …)
        if not (path / "tokenizer.json").is_file():
            raise InputError(f"no usable tokenizer in {path} ({' '.join(str(exc).split())[:300]})",
                             hint="save it with a tokenizer.json (a fast tokenizer's save_pretrained), or install "
                                  "what the message names") from None
        tokenizer = _from_tokenizer_json(transformers, path)
    if tokenizer.pad_token is None:
        pad = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if pad is None:
            raise InputError(f"the tokenizer in {path} has no padding, end or unknown token to pad with",
                             hint="set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = pad  # padded positions have attention_mask 0: what fills them does not matter
    return tokenizer


def _from_tokenizer_json(transformers, path: Path):
    """A generic fast tokenizer from `tokenizer.json`, with the special tokens its tokenizer_config.json names."""
    import json

    try:
        config = parse(json.loads, read_text(path / "tokenizer_config.json", "tokenizer config"),
                       f"{path / 'tokenizer_config.json'}")
    except (OSError, ValueError, InputError):  # unreadable, malformed or nested too deep: no special tokens
        config = {}
    special = {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token")
               and isinstance(v, str)}
    try:
        return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
    except Exception as exc:  # a malformed tokenizer.json
        raise InputError(f"{path / 'tokenizer.json'} is not a readable tokenizer ({' '.join(str(exc).split())[:300]})",
                         hint="save it again with the tokenizer's save_pretrained") from None


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
    if not 1 <= size <= MAX_SIZE:
        raise UsageError(f"--size must be in [1, {MAX_SIZE}] pixels, got {size}")
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) and abs(v) <= 1e3 for v in mean) \
            or not all(MIN_STD <= v <= 1e3 for v in std):  # NaN fails every comparison
        raise UsageError(f"--mean and --std take three finite numbers each (R,G,B), |mean| ≤ 1000 and "
                         f"{MIN_STD:g} ≤ std ≤ 1000, got {list(mean)} and {list(std)}",
                         hint="the defaults are ImageNet's: 0.485,0.456,0.406 and 0.229,0.224,0.225")
    paths = outputs_for(output, split, force, [folder])
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


# ---------------------------------------------------------------------------------------------------
# Language-model windows: documents joined with the tokenizer's EOS and cut into fixed windows

DOCUMENT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}
MAX_DOCUMENT_BYTES = 256 << 20  # one document (or .jsonl file) larger than this is refused, not read


def documents(source: Path) -> list[str]:
    """The documents of a corpus: a text file is one document; a `.jsonl` file one per line (its "text"
    field); a folder, every regular text file under it in name order, each as above."""
    import json

    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in DOCUMENT_SUFFIXES
                       and p.is_file() and not p.is_symlink())
        if not files:
            raise InputError(f"folder {source} holds no text files ({', '.join(sorted(DOCUMENT_SUFFIXES))})")
        return [doc for f in files for doc in documents(f)]
    if not source.is_file():
        raise InputError(f"corpus {source}: no such file or folder", hint="a text file, a .jsonl file or a folder")
    if source.stat().st_size > MAX_DOCUMENT_BYTES:
        raise InputError(f"corpus file {source} is larger than {MAX_DOCUMENT_BYTES >> 20} MB",
                         hint="split it into several files in a folder")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"corpus file {source} is not UTF-8 text") from None
    if source.suffix.lower() != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            raise InputError(f"{source}:{number} is not a JSON object", hint='one {"text": "..."} per line') from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise InputError(f'{source}:{number} has no "text" string', hint='one {"text": "..."} per line')
        docs.append(item["text"])
    return docs


def _windows(tokenizer, docs: list[str], length: int) -> dict[str, torch.Tensor]:
    """Token ids of the documents, each followed by EOS, cut into (N, length) windows; the last window is
    padded (attention mask 0), so no token is dropped."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise InputError("the tokenizer has no end-of-sequence token to join documents with",
                         hint="use a causal LM's tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    parts = [torch.tensor(tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos], dtype=torch.int64)
             for doc in docs]
    ids = torch.cat(parts)
    n = -(-ids.numel() // length)
    mask = torch.zeros(n * length, dtype=torch.int64)
    mask[: ids.numel()] = 1
    ids = torch.cat([ids, torch.full((n * length - ids.numel(),), pad, dtype=torch.int64)])
    return {"inputs": ids.view(n, length), "attention_mask": mask.view(n, length)}  # (N, L) each


def packed_text(corpus: Path, tokenizer_dir: Path, output: Path, *, max_length: int = 512,
                split: float | None = None, seed: int = 0, force: bool = False) -> Written:
    """Language-model windows of `max_length` tokens from a corpus (module docstring). With `split`, the
    documents (never the windows of one document) are divided seeded between the two files."""
    if not 2 <= max_length <= MAX_LENGTH:
        raise UsageError(f"--max-length must be in [2, {MAX_LENGTH}], got {max_length}")
    paths = outputs_for(output, split, force, [corpus, tokenizer_dir])
    docs = documents(corpus)
    if not docs:
        raise InputError(f"corpus {corpus} has no text")
    tokenizer = load_tokenizer(tokenizer_dir)
    if split is None:
        return Written(paths, _write_parts([_windows(tokenizer, docs, max_length)], paths), [max_length])
    if len(docs) < 2:
        raise InputError(f"--split divides documents, and corpus {corpus} is one document",
                         hint="pass a folder of files or a .jsonl file with one document per line")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, min(len(docs) - 1, round(split * len(docs))))
    parts = [_windows(tokenizer, [docs[i] for i in sorted(part)], max_length) for part in (order[:cut], order[cut:])]
    return Written(paths, _write_parts(parts, paths), [max_length])

