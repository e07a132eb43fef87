"""`inspect`: describe a checkpoint from its header and manifest, without reading its tensor data.

For .safetensors this never imports torch: the JSON header holds every name, shape and dtype, and a
modelzip manifest holds the per-layer table. A .pt file is memory-mapped, which reads no tensor data.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelzip_cli.checkpoint import shards
from modelzip_cli.checkpoint.format import CHECKPOINT_SUFFIXES, MANIFEST_KEY, SEP, ManifestSchema, parse_manifest
from modelzip_cli.errors import InputError, UsageError
from modelzip_cli.files import check_readable
from modelzip_cli.measure.report import Report, file_info

# Buffers that are state, not parameters (BatchNorm statistics, quantization observers).
_NOT_PARAMS = ("running_mean", "running_var", "num_batches_tracked", "scale", "zero_point")


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    bytes: int


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    shape, dtype, (start, end) = entry["shape"], entry["dtype"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and isinstance(dtype, str)
            and type(start) is int and type(end) is int and 0 <= start <= end):
        raise ValueError(f"tensor {name!r} has a malformed entry")
    return TensorInfo(name, shape, dtype.lower(), end - start)


def _safetensors_header(path: Path) -> tuple[list[TensorInfo], ManifestSchema | None]:
    size = path.stat().st_size
    try:
        header, meta, n = shards.raw_header(path, size)
        infos = [_tensor_info(k, v) for k, v in header.items()]
        end = 8 + n + max((v["data_offsets"][1] for v in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, struct.error, RecursionError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})",
                         hint="the file may be truncated or corrupt") from None
    if end > size:
        raise InputError(f"{path}: truncated (the header promises {end} bytes, the file has {size})",
                         hint="the file is incomplete; copy it again")
    return infos, (parse_manifest(meta[MANIFEST_KEY], str(path)) if MANIFEST_KEY in meta else None)


def _torch_header(path: Path, trust_code: bool) -> tuple[list[TensorInfo], ManifestSchema | None]:
    from modelzip_cli.checkpoint.format import TENSORS_KEY
    from modelzip_cli.checkpoint.io import read_torch, unwrap_state_dict

    obj = read_torch(path, trust_code=trust_code, mmap=True)
    manifest = None
    if isinstance(obj, dict) and isinstance(obj.get(MANIFEST_KEY), str):
        manifest, obj = parse_manifest(obj[MANIFEST_KEY], str(path)), obj.get(TENSORS_KEY, {})
    elif hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    state = unwrap_state_dict(obj) or {}
    infos = [TensorInfo(k, list(v.shape), str(v.dtype).removeprefix("torch."), v.numel() * v.element_size())
             for k, v in state.items()]
    return infos, manifest


def read_header(path: Path, *, trust_code: bool = False) -> tuple[list[TensorInfo], ManifestSchema | None]:
    """Every tensor's name, shape, dtype and stored bytes, plus the manifest, without reading data."""
    if shards.is_index(path):  # a sharded modelzip checkpoint: the shards' headers, the index's manifest
        files, metadata = shards.read_index(path)
        infos = [info for f in sorted(set(files.values())) for info in _safetensors_header(f)[0]]
        text = metadata.get(MANIFEST_KEY)
        return infos, parse_manifest(text, str(path)) if isinstance(text, str) else None
    check_readable(path, CHECKPOINT_SUFFIXES)
    if path.suffix == ".safetensors":
        return _safetensors_header(path)
    return _torch_header(path, trust_code)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layers_from_header(infos: list[TensorInfo]) -> list[dict]:
    """Group tensors by owning module. A raw file's sparsity is unknown without reading every tensor."""
    by_module: dict[str, list[TensorInfo]] = defaultdict(list)
    for info in infos:
        base = info.name.split(SEP)[0]
        by_module[base.rsplit(".", 1)[0] if "." in base else "(root)"].append(info)
    rows = []
    for name, tensors in by_module.items():
        weight = next((t for t in tensors if t.name.endswith("weight")), tensors[0])
        params = sum(_numel(t.shape) for t in tensors if not t.name.endswith(_NOT_PARAMS))
        rows.append({"name": name, "type": "-", "shape": weight.shape, "scheme": weight.dtype,
                     "params": params, "nonzero": None, "sparsity": None,
                     "bytes": sum(t.bytes for t in tensors)})
    return rows


def _directory_header(path: Path) -> tuple[list[TensorInfo], str, str | None]:
    """A Hugging Face model directory: every tensor of its weight files (shards too), read from their
    headers, its format and the architecture its config names. Files linked from outside it are not read."""
    if not (path / "config.json").is_file():  # (hf.is_model_dir, without importing torch)
        raise InputError(f"{path} is a directory but not a Hugging Face model (no config.json)",
                         hint="pass a checkpoint file or a model directory")
    root = path.resolve()
    files = [f for pattern in ("*.safetensors", "pytorch_model*.bin")
             for f in sorted(path.glob(pattern)) if f.is_file() and f.resolve().is_relative_to(root)]
    files = [f for f in files if f.suffix == files[0].suffix] if files else []
    if not files:
        raise InputError(f"{path}: no weights (model.safetensors, shards, or pytorch_model.bin)",
                         hint="pass a complete model directory")
    infos = [info for f in files for info in read_header(f)[0]]
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path / 'config.json'} is not readable JSON ({exc})") from None
    names = config.get("architectures") if isinstance(config, dict) else None
    arch = f"hf:{names[0]}" if isinstance(names, list) and names and isinstance(names[0], str) else "hf:"
    shards = f", {len(files)} files" if len(files) > 1 else ""
    return infos, f"Hugging Face directory ({files[0].suffix.lstrip('.')}{shards})", arch


def _compressed_tensors(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _inspect_compressed(path: Path, report: Report, hash_file: bool) -> Report:
    """A compressed-tensors directory, read as `eval` reads it (checkpoint.load_checkpoint)."""
    from modelzip_cli.checkpoint.io import load_checkpoint
    from modelzip_cli.checkpoint.layers import layer_table

    loaded = load_checkpoint(path)
    layers = layer_table(loaded.model)
    params = sum(row.get("params") or 0 for row in layers)
    report.input = file_info(path, params, hash_file=hash_file)
    m = loaded.manifest
    report.model = {"format": "compressed-tensors directory", "arch": m.arch, "arch_kwargs": {},
                    "input_shape": m.input_shape, "parameters": params, "edits": m.edits, "layers": layers}
    report.warnings.extend(loaded.notes)
    return report


def inspect_checkpoint(path: Path, *, trust_code: bool = False, hash_file: bool = False) -> Report:
    report = Report(command="inspect")
    if path.is_dir() and _compressed_tensors(path):  # its packed tensors name no layer: loaded, then tabled
        return _inspect_compressed(path, report, hash_file)
    if path.is_dir():  # a Hugging Face model directory, from its files' headers
        infos, fmt, arch = _directory_header(path)
        layers = _layers_from_header(infos)
        params = sum(row.get("params") or 0 for row in layers)
        report.input = file_info(path, params, hash_file=hash_file)
        report.model = {"format": fmt, "arch": arch, "arch_kwargs": {}, "input_shape": None, "parameters": params,
                        "edits": [], "layers": layers}
        return report
    if path.suffix == ".gguf" and path.is_file():
        return _inspect_gguf(path, report, hash_file)
    path = shards.resolve(path)
    infos, manifest = read_header(path, trust_code=trust_code)
    if manifest is not None and manifest.layers is not None:
        layers = [row.model_dump() for row in manifest.layers]
        fmt = f"modelzip {path.suffix.lstrip('.')} v{manifest.format_version}"
        if shards.is_index(path):
            fmt = f"modelzip safetensors v{manifest.format_version} ({len(shards.shard_files(path))} shards)"
    else:
        layers = _layers_from_header(infos)
        fmt = f"raw state dict ({path.suffix.lstrip('.')})"
        report.warnings.append("no modelzip manifest: sparsity is not known without reading every tensor")
    params = sum(row.get("params") or 0 for row in layers)
    report.input = file_info(path, params, hash_file=hash_file)
    if shards.is_index(path):
        report.input["bytes"] = shards.total_bytes(path)
    m = manifest.manifest() if manifest is not None else None
    report.model = {"format": fmt, "arch": m and m.arch, "arch_kwargs": m.arch_kwargs if m else {},
                    "input_shape": m and m.input_shape, "parameters": params, "edits": m.edits if m else [],
                    "layers": layers}
    return report


def _inspect_gguf(path: Path, report: Report, hash_file: bool) -> Report:
    """A .gguf file from its header (the gguf reader maps the file; no tensor is dequantized): one row per
    tensor with its GGUF type (F16, Q8_0, Q4_0, …) as the scheme."""
    try:
        import gguf
    except ImportError:
        raise UsageError("GGUF files need the gguf package", hint="pip install 'modelzip[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises its own types for a malformed file
        raise InputError(f"{path}: not a readable GGUF file ({str(exc).splitlines()[0][:200] if str(exc) else exc})",
                         hint="pass a .gguf file") from None
    layers = [{"name": t.name, "type": "-", "shape": [int(d) for d in reversed(t.shape.tolist())],
               "scheme": t.tensor_type.name, "params": int(t.n_elements), "nonzero": None, "sparsity": None,
               "bytes": int(t.n_bytes)} for t in reader.tensors]
    field = reader.fields.get("general.architecture")
    arch = str(bytes(field.parts[-1]), "utf-8") if field is not None else None
    params = sum(row["params"] for row in layers)
    report.input = file_info(path, params, hash_file=hash_file)
    report.model = {"format": "gguf", "arch": f"gguf:{arch}", "arch_kwargs": {}, "input_shape": None,
                    "parameters": params, "edits": [], "layers": layers}
    return report
