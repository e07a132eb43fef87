"""Hugging Face models: a model directory as an input, and `hf:TASK` architectures built from a config.

A transformers model takes keyword inputs and returns a `ModelOutput`; modelzip's techniques and
measurements call `model(x)` and compare one tensor. `HFModel` bridges the two:

- in: int64 token ids (N, L), or (N, 2, L) with the attention mask stacked under the ids (how a data file's
  `attention_mask` travels through batching, shuffling and slicing), or float images (N, C, H, W);
- out: the compared tensor — `logits` when the output has them, else the attention-masked mean of
  `last_hidden_state` (the sentence-embedding convention), else its first tensor; `output_key` overrides.

Models are built with transformers' Auto classes from the config, never with remote code; the manifest
keeps the whole config, so a modelzip checkpoint of an HF model loads without the original directory.
transformers is an optional extra (`pip install 'modelzip[hf]'`), imported only here and only when used.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelzip_cli import tokens
from modelzip_cli.errors import InputError, ModelzipError, UsageError, first_line
from modelzip_cli.limits import check_memory, check_regular, parse, read_text

# --task → the Auto class that builds it
TASKS = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}
# the suffix of a config's `architectures` entry → its task
_ARCH_SUFFIXES = (("ForSequenceClassification", "sequence-classification"),
                  ("ForTokenClassification", "token-classification"), ("ForMaskedLM", "masked-lm"),
                  ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                  ("ForImageClassification", "image-classification"))
EXAMPLE_TOKENS = 32  # example sequence length when nothing else says


# Where torchao is installed, transformers imports it with its model classes, and that import logs to stderr on
# every command: the CUDA extensions a CPU build cannot load ("Failed to load …_C_mxfp8…") and torch's notice
# that torchao registers Enum subclasses the deprecated way. Neither is the user's business.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def require_transformers():
    import os

    # Never reach for a hub: weights come from the user's files, and a config naming "org/repo" (an
    # attn_implementation, a tokenizer) must not go online whatever HF_HUB_OFFLINE said before.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants
        import transformers
    except ImportError:
        raise UsageError("Hugging Face models need the transformers package",
                         hint="pip install 'modelzip[hf]'") from None
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at import: it may have been imported before
    transformers.logging.set_verbosity_error()  # its warnings are not the user's business here
    transformers.logging.disable_progress_bar()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return transformers


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def task_for(config: dict, task: str | None = None) -> str:
    """`--task`, else the task the config's `architectures` names, else feature extraction."""
    if task is not None:
        if task not in TASKS:
            raise UsageError(f"unknown --task {task!r}", hint="use one of " + ", ".join(TASKS))
        return task
    archs = config.get("architectures")
    for arch in archs if isinstance(archs, list) else []:  # a forged value of another type names no task
        for suffix, name in _ARCH_SUFFIXES:
            if str(arch).endswith(suffix):
                return name
    return "feature-extraction"


def select_output(out: Any, mask: torch.Tensor | None, key: str | None = None) -> torch.Tensor:
    """The one tensor modelzip compares from a model's output (module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        if key is not None:
            if key not in out or not isinstance(out[key], torch.Tensor):
                raise InputError(f"the model's output has no tensor {key!r}",
                                 hint="--output-key one of " + ", ".join(k for k, v in out.items()
                                                                        if isinstance(v, torch.Tensor)))
            value = out[key]
            return _pool(value, mask) if key == "last_hidden_state" else value
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        if isinstance(out.get("last_hidden_state"), torch.Tensor):
            return _pool(out["last_hidden_state"], mask)
        values = list(out.values())
    else:
        values = list(out) if isinstance(out, (tuple, list)) else []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise InputError(f"the model's output ({type(out).__name__}) holds no tensor to compare")


def _pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if hidden.ndim == 4:  # (B, C, H, W) feature maps: global average pool
        return hidden.mean(dim=(2, 3))
    if hidden.ndim != 3:
        return hidden.flatten(1)
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (B, D)


class HFModel(nn.Module):
    """A transformers model as modelzip sees it: one tensor in, one tensor out (module docstring)."""

    def __init__(self, model: nn.Module, output_key: str | None = None, task: str = "feature-extraction"):
        super().__init__()
        self.model = model
        self.output_key = output_key
        # class logits (N, classes) get a top-1 agreement; embeddings and per-token outputs do not
        self.outputs_class_logits = task in {"sequence-classification", "image-classification"} and (
            output_key in (None, "logits"))
        # next-token logits (B, L, V): perplexity and next-token agreement (lm.py)
        self.causal_lm = task == "causal-lm" and output_key in (None, "logits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if x.is_floating_point():
            out = self.model(pixel_values=x)  # (B, C, H, W) images
        else:
            mask = tokens.mask_of(x)
            x = tokens.ids_and_mask(x)[0]
            out = self.model(input_ids=x, attention_mask=mask)
        return select_output(out, mask, self.output_key)


@contextlib.contextmanager
def hidden_states(model: nn.Module) -> Iterator[dict]:
    """While open, every forward of `model` (an HFModel) also records its transformer's hidden states — the
    embedding output, then each layer's: a tuple of (B, L, D), or (B, C, H, W) for convolutional families —
    and the attention mask (B, L) or None, in the yielded dict under "hidden" and "mask"."""
    if not isinstance(model, HFModel):
        raise UsageError("matching hidden states (--hidden-weight) needs a Hugging Face model",
                         hint="leave --hidden-weight at 0 to match the outputs alone")
    inner, seen = model.model, {}

    def hook(module, args, kwargs, out):
        seen["hidden"] = getattr(out, "hidden_states", None)
        seen["mask"] = kwargs.get("attention_mask")

    handle = inner.register_forward_hook(hook, with_kwargs=True)
    before = inner.config.output_hidden_states
    inner.config.output_hidden_states = True
    try:
        yield seen
    finally:
        handle.remove()
        inner.config.output_hidden_states = before


def build(task: str, config: dict, output_key: str | None = None) -> HFModel:
    """The `hf:TASK` architecture: a freshly initialised model of this config."""
    transformers = require_transformers()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str):
        raise InputError("the Hugging Face config has no model_type", hint="pass a config.json of a transformers model")
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        auto = getattr(transformers, TASKS[task_for({}, task)])
        model = auto.from_config(cfg, trust_remote_code=False)
    except ModelzipError:
        raise
    except Exception as exc:  # a config's wrong types and values fail in every way inside transformers
        raise InputError(f"transformers cannot build a {model_type} model for {task}: {first_line(exc)}",
                         hint="check config.json and --task") from None
    return HFModel(model, output_key, task)


LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers")


def declared_values(task: str, config: dict) -> int:
    """How many values (parameters and buffers) a model of `config` declares, counted on the meta device, where
    nothing is allocated: built with one and two layers and extrapolated to the configured count, so that a
    config of 50,000 layers costs two small builds."""

    def count(cfg: dict) -> int:
        with torch.device("meta"):
            model = build(task, cfg)
        return sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))

    keys = [k for k in LAYER_KEYS if type(config.get(k)) is int and config[k] > 2]
    if not keys:
        return count(config)
    one, two = count({**config, **dict.fromkeys(keys, 1)}), count({**config, **dict.fromkeys(keys, 2)})
    return one + max(two - one, 0) * (max(config[k] for k in keys) - 1)  # an upper bound when the counts differ


def example_shape(config: dict, task: str) -> tuple[list[int], str]:
    """A batch-1 example input from the config: token ids, or an image of the configured size."""
    def positive(key: str, default: int) -> int:
        value = config.get(key)
        if value is None:
            return default
        if type(value) is not int or not 0 < value <= 1 << 20:
            raise InputError(f"the Hugging Face config's {key} is {value!r:.40}, not a positive size",
                             hint="check config.json")
        return value

    if task == "image-classification" or "num_channels" in config or config.get("model_type") in {"resnet", "vit"}:
        size = positive("image_size", 224)
        return [1, positive("num_channels", 3), size, size], "float"
    length = min(EXAMPLE_TOKENS, positive("max_position_embeddings", 0) or positive("n_positions", 0) or EXAMPLE_TOKENS)
    return [1, length], "long"


def read_config(path: Path) -> dict:
    """config.json: a regular file of bounded size, parsed without recursing past Python's limit, whose
    `model_type` is a string and `architectures` a list of strings."""
    try:
        config = parse(json.loads, read_text(path / "config.json", "config"), f"{path}/config.json")
    except ValueError as exc:
        raise InputError(f"{path}/config.json is not readable JSON ({first_line(exc)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{path}/config.json is not a transformers config (no model_type)")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise InputError(f"{path}/config.json: architectures must be a list of class names, got {archs!r:.60}")
    return config


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def load_dir(path: Path, task: str | None, output_key: str | None) -> tuple[HFModel, dict]:
    """An HF model directory through transformers' own loader (shards, renamed keys, tied weights, the stored
    dtype), offline and without remote code. `pytorch_model.bin` is read with weights_only=True by
    transformers; a weight the model needs but the files lack is an error, not a random initialisation."""
    config = read_config(path)
    check_files(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise InputError(f"{path} has a config.json but no weights", hint="expected " + ", ".join(WEIGHT_FILES))
    transformers = require_transformers()
    task = task_for(config, task)
    check_declared(path, task, config)
    auto = getattr(transformers, TASKS[task])
    try:
        model, info = auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, dtype="auto",
                                           output_loading_info=True)
    except Exception as exc:  # transformers raises many types for corrupt or mismatched files
        raise InputError(f"{path}: transformers cannot load it as {task} ({first_line(exc)})",
                         hint="check the files, or --task") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise InputError(f"{path}: the weights lack {len(missing)} tensor(s) that {task} needs, e.g. {missing[0]}",
                         hint="pass the --task the checkpoint was trained for")
    config = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path"):  # where and by what it was made: not the model's
        config.pop(key, None)
    own_memory(model)
    return HFModel(model.float() if not _float_dtype(model) else model, output_key, task).eval(), config


MADV_DONTNEED = 4


def _mapped_files() -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of .safetensors files."""
    ranges = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return ranges
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[-1].endswith(".safetensors"):
            lo, _, hi = parts[0].partition("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def own_memory(model: nn.Module) -> int:
    """Move every parameter and buffer that transformers left in a memory map of its safetensors files into
    memory of its own, giving each one's pages of the map back as it goes; returns the bytes moved.

    A mapped weight stays resident while any tensor of the model uses the map: a calibration step that gives
    layers new tensors (GPTQ's dequantized weights) or replaces them (int4 modules) kept the whole float model
    mapped beside them (the 24-block decoder of bench `scale`: 4.5 GB peak for a 1.36 GB model). Parameter
    objects are kept (tied weights stay one Parameter); only their storage changes. Where /proc/self/maps or
    madvise is missing, the tensors are copied all the same and the map's pages go when the map does."""
    import ctypes
    import mmap

    ranges = _mapped_files()
    if not ranges:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        madvise = None
    page = mmap.PAGESIZE
    moved = 0
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for t in table.values():
                    if t is None or t.device.type != "cpu" or not t.numel():
                        continue
                    start = t.untyped_storage().data_ptr()
                    size = t.untyped_storage().nbytes()
                    if not any(lo <= start < hi for lo, hi in ranges):
                        continue
                    t.data = t.data.clone()  # the Parameter or buffer object itself, now in memory of its own
                    moved += size
                    first, last = -(-start // page) * page, (start + size) // page * page  # whole pages only
                    if madvise is not None and last > first:
                        madvise(first, last - first, MADV_DONTNEED)  # the map's copy: never read again
    return moved


def check_files(path: Path) -> None:
    """Every file of a model or tokenizer folder is a regular file (or a link to one, as the hub's cache has them):
    a FIFO as a shard or a tokenizer file would hang transformers' read."""
    for entry in path.iterdir():
        if not entry.is_dir():
            check_regular(entry, "file")


def check_declared(path: Path, task: str, config: dict) -> None:
    """The model config.json declares, counted before transformers builds it: no more values than the weight
    files could hold (at least a byte each) and within the memory limit."""
    values = declared_values(task, config)
    stored = sum(p.stat().st_size for p in path.iterdir() if p.suffix in {".safetensors", ".bin"} and p.is_file())
    if values > 4 * stored + (1 << 20):
        raise InputError(f"{path}/config.json declares a model of {values:,} values, but its weight files hold "
                         f"{stored:,} bytes; nothing was allocated", hint="config.json does not match the weights")
    half = str(config.get("torch_dtype") or config.get("dtype")) in {"float16", "bfloat16"}
    check_memory((2 if half else 4) * values, f"{path}: the model config.json declares ({values:,} values)",
                 hint="check config.json")


def _float_dtype(model: nn.Module) -> bool:
    """Whether the model's parameters share one float dtype (as stored); mixed dtypes become float32."""
    return len({p.dtype for p in model.parameters() if p.is_floating_point()}) <= 1


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers module inside an HFModel (what `load_model` returns); other models as they are."""
    return model.model if isinstance(model, HFModel) else model
