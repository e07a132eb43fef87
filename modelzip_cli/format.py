"""The checkpoint format: keys, the manifest, and the tensor codecs (docs/FORMAT.md describes them).

A modelzip checkpoint is a set of plain tensors plus a JSON manifest. Tensors that would waste space go
through a codec: sparse tensors become a bitmask plus their non-zero values. Quantized models are
modelzip's plain-int8 modules, whose state is ordinary int8/uint8/int32/float tensors; torch quantized
tensors are never written. Format 1 files (the first wave) stored torch.ao modules' quantized tensors with
the "qtensor" codec; reading one yields `QInts` (integers, scales, zero points as plain values) that
legacy.py turns into the plain modules' state.

This is the lowest layer: it imports nothing of modelzip but errors, and imports torch only inside the
functions that need it, so reading a header (`inspect`) never pays for torch.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from modelzip_cli.errors import InputError, UsageError
from modelzip_cli.version import __version__

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2  # 2: quantized layers are plain-int8 modules (int8.py); 1: torch.ao layouts
MANIFEST_KEY = "modelzip"  # safetensors metadata key / .pt archive key holding the manifest JSON
TENSORS_KEY = "tensors"  # .pt archive key holding the tensors
SEP = "::"  # stored parts of an encoded tensor are NAME::PART
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # what modelzip reads
# What modelzip writes: .pth and .bin are the same torch archive as .pt (a .pth input's default output is .pth).
OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
QUANTIZE_EDIT_PREFIX = "quantize"


# ---------------------------------------------------------------------------------------------------
# Manifest


@dataclass
class Manifest:
    """What rebuilds the model: architecture, example input, and the ordered structural edits."""

    arch: str | None
    arch_kwargs: dict = field(default_factory=dict)
    input_shape: list[int] | None = None
    input_dtype: str = "float"
    edits: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": "modelzip", "format_version": FORMAT_VERSION, "tool_version": __version__,
                **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if d.get("format") != "modelzip":
            raise InputError("the manifest is not a modelzip manifest")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(f"checkpoint format version {d['format_version']} is newer than this modelzip "
                             f"reads ({FORMAT_VERSION})", hint="upgrade modelzip")
        return cls(arch=d.get("arch"), arch_kwargs=d.get("arch_kwargs") or {},
                   input_shape=d.get("input_shape"), input_dtype=d.get("input_dtype", "float"),
                   edits=list(d.get("edits") or []))

    def copy(self) -> Manifest:
        return copy.deepcopy(self)

    def with_edits(self, edits: list[dict]) -> Manifest:
        """A new manifest with `edits` appended to the edit log."""
        new = self.copy()
        new.edits.extend(copy.deepcopy(edits))
        return new

    def is_quantized(self) -> bool:
        return any(str(e.get("kind", "")).startswith(QUANTIZE_EDIT_PREFIX) for e in self.edits)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        import torch

        if not self.input_shape:
            raise UsageError("no example input shape is known for this model",
                             hint="pass --input-shape, e.g. --input-shape 1,64")
        shape = [batch, *self.input_shape[1:]]
        if self.input_dtype == "long":
            return torch.zeros(shape, dtype=torch.long)
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------
# Tensor codecs: state dict ⇄ plain tensors + an encodings table for the manifest.


def _sparse_pays(t: torch.Tensor, nnz: int) -> bool:
    """Bitmask (1 bit/elem) + values beats dense by at least 10%."""
    n = t.numel()
    return n >= 256 and (n / 8 + nnz * t.element_size()) <= 0.9 * n * t.element_size()


def _store(name: str, t: torch.Tensor, tensors: dict, encodings: dict) -> None:
    """Store one plain tensor: as a bitmask plus its non-zero values when that is smaller, else dense.
    Applies to float weights zeroed by pruning and to the integer weights they become once quantized."""
    import numpy as np
    import torch

    if t.dtype != torch.bool and t.numel() >= 256:
        nnz = int(torch.count_nonzero(t))
        if _sparse_pays(t, nnz):
            mask = (t != 0).flatten().numpy()
            encodings[name] = {"codec": "bitmask", "shape": list(t.shape),
                               "dtype": str(t.dtype).removeprefix("torch."), "nnz": nnz}
            tensors[f"{name}{SEP}mask"] = torch.from_numpy(np.packbits(mask))  # uint8, 8 elements per byte
            tensors[f"{name}{SEP}values"] = t.flatten()[torch.from_numpy(mask)].contiguous()
            return
    tensors[name] = t.contiguous()


@dataclass
class QInts:
    """A format-1 "qtensor" as plain values: integers, and per-tensor (float, int) or per-channel (tensors
    along `axis`) scales and zero points. The value stands for (ints − zero_point) · scale."""

    ints: torch.Tensor
    scale: float | torch.Tensor
    zero_point: int | torch.Tensor
    axis: int | None = None

    def dequantize(self) -> torch.Tensor:
        if self.axis is None:
            return (self.ints.float() - self.zero_point) * self.scale
        shape = [1] * self.ints.ndim
        shape[self.axis] = -1
        return (self.ints.float() - self.zero_point.float().reshape(shape)) * self.scale.float().reshape(shape)


def encode_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, Any]]:
    """Split a state dict into stored tensors, per-tensor encodings and JSON constants."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, dict] = {}
    constants: dict[str, Any] = {}
    seen_storage: set[int] = set()
    for name, value in state.items():
        if isinstance(value, (torch.dtype, torch.qscheme)):  # e.g. torch.qint8, torch.per_channel_affine
            constants[name] = {"torch": str(value).removeprefix("torch.")}
            continue
        if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) or v is None for v in value):
            encodings[name] = {"codec": "tuple", "length": len(value),
                               "none": [i for i, v in enumerate(value) if v is None]}
            for i, v in enumerate(value):
                if v is not None:
                    sub_t, sub_e, _ = encode_state({f"{name}{SEP}{i}": v})
                    tensors.update(sub_t)
                    encodings.update(sub_e)
            continue
        if isinstance(value, (int, float, bool, str)) or value is None:
            constants[name] = {"value": value}
            continue
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"cannot store {name!r} of type {type(value).__name__} in a checkpoint")
        t = value.detach().cpu()
        if t.is_quantized:
            raise UsageError(f"{name!r} is a torch quantized tensor, which modelzip no longer stores",
                             hint="quantize with modelzip quantize (plain int8 tensors)")
        # safetensors refuses tensors that share storage (tied weights): store a copy.
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen_storage:
            t = t.clone()
        seen_storage.add(ptr)
        _store(name, t, tensors, encodings)
    return tensors, encodings, constants


def decode_state(tensors: dict[str, torch.Tensor], encodings: dict[str, dict],
                 constants: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `encode_state`."""
    import numpy as np
    import torch

    state: dict[str, Any] = {k: v for k, v in tensors.items() if SEP not in k}

    def part(key: str) -> torch.Tensor:
        return decode_one(key, encodings[key]) if key in encodings else tensors[key]

    def decode_one(name: str, enc: dict) -> torch.Tensor | QInts | tuple:
        codec = enc.get("codec")
        if codec == "bitmask":
            shape, mask_bytes = enc["shape"], tensors[f"{name}{SEP}mask"].numpy()
            n = int(np.prod(shape)) if shape else 1
            mask = torch.from_numpy(np.unpackbits(mask_bytes, count=n).astype(bool))
            dense = torch.zeros(n, dtype=getattr(torch, enc["dtype"]))
            dense[mask] = tensors[f"{name}{SEP}values"]
            return dense.reshape(shape)
        if codec == "qtensor":  # format 1 only
            ints = part(f"{name}{SEP}int")
            if enc["qscheme"] == "per_tensor":
                return QInts(ints, float(enc["scale"]), int(enc["zero_point"]))
            return QInts(ints, tensors[f"{name}{SEP}scale"], tensors[f"{name}{SEP}zero_point"], int(enc["axis"]))
        if codec == "tuple":
            parts = [f"{name}{SEP}{i}" for i in range(enc["length"])]
            return tuple(None if i in enc["none"] else part(key) for i, key in enumerate(parts))
        raise InputError(f"tensor {name!r} has unknown codec {codec!r}", hint="upgrade modelzip")

    for name, enc in encodings.items():
        if SEP in name:  # a part of an encoded tensor: decoded with its parent
            continue
        state[name] = decode_one(name, enc)
    for name, const in constants.items():
        state[name] = getattr(torch, const["torch"]) if "torch" in const else const["value"]
    return state


@dataclass
class Encoded:
    """A module's state, encoded once: what a checkpoint stores, and what sizes and layer tables read."""

    tensors: dict[str, Any]
    encodings: dict[str, dict]
    constants: dict[str, Any]
    state_versions: dict[str, dict]  # per-module serialization versions (torch.ao reads state by version)

    def sizes(self) -> dict[str, int]:
        return stored_sizes(self.tensors)

    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def encode_module(model) -> Encoded:
    """Encode `model.state_dict()` once (see `encode_state`)."""
    state = model.state_dict()
    tensors, encodings, constants = encode_state(state)
    versions = {k: v for k, v in (getattr(state, "_metadata", None) or {}).items() if v.get("version") is not None}
    return Encoded(tensors, encodings, constants, versions)


def owner_of(stored_key: str) -> str:
    """The state-dict key a stored tensor belongs to: `layers.0.weight::mask` → `layers.0.weight`."""
    return stored_key.split(SEP, 1)[0]


def stored_sizes(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes stored per state-dict key (all parts of an encoded tensor added up)."""
    sizes: dict[str, int] = {}
    for key, t in tensors.items():
        owner = owner_of(key)
        sizes[owner] = sizes.get(owner, 0) + t.numel() * t.element_size()
    return sizes
