"""Sharded safetensors, written as tensors come and read one tensor at a time (docs/FORMAT.md, "Files").

A checkpoint too large for one file is written as transformers' `save_pretrained` writes one: shards
`NAME-00001-of-00003.safetensors` beside an index `NAME.safetensors.index.json` that maps every stored
tensor to its shard. A modelzip index also holds the manifest under `metadata.modelzip`, where a single file
keeps it in its safetensors metadata. `modelzip inspect|eval NAME.safetensors.index.json` (or
`NAME.safetensors` when only the index exists) reads it.

`ShardWriter` writes each tensor's bytes as soon as it is given: a shard file starts with room for its
header, the data follows, and the header (padded with spaces, which safetensors allows) is written last.
Memory is one tensor, whatever the model's size. `TensorFiles` reads tensors lazily from memory-mapped
files (`safe_open`): a single safetensors file, a modelzip index, or a Hugging Face model folder.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelzip_cli.checkpoint.format import CORRUPT, MANIFEST_KEY
from modelzip_cli.errors import InputError
from modelzip_cli.files import Outputs
from modelzip_cli.limits import check_regular, parse, read_text

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"
SHARD_BYTES = 5 << 30  # transformers' default max_shard_size ("5GB")
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int8": "I8",
           "uint8": "U8", "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL"}


def index_path(path: Path) -> Path:
    """`out.safetensors` → `out.safetensors.index.json`."""
    return path.with_name(path.name + ".index.json")


def is_index(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIX)


def resolve(path: Path) -> Path:
    """A checkpoint path as given, or its index when only the index exists (`out.safetensors` written sharded)."""
    path = Path(path)
    if path.suffix == ".safetensors" and not path.exists() and index_path(path).is_file():
        return index_path(path)
    return path


def shard_name(stem: str, i: int, n: int) -> str:
    return f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"


def shard_files(index: Path) -> list[Path]:
    """The shard files an index names, in order."""
    return sorted(set(read_index(index)[0].values()))


def total_bytes(path: Path) -> int:
    """Bytes on disk of a checkpoint: a file, or an index and its shards."""
    path = Path(path)
    if is_index(path):
        return path.stat().st_size + sum(f.stat().st_size for f in shard_files(path))
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass
class _Shard:
    path: Path  # the temporary being written
    room: int  # bytes reserved for the header
    file: Any = None
    entries: dict[str, dict] = field(default_factory=dict)
    end: int = 0  # bytes of tensor data written so far


class ShardWriter:
    """Writes a checkpoint's tensors as they come into `shards` files, staged in `outputs` (renamed into place
    when the run commits). One shard: `path` itself, the manifest in its metadata; several: shards named as
    transformers names them and an index holding the manifest. `rooms[i]`: header bytes reserved in shard i
    (an upper bound of what its header will hold); a header that outgrows it is rewritten, slower, not lost.

    The bytes are written by a thread of the writer's own, in order, while the caller goes on to the next tensor
    (at most WRITE_BEHIND bytes waiting): a streamed run computes while the previous module's bytes go to the
    disk. An error of a write is raised by the next call that waits for it (`add` past the limit, a shard's
    close, `finish`)."""

    WRITE_BEHIND = 256 << 20

    def __init__(self, path: Path, shards: int, rooms: list[int], outputs: Outputs):
        self.path, self.outputs, self.n = Path(path), outputs, shards
        stem = self.path.name.removesuffix(".safetensors")
        self.targets = [self.path] if shards == 1 else [self.path.with_name(shard_name(stem, i, shards))
                                                          for i in range(shards)]
        self._shards: list[_Shard] = []
        self._rooms = [8 * math.ceil(r / 8) for r in rooms]  # data starts 8-byte aligned
        self.weight_map: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future, int]] = deque()  # writes queued, and their bytes
        self._queued = 0

    def start(self, i: int) -> None:
        """Begin shard `i` (in order); the previous one is closed."""
        if self._shards:
            self._close(self._shards[-1], {})
        tmp = self.outputs.write(self.targets[i], lambda tmp: tmp.touch())
        shard = _Shard(tmp, self._rooms[i])
        shard.file = open(tmp, "r+b")  # noqa: SIM115 (closed in _close)
        shard.file.seek(8 + shard.room)
        self._shards.append(shard)

    def add(self, name: str, t: torch.Tensor) -> None:
        import torch

        shard = self._shards[-1]
        t = t.detach().contiguous().cpu()
        dtype = _DTYPES[str(t.dtype).removeprefix("torch.")]
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        nbytes = t.numel() * t.element_size()
        self._write(shard.file, memoryview(data), nbytes)  # the view keeps t alive until it is written
        shard.entries[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [shard.end, shard.end + nbytes]}
        shard.end += nbytes
        self.weight_map[name] = self.targets[len(self._shards) - 1].name

    def finish(self, manifest_text: str | None) -> Path:
        """Close the last shard; write the index when there are several. Returns the path of the checkpoint
        (the file, or the index) to report. Without a manifest: a plain safetensors file or shards, as a Hugging
        Face folder holds them."""
        last = self._shards[-1]
        manifest = {MANIFEST_KEY: manifest_text} if manifest_text is not None else {}
        if self.n == 1:
            self._close(last, manifest)
            return self.path
        self._close(last, {})
        index = {"metadata": {"total_size": sum(s.end for s in self._shards), **manifest},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        target = index_path(self.path)
        self.outputs.write(target, lambda tmp: tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False)))
        return target

    def _write(self, f, data: memoryview, nbytes: int) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="modelzip-write")
        self._pending.append((self._pool.submit(f.write, data), nbytes))
        self._queued += nbytes
        while self._queued > self.WRITE_BEHIND:
            self._wait_one()

    def _wait_one(self) -> None:
        done, nbytes = self._pending.popleft()
        self._queued -= nbytes
        done.result()  # a write's error, raised here

    def _drain(self) -> None:
        while self._pending:
            self._wait_one()

    def _close(self, shard: _Shard, metadata: dict[str, str]) -> None:
        if shard.file is None:
            return
        self._drain()  # every byte of the shard written before its header
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        header = json.dumps({"__metadata__": {"format": "pt", **metadata}, **shard.entries},
                            separators=(",", ":"), ensure_ascii=False).encode()
        f = shard.file
        if len(header) <= shard.room:
            f.seek(0)
            f.write(struct.pack("<Q", shard.room) + header + b" " * (shard.room - len(header)))
            f.flush()
            os.fsync(f.fileno())
            f.close()
        else:  # the header outgrew its room: a new file, the data copied after the whole header
            f.flush()
            f.close()
            room = 8 * math.ceil(len(header) / 8)
            moved = shard.path.with_name(shard.path.name + ".data")
            os.replace(shard.path, moved)
            with open(moved, "rb") as src, open(shard.path, "wb") as dst:
                dst.write(struct.pack("<Q", room) + header + b" " * (room - len(header)))
                src.seek(8 + shard.room)
                while chunk := src.read(64 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            moved.unlink()
        shard.file = None


# ---------------------------------------------------------------------------------------------------
# Reading


def read_index(path: Path) -> tuple[dict[str, Path], dict]:
    """A safetensors index: tensor name → its shard file (checked to lie in the index's folder), and its metadata."""
    check_regular(path, "index")
    raw = parse(json.loads, read_text(path, "index"), f"{path}", hint=CORRUPT)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    metadata = raw.get("metadata") or {} if isinstance(raw, dict) else {}
    if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
        raise InputError(f"{path}: not a safetensors index (no weight_map)", hint=CORRUPT)
    files: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise InputError(f"{path}: tensor {name!r} names shard {shard!r}, not a .safetensors file beside the index",
                             hint=CORRUPT)
        files[name] = path.parent / shard
    return files, metadata


def raw_header(path: Path, size: int) -> tuple[dict, dict, int]:
    """A safetensors file's header as stored: (tensor entries, metadata, header length). Raises ValueError (or
    struct.error, RecursionError) on a length out of range or a header that is not a JSON object."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(100_000_000, size - 8):
            raise ValueError("header length out of range")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError("its metadata is not a JSON object")
    return header, metadata, n


def read_header(path: Path) -> tuple[dict[str, dict], dict, int]:
    """A safetensors file's tensor entries, its metadata, and where its data starts, every entry checked
    against the file's size (a forged offset or shape is one line, never a read past the end)."""
    check_regular(path, "checkpoint")
    size = path.stat().st_size
    try:
        header, metadata, n = raw_header(path, size)
        for name, e in header.items():
            shape, dtype, (start, end) = e["shape"], e["dtype"], e["data_offsets"]
            if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                    or dtype not in _ITEMSIZE or type(start) is not int or type(end) is not int
                    or not 0 <= start <= end <= size - 8 - n or end - start != math.prod(shape) * _ITEMSIZE[dtype]):
                raise ValueError(f"tensor {name!r} has a malformed entry")
    except (ValueError, KeyError, TypeError, struct.error, RecursionError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})",
                         hint="the file may be truncated or corrupt") from None
    return header, metadata, 8 + n


class TensorFiles:
    """Tensors by name from one or more safetensors files. `get` reads one tensor with plain reads into memory
    it owns (not a memory map, whose pages would stay resident and count against the process as it goes)."""

    def __init__(self, files: dict[str, Path], metadata: dict | None = None):
        self.metadata = metadata or {}
        self._where = files
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for path in sorted(set(files.values())):
            header, _, start = read_header(path)
            for name, entry in header.items():
                self._entries[name] = (path, entry, start)
        for name, path in files.items():
            if name not in self._entries or self._entries[name][0] != path:
                raise InputError(f"{path} lacks tensor {name!r}, which its index names", hint=CORRUPT)

    @classmethod
    def of(cls, path: Path) -> TensorFiles:
        """A .safetensors file, a safetensors index, or a folder holding `model.safetensors[.index.json]`."""
        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            path = index if index.is_file() else path / "model.safetensors"
        if is_index(path):
            files, metadata = read_index(path)
            return cls(files, metadata)
        header, metadata, _ = read_header(path)
        return cls(dict.fromkeys(header, path), metadata)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def slice_info(self, name: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype such as BF16) without reading the data."""
        entry = self._entries[name][1]
        return list(entry["shape"]), entry["dtype"]

    def get(self, name: str) -> torch.Tensor:
        import torch

        path, entry, data_start = self._entries[name]
        start, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=getattr(torch, _TORCH[entry["dtype"]]))
        if end > start:
            with open(path, "rb") as f:
                f.seek(data_start + start)
                if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - start:
                    raise InputError(f"{path}: truncated while reading {name!r}", hint="copy the file again")
        return t

    def nbytes(self, name: str) -> int:
        start, end = self._entries[name][1]["data_offsets"]
        return end - start

    def all(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name)


_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
