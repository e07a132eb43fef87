"""Streamed transforms: techniques that need no data, run one module at a time on a checkpoint that is never
held in memory whole (README, "Models bigger than memory").

The architecture is built on the meta device (nothing allocated); each module that owns tensors is then
materialised alone from the memory-mapped safetensors (`shards.TensorFiles`), transformed by the same code
the whole-model path runs (weight-only `from_float`, magnitude `zero_smallest`), encoded by the same codecs,
written at once (`shards.ShardWriter`) and dropped. Peak memory is one module, whatever the model's size, and
the tensors and manifest written are the ones the whole-model path writes, bit for bit.

Global magnitude pruning needs one threshold over every selected weight: `prune.kth_magnitude` finds it on
weights read from disk as it goes (a sample brackets it, one pass counts below and keeps what lies inside),
then the writing pass zeroes.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modelzip_cli import hf
from modelzip_cli.checkpoint import shards
from modelzip_cli.checkpoint.edits import MagnitudeEdit, WeightOnlyEdit, is_quantized, replay_edits, validated_edits
from modelzip_cli.checkpoint.format import (
    MANIFEST_KEY,
    SEP,
    Encoded,
    Manifest,
    decode_state,
    encode_state,
    parse_manifest,
)
from modelzip_cli.checkpoint.io import all_finite, build_arch, manifest_json
from modelzip_cli.checkpoint.layers import _logical_weights, layer_table
from modelzip_cli.errors import InputError
from modelzip_cli.files import Outputs
from modelzip_cli.kernels import native
from modelzip_cli.limits import gb
from modelzip_cli.measure.metrics import num_threads
from modelzip_cli.nn.surgery import to_dtype
from modelzip_cli.nn.weight_only import NATIVE_DTYPES, WeightOnlyEmbedding, WeightOnlyLinear, check_embedding
from modelzip_cli.pipeline.context import null_progress
from modelzip_cli.pipeline.sequential import give_back_freed_memory
from modelzip_cli.techniques.prune import ZEROES_ONLY, MagnitudeConfig, kth_magnitude, zero_below, zero_smallest
from modelzip_cli.techniques.quantize import WeightOnlyConfig, _integer_weight_names
from modelzip_cli.techniques.select import select_modules

STREAM_FROM = 1 << 30  # inputs this large (tensor bytes) are streamed when they can be; smaller ones load whole
ZEROES_ONLY_NOTE = f"magnitude pruning {ZEROES_ONLY}"
WEIGHT_ONLY_NOTE = "weight-only: integer weights with per-group scales, rounded to nearest; float compute"
STREAMED_NOTE = ("streamed: read one module at a time from the input and written as it went "
                 "(peak memory about one module, {largest}); the figures that need the whole model in memory "
                 "(SQNR, kernel timings) were not measured")


@dataclass
class Source:
    """A checkpoint to stream: its tensors (lazily), its manifest, and its module tree on the meta device."""

    path: Path
    files: shards.TensorFiles
    manifest: Manifest
    model: nn.Module  # on meta
    prefix: str = ""  # a state key is the file's key with this prefix (an HF folder's keys lack `model.`)
    dtype: torch.dtype = torch.float32  # the one float dtype of the stored tensors
    tied: dict[str, str] = field(default_factory=dict)  # state key → the first key of the same tensor
    bitmasks: dict[str, dict] = field(default_factory=dict)  # file key → its bitmask encoding (a pruned input)

    def file_key(self, key: str) -> str:
        return self.tied.get(key, key).removeprefix(self.prefix)

    def tensor_bytes(self) -> int:
        return sum(self.files.nbytes(k) for k in self.files.keys())

    def read(self, key: str) -> torch.Tensor:
        """The state tensor `key`, decoded when it is stored as a bitmask and its values."""
        key = self.file_key(key)
        if key not in self.bitmasks:
            return self.files.get(key)
        parts = {f"{key}{SEP}{p}": self.files.get(f"{key}{SEP}{p}") for p in ("mask", "values")}
        return decode_state(parts, {key: self.bitmasks[key]}, {}, where=str(self.path))[key]

    def info(self, key: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype) of the state tensor `key`, from headers only."""
        key = self.file_key(key)
        if key in self.bitmasks:
            enc = self.bitmasks[key]
            return list(enc["shape"]), enc["dtype"]
        return self.files.slice_info(key)

    def stored_bytes(self, key: str) -> int:
        key = self.file_key(key)
        if key in self.bitmasks:
            return sum(self.files.nbytes(f"{key}{SEP}{p}") for p in ("mask", "values"))
        return self.files.nbytes(key)

    def owners(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if _own_keys(m)]

    def largest_module(self) -> int:
        """Float32 bytes of the largest module that owns tensors: what one step materialises."""
        return max((4 * sum(t.numel() for t in _own_state(m).values()) for _, m in self.owners()), default=0)


def _own_state(m: nn.Module) -> dict[str, torch.Tensor]:
    state: dict = {}
    m._save_to_state_dict(state, "", keep_vars=True)
    return state


def _own_keys(m: nn.Module) -> list[str]:
    return list(_own_state(m))


# ---------------------------------------------------------------------------------------------------
# Opening an input


def open_source(path: Path, *, task: str | None = None) -> Source | str:
    """The input as a `Source`, or why it cannot be streamed (then the whole-model path runs)."""
    path = shards.resolve(Path(path))
    try:
        if hf.is_model_dir(path):
            return _hf_source(path, task)
        if path.suffix == ".safetensors" or shards.is_index(path):
            return _modelzip_source(path)
    except InputError as exc:
        return f"it cannot be read one tensor at a time ({exc.message})"
    return "only safetensors inputs (a modelzip file, its shards, or a Hugging Face folder) are streamed"


def _modelzip_source(path: Path) -> Source | str:
    files = shards.TensorFiles.of(path)
    text = files.metadata.get(MANIFEST_KEY)
    if not isinstance(text, str):
        return "a plain state dict needs --arch and is loaded whole"
    schema = parse_manifest(text, str(path))
    if any(e["codec"] not in ("alias", "bitmask") for e in schema.codecs().values()) or schema.constants:
        return "its tensors are encoded (quantized) and are decoded whole"
    manifest = schema.manifest()
    if is_quantized(manifest) or not manifest.arch or not manifest.arch.startswith(("zoo:", "hf:")):
        return "it is quantized, or its architecture is user code"
    edits = validated_edits(manifest)
    if any(not e.meta_safe for e in edits):
        return "its edits cannot be replayed on the meta device"
    with torch.device("meta"):
        model = replay_edits(build_arch(manifest.arch, manifest.arch_kwargs), manifest, edits)
    aliases = {k: v["of"] for k, v in schema.codecs().items() if v["codec"] == "alias"}
    bitmasks = {k: v for k, v in schema.codecs().items() if v["codec"] == "bitmask"}
    return _checked(Source(path, files, manifest, model, bitmasks=bitmasks), aliases)


def _hf_source(path: Path, task: str | None) -> Source | str:
    if not any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        return "the Hugging Face folder has no safetensors weights"
    config = hf.read_config(path)
    task = hf.task_for(config, task)
    with torch.device("meta"):
        model = hf.build(task, config)
    config = model.model.config.to_dict()
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    shape, dtype = hf.example_shape(config, task)
    kwargs = {"config": config}
    manifest = Manifest(arch=f"hf:{task}", arch_kwargs=kwargs, input_shape=list(shape), input_dtype=dtype)
    return _checked(Source(path, shards.TensorFiles.of(path), manifest, model, prefix="model."), {})


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _checked(src: Source, aliases: dict[str, str]) -> Source | str:
    """Every state key of the meta model is stored, with its shape, in one float dtype; tied tensors known."""
    first: dict[int, str] = {}
    for name, t in src.model.state_dict(keep_vars=True).items():
        if id(t) in first:
            src.tied[name] = first[id(t)]
        else:
            first[id(t)] = name
    for name, target in aliases.items():
        src.tied.setdefault(name, target)
    dtypes = set()
    for name, t in src.model.state_dict(keep_vars=True).items():
        key = src.file_key(name)
        if key not in src.files and not (key in src.bitmasks and f"{key}{SEP}mask" in src.files
                                         and f"{key}{SEP}values" in src.files):
            return f"the files lack {key} (renamed or missing keys are handled by the whole-model loader)"
        shape, dtype = src.info(name)
        dtype = _SAFETENSORS_DTYPES.get(dtype, dtype)
        if shape != list(t.shape):
            return f"{key} is stored as {shape}, the architecture has {list(t.shape)}"
        if t.is_floating_point():
            dtypes.add(dtype)
    if len(dtypes) > 1:
        return "its float tensors mix dtypes"
    src.dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(dtypes.pop() if dtypes
                                                                                        else "F32", torch.float32)
    return src


# ---------------------------------------------------------------------------------------------------
# What can be streamed


def streamable(cfg, files: dict[str, Path | None]) -> bool:
    """Techniques that need no data and change each module on its own."""
    if any(files.values()):
        return False
    if isinstance(cfg, WeightOnlyConfig):
        return True
    return isinstance(cfg, MagnitudeConfig) and not cfg.recover


def whole_model_peak(src: Source) -> int:
    """About what the whole-model path holds at its peak: the model in float32, the reference copy a step keeps,
    and the encoded output."""
    values = sum(t.numel() for t in src.model.state_dict().values())
    return 3 * 4 * values


def streamed_peak(src: Source) -> int:
    """About what a streamed run holds: one module in float32 with its transform's temporaries (four copies),
    and the interpreter with torch."""
    return 4 * src.largest_module() + (400 << 20)


# ---------------------------------------------------------------------------------------------------
# Transforms, one module at a time


Transform = Callable[[str, nn.Module], nn.Module]


def weight_only(src: Source, cfg: WeightOnlyConfig) -> tuple[Transform, list, set[str]]:
    names = _integer_weight_names(src.model, cfg)[0]

    def transform(name: str, m: nn.Module) -> nn.Module:
        if m.weight.dtype not in NATIVE_DTYPES:  # bfloat16 and float32 are read as they are (no float32 copy)
            m = m.float()
        if isinstance(m, nn.Embedding):
            check_embedding(m)
            return WeightOnlyEmbedding.from_embedding(m, cfg.bits, cfg.group_size)
        return WeightOnlyLinear.from_float(m, cfg.bits, cfg.group_size)

    edit = WeightOnlyEdit(modules=names, bits=cfg.bits, group_size=cfg.group_size)
    return transform, [edit], set(names)


def magnitude(src: Source, cfg: MagnitudeConfig) -> tuple[Transform, list, set[str]]:
    names = [n for n, _ in select_modules(src.model, include=cfg.include, exclude=cfg.exclude)]
    edit = MagnitudeEdit(ratio=cfg.ratio, scope=cfg.scope, layers=names)
    if cfg.scope == "layer":
        def per_layer(name: str, m: nn.Module) -> nn.Module:
            m = m.float()
            zero_smallest([m.weight.data], round(cfg.ratio * m.weight.numel()))
            return m

        return per_layer, [edit], set(names)
    keys = [f"{n}.weight" if n else "weight" for n in names]
    total = sum(math.prod(src.info(k)[0]) for k in keys)
    threshold, ties = global_threshold(src, keys, round(cfg.ratio * total))
    left = [ties]

    def global_(name: str, m: nn.Module) -> nn.Module:
        m = m.float()
        left[0] = zero_below(m.weight.data, threshold, left[0])
        return m

    return global_, [edit], set(names)


@dataclass
class _Stored:
    """A weight read from the files each time it is used: what `prune.kth_magnitude` takes as a tensor."""

    src: Source
    key: str

    def numel(self) -> int:
        return math.prod(self.src.info(self.key)[0])

    def detach(self) -> torch.Tensor:
        return self.src.read(self.key)


def global_threshold(src: Source, keys: list[str], k: int) -> tuple[float, int]:
    """The k-th smallest |w| over the tensors `keys` (read one at a time, in order), and how many of the values
    equal to it are among the k: `prune.kth_magnitude` itself, on weights read from disk as it goes."""
    if k <= 0:
        return -1.0, 0  # nothing below: nothing zeroed
    return kth_magnitude([_Stored(src, key) for key in keys], k)


# ---------------------------------------------------------------------------------------------------
# The streamed run


@dataclass
class Streamed:
    """What a streamed run wrote and measured, for the report."""

    path: Path  # the output file, or its index
    manifest: Manifest
    rows: list[dict]
    before: dict
    after: dict
    duration_s: float
    bytes: int  # on disk, shards and index together
    notes: list[str]


def _read_own(src: Source, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own tensors, read from the files."""
    prefix = f"{name}." if name else ""
    return {key: src.read(prefix + key) for key in _own_keys(module)}


def _materialise(src: Source, name: str, module: nn.Module, tensors: dict[str, torch.Tensor],
                 ) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `module` with its own tensors (`_read_own`) in place of meta ones (its children stay on meta),
    and the non-zero counts of those the finiteness check counted in the same pass."""
    m = copy.deepcopy(module)
    prefix = f"{name}." if name else ""
    nonzeros: dict[str, int] = {}
    for key in _own_keys(module):
        t = tensors.pop(key)
        scanned = native.scan(t) if t.is_floating_point() else None  # the finiteness check counts too
        if scanned is not None:
            nonzeros[key] = scanned[0]
        finite = scanned[1] if scanned is not None else not t.is_floating_point() or all_finite(t)
        if not finite:
            raise InputError(f"{src.path}: non-finite values (NaN or ±inf) in {prefix + key}",
                             hint="the checkpoint is corrupt, or the training that made it diverged")
        if key in m._parameters:
            m._parameters[key] = nn.Parameter(t, requires_grad=False)
        else:
            m._buffers[key] = t
    return m, nonzeros


def _shard_plan(src: Source, owners: list[tuple[str, nn.Module]], shard_bytes: int) -> list[int]:
    """The shard of each owner: cut by the input bytes they read, so each output shard is at most that large."""
    plan, shard, size = [], 0, 0
    for name, m in owners:
        prefix = f"{name}." if name else ""
        n = sum(src.stored_bytes(prefix + k) for k in _own_keys(m) if prefix + k not in src.tied)
        if size and size + n > shard_bytes:
            shard, size = shard + 1, 0
        size += n
        plan.append(shard)
    return plan


def _room(names: list[str]) -> int:
    """An upper bound of a shard header's bytes for these state keys (each at most three stored parts)."""
    return 4096 + sum(3 * (len(n) + 96) for n in names)


def run_streamed(src: Source, cfg, output: Path, outputs: Outputs, *, progress=null_progress,
                 shard_bytes: int = shards.SHARD_BYTES, hashing: bool = False) -> Streamed:
    """Transform `src` module by module into `output` (staged in `outputs`). `hashing`: another thread hashes
    the input meanwhile, and the module passes leave it a core (8 blocks of the 7B-shaped model, 2 cores:
    16.6 s, where passes on 2 threads waited for the one the hash had descheduled: 18.3 s). A pass over the
    whole model before them (the global threshold) keeps every thread: it is most of a global prune's time."""
    t0 = time.perf_counter()
    if isinstance(cfg, WeightOnlyConfig):
        transform, edits, selected = weight_only(src, cfg)
    else:
        transform, edits, selected = magnitude(src, cfg)
    owners = src.owners()
    plan = _shard_plan(src, owners, shard_bytes)
    n = plan[-1] + 1 if plan else 1
    manifest = src.manifest.with_edits(edits)
    keys_of = [[f"{name}.{k}" if name else k for k in _own_keys(m)] for name, m in owners]
    rooms = [_room([k for ks, s in zip(keys_of, plan, strict=True) if s == i for k in ks]) for i in range(n)]
    if n == 1:  # the manifest goes in the header too
        rooms[0] += 2 * len(json.dumps(manifest.to_dict())) + sum(600 + 2 * len(k) for ks in keys_of for k in ks)
    writer = shards.ShardWriter(output, n, rooms, outputs)
    encodings: dict[str, dict] = {}
    constants: dict[str, dict] = {}
    versions = _versions(src.model)
    rows: list[dict] = []
    before = {"parameters": 0, "bytes": 0}
    after = {"parameters": 0, "bytes": 0}
    nnz = numel = 0
    # The next module's tensors are read by a thread while this one is transformed, and the writer writes
    # behind (shards.ShardWriter): the disk's time and the CPU's overlap (8 of the 7B-shaped blocks, int4:
    # 20.9 s, 23.1 s one step after another)
    threads = max(1, torch.get_num_threads() - 1) if hashing else torch.get_num_threads()
    with progress("stream", len(owners)) as bar, torch.no_grad(), num_threads(threads), \
            ThreadPoolExecutor(1, thread_name_prefix="modelzip-read") as reader:
        ahead = reader.submit(_read_own, src, *owners[0]) if owners else None
        for i, ((name, module), shard) in enumerate(zip(owners, plan, strict=True)):
            if shard == len(writer._shards):
                writer.start(shard)
            prefix = f"{name}." if name else ""
            tensors = ahead.result()
            ahead = reader.submit(_read_own, src, *owners[i + 1]) if i + 1 < len(owners) else None
            real, nonzeros = _materialise(src, name, module, tensors)
            tied = {k for k in _own_keys(module) if prefix + k in src.tied}
            _count(before, real, tied)
            before["bytes"] += sum(t.numel() * t.element_size() for t in encode_state(
                {k: v for k, v in _own_state(real).items() if k not in tied}, nonzeros)[0].values())
            out = real
            if name in selected:
                out = transform(name, real)
                if src.dtype != torch.float32:  # the output keeps the input's float dtype
                    to_dtype(out, src.dtype)
                versions = {k: v for k, v in versions.items() if k != name and not k.startswith(prefix)}
                versions.update(_versions(out, name))
            state = {k: v for k, v in _own_state(out).items() if k not in tied}
            state = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            tensors, enc, const = encode_state(state)
            for key, t in tensors.items():
                writer.add(prefix + key, t)
            encodings.update({prefix + k: v for k, v in enc.items()})
            encodings.update({prefix + k: {"codec": "alias", "of": src.tied[prefix + k]} for k in tied})
            constants.update({prefix + k: v for k, v in const.items()})
            row = layer_table(out, names={""}, encoded=Encoded(tensors, enc, const, {}))
            for r in row:
                r["name"] = name or "(root)"
                if name in selected and isinstance(cfg, MagnitudeConfig):  # the pruned weight's figures
                    nnz += r["nonzero"]
                    numel += math.prod(r["shape"])
            rows.extend(row)
            if tied or out is real:  # float as it was: cheap to count again, ties left out
                _count(after, out, tied)
            else:  # a transformed module's row counted its dense weights already
                after["parameters"] += sum(r["params"] for r in row)
            after["bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
            del real, out, tensors
            give_back_freed_memory()  # each module's temporaries differ in size: freed pages would pile up
            bar.advance()
    text = manifest_json(manifest, encodings, constants, versions, rows)
    path = writer.finish(text)
    written = sum(outputs.staged(p).stat().st_size for p in [*writer.targets, *([path] if n > 1 else [])])
    extra = {"selected_sparsity": round(1 - nnz / max(1, numel), 6)} if numel else {}
    notes = [ZEROES_ONLY_NOTE if isinstance(cfg, MagnitudeConfig) else WEIGHT_ONLY_NOTE]
    if n > 1:
        notes.append(f"written as {n} shards of at most {gb(shard_bytes)} with the index {path.name}")
    return Streamed(path, manifest, rows, before, {**after, **extra}, round(time.perf_counter() - t0, 4),
                    written, notes)


def _count(figures: dict, m: nn.Module, tied: set[str]) -> None:
    figures["parameters"] += sum(t.numel() for k, t in _logical_weights(m).items() if k not in tied)


def _versions(model: nn.Module, name: str = "") -> dict[str, dict]:
    """The module versions a state dict records (as `format.encode_module` keeps them: above 1 only)."""
    meta = getattr(model.state_dict(prefix=f"{name}." if name else ""), "_metadata", None) or {}
    return {k: v for k, v in meta.items() if v.get("version") is not None and v != {"version": 1}}


def note(src: Source) -> str:
    return STREAMED_NOTE.format(largest=gb(src.largest_module()))


def stream_ok(src: Source, cfg) -> str | None:
    """Why the transform cannot stream this source (a tie it would break), or None."""
    try:
        selected = (weight_only(src, cfg)[2] if isinstance(cfg, WeightOnlyConfig)
                    else {n for n, _ in select_modules(src.model, include=cfg.include, exclude=cfg.exclude)})
    except InputError as exc:
        return exc.message
    for name, target in src.tied.items():
        if {name.rpartition(".")[0], target.rpartition(".")[0]} & selected:
            return f"{name} shares its tensor with {target}, and the transform changes one of them"
    return None

