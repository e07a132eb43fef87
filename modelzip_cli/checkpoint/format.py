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
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelzip_cli.errors import CORRUPT, InputError, UsageError
from modelzip_cli.limits import parse
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
    def from_dict(cls, d: Any, where: str = "the checkpoint") -> Manifest:
        """A manifest read from a file, validated (`validate_manifest`)."""
        return validate_manifest(d, where).manifest()

    def copy(self) -> Manifest:
        return copy.deepcopy(self)

    def with_edits(self, edits: list) -> Manifest:
        """A new manifest with `edits` (checkpoint.edits.Edit objects) appended to the edit log."""
        new = self.copy()
        new.edits.extend(e.to_dict() for e in edits)
        return new

    def example_input(self, batch: int = 1) -> torch.Tensor:
        import torch

        if not self.input_shape:
            raise UsageError("no example input shape is known for this model",
                             hint="pass --input-shape, e.g. --input-shape 1,64")
        shape = [batch, *self.input_shape[1:]]
        if self.input_dtype == "long":
            return torch.zeros(shape, dtype=torch.long, device="cpu")
        return torch.randn(shape, generator=torch.Generator().manual_seed(0), device="cpu")


# ---------------------------------------------------------------------------------------------------
# Validation. A manifest comes from a file, and files are untrusted: every field's type and range is checked
# here (pydantic models, as the technique configs), every size against the bytes actually stored in
# `decode_state`, and the architecture and edits against the stored tensors on the meta device in
# checkpoint.py, all before anything is allocated. Every failure is one line naming the field.

MAX_EXAMPLE_VALUES = 1 << 24  # the largest example input a manifest may declare: 16M values per sample
STORED_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
QUANTIZED_DTYPES = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}  # → the stored integer dtype
TORCH_CONSTANTS = (*QUANTIZED_DTYPES, *STORED_DTYPES, "per_tensor_affine", "per_tensor_symmetric",
                   "per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams")
NonNegInt = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class BitmaskCodec(_Strict):
    codec: Literal["bitmask"]
    shape: list[NonNegInt] = Field(max_length=8)
    dtype: Literal[STORED_DTYPES]
    nnz: NonNegInt


class QTensorCodec(_Strict):
    codec: Literal["qtensor"]
    dtype: Literal[tuple(QUANTIZED_DTYPES)]
    qscheme: Literal["per_tensor", "per_channel"]
    scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    zero_point: int | None = None
    axis: NonNegInt | None = None

    @model_validator(mode="after")
    def _fields_of_the_scheme(self) -> QTensorCodec:
        if self.qscheme == "per_tensor" and (self.scale is None or self.zero_point is None):
            raise ValueError("per_tensor needs a scale and a zero_point")
        if self.qscheme == "per_channel" and self.axis is None:
            raise ValueError("per_channel needs an axis")
        return self


class AliasCodec(_Strict):
    """A tensor that is another stored tensor (tied weights: a language model's output layer and its
    embedding): nothing stored twice, and the tie comes back on load."""

    codec: Literal["alias"]
    of: str = Field(max_length=1000)


class TupleCodec(_Strict):
    codec: Literal["tuple"]
    length: int = Field(ge=0, le=16)
    none: list[NonNegInt] = []

    @model_validator(mode="after")
    def _none_in_range(self) -> TupleCodec:
        if any(i >= self.length for i in self.none):
            raise ValueError(f"none names an element beyond length {self.length}")
        return self


class TorchConstant(_Strict):
    torch: Literal[TORCH_CONSTANTS]


class ValueConstant(_Strict):
    value: bool | int | float | str | None


class EditRecord(BaseModel):
    """An edit's kind; each kind's own fields are checked by its replay's schema (edits.py)."""

    model_config = ConfigDict(strict=True, extra="allow")
    kind: str


class StateVersion(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    version: int | None = None


class LayerRow(BaseModel):
    """A row of the per-layer table `inspect` shows from the header."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    type: str = "-"
    shape: list[int]
    scheme: str
    params: NonNegInt | None = None
    nonzero: NonNegInt | None = None
    sparsity: float | None = None
    bytes: NonNegInt | None = None


class ManifestSchema(BaseModel):
    """The manifest as stored (docs/FORMAT.md, "Manifest"). Keys a newer writer adds are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    format: Literal["modelzip"]
    format_version: int = Field(ge=1)
    tool_version: str | None = None
    arch: str = Field(min_length=1)
    arch_kwargs: dict[str, Any] = {}
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=2, max_length=8)  # (1, …)
    input_dtype: Literal["float", "long"] = "float"
    edits: list[EditRecord] = []
    encodings: dict[str, Annotated[BitmaskCodec | QTensorCodec | TupleCodec | AliasCodec,
                                   Field(discriminator="codec")]] = {}
    constants: dict[str, TorchConstant | ValueConstant] = {}
    state_versions: dict[str, StateVersion] = {}
    layers: list[LayerRow] | None = None

    @field_validator("input_shape")
    @classmethod
    def _bounded_example(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and math.prod(shape[1:]) > MAX_EXAMPLE_VALUES:
            raise ValueError(f"declares {math.prod(shape[1:]):,} values per sample, more than the "
                             f"{MAX_EXAMPLE_VALUES:,} an example input may have")
        return shape

    def manifest(self) -> Manifest:
        return Manifest(arch=self.arch, arch_kwargs=dict(self.arch_kwargs), input_shape=self.input_shape,
                        input_dtype=self.input_dtype, edits=[e.model_dump() for e in self.edits])

    def codecs(self) -> dict[str, dict]:
        return {k: v.model_dump(exclude_none=True) for k, v in self.encodings.items()}

    def constant_values(self) -> dict[str, dict]:
        return {k: v.model_dump() for k, v in self.constants.items()}

    def versions(self) -> dict[str, dict]:
        return {k: v.model_dump(exclude_none=True) for k, v in self.state_versions.items()}


def describe_error(error: dict) -> str:
    """One pydantic error as `field a.b.0: what is wrong, got VALUE`."""
    loc = ".".join(str(p) for p in error.get("loc", ()) if p not in ("bitmask", "qtensor", "tuple"))
    value = repr(error.get("input"))
    value = value if len(value) <= 60 else value[:57] + "..."
    msg = error["msg"].removeprefix("Value error, ")
    return f"field {loc or '(top level)'}: {msg[0].lower() + msg[1:]}, got {value}"


def parse_manifest(text: str | bytes, where: str) -> ManifestSchema:
    """The manifest's JSON text → a validated manifest, or one line naming what is wrong."""
    try:
        raw = parse(json.loads, text, f"{where}: the manifest", hint=CORRUPT)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{where}: the manifest is not valid JSON ({exc})", hint=CORRUPT) from None
    return validate_manifest(raw, where)


def validate_manifest(raw: Any, where: str) -> ManifestSchema:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: the manifest is a JSON {type(raw).__name__}, not an object", hint=CORRUPT)
    version = raw.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise InputError(f"{where}: checkpoint format version {version} is newer than this modelzip reads "
                         f"({FORMAT_VERSION})", hint="upgrade modelzip")
    try:
        return ManifestSchema.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{where}: manifest {describe_error(exc.errors()[0])}", hint=CORRUPT) from None
    except RecursionError:
        raise InputError(f"{where}: the manifest is nested too deeply", hint=CORRUPT) from None


# ---------------------------------------------------------------------------------------------------
# Tensor codecs: state dict ⇄ plain tensors + an encodings table for the manifest.


def _sparse_pays(t: torch.Tensor, nnz: int) -> bool:
    """Bitmask (1 bit/elem) + values beats dense by at least 10%."""
    n = t.numel()
    return n >= 256 and (n / 8 + nnz * t.element_size()) <= 0.9 * n * t.element_size()


def _store(name: str, t: torch.Tensor, tensors: dict, encodings: dict, nnz: int | None = None) -> None:
    """Store one plain tensor: as a bitmask plus its non-zero values when that is smaller, else dense.
    Applies to float weights zeroed by pruning and to the integer weights they become once quantized."""
    import numpy as np
    import torch

    from modelzip_cli.kernels.native import count_nonzero

    if t.dtype != torch.bool and t.numel() >= 256:
        nnz = count_nonzero(t) if nnz is None else nnz
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


def encode_state(state: dict[str, Any], nonzeros: dict[str, int] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, Any]]:
    """Split a state dict into stored tensors, per-tensor encodings and JSON constants. `nonzeros`: the
    non-zero counts of some of its tensors, known already (a streamed run counts them as it reads them)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, dict] = {}
    constants: dict[str, Any] = {}
    seen_storage: set[int] = set()
    seen_tensor: dict[tuple, str] = {}  # (pointer, shape, stride, dtype) → the first name stored for it
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
        # The same tensor under two names (tied weights) is stored once; another view of shared storage is
        # stored as a copy (safetensors refuses tensors that share storage).
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen_tensor:
            encodings[name] = {"codec": "alias", "of": seen_tensor[key]}
            continue
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen_storage:
            t = t.clone()
        seen_storage.add(ptr)
        if t.numel():
            seen_tensor[key] = name
        _store(name, t, tensors, encodings, (nonzeros or {}).get(name))
    return tensors, encodings, constants


def _dtype_name(t: Any) -> str:
    return str(getattr(t, "dtype", type(t).__name__)).removeprefix("torch.")


def decode_state(tensors: dict[str, torch.Tensor], encodings: dict[str, dict], constants: dict[str, Any],
                 where: str = "the checkpoint") -> dict[str, Any]:
    """Inverse of `encode_state`. `encodings` and `constants` come validated (`ManifestSchema`); every size
    they declare is checked against the tensors actually stored before anything is allocated."""
    import numpy as np
    import torch

    def fail(message: str):
        raise InputError(f"{where}: {message}", hint=CORRUPT)

    def stored(key: str) -> torch.Tensor:
        t = tensors.get(key)
        if not isinstance(t, torch.Tensor):
            fail(f"tensor {key!r}, which the manifest's encodings name, is missing")
        return t

    def part(key: str) -> torch.Tensor | tuple:
        return decode_one(key, encodings[key]) if key in encodings else stored(key)

    def bitmask(name: str, enc: dict) -> torch.Tensor:
        shape, n = enc["shape"], math.prod(enc["shape"])
        mask, values = stored(f"{name}{SEP}mask"), stored(f"{name}{SEP}values")
        if mask.dtype != torch.uint8 or mask.ndim != 1 or mask.numel() != (n + 7) // 8:
            fail(f"tensor {name!r}: its encoding's shape {shape} declares {n:,} values, but its mask holds "
                 f"{mask.numel():,} {_dtype_name(mask)} values, not {(n + 7) // 8:,} bytes")
        if values.ndim != 1 or values.numel() != enc["nnz"] or _dtype_name(values) != enc["dtype"]:
            fail(f"tensor {name!r}: its values are {values.numel():,} {_dtype_name(values)}, its encoding "
                 f"declares nnz {enc['nnz']:,} {enc['dtype']}")
        bits = torch.from_numpy(np.unpackbits(mask.numpy(), count=n).astype(bool))
        if int(bits.sum()) != enc["nnz"]:
            fail(f"tensor {name!r}: its mask marks {int(bits.sum()):,} values, its encoding's nnz says "
                 f"{enc['nnz']:,}")
        dense = torch.zeros(n, dtype=values.dtype)
        dense[bits] = values
        return dense.reshape(shape)

    def qtensor(name: str, enc: dict) -> QInts:  # format 1 only
        ints, want = part(f"{name}{SEP}int"), QUANTIZED_DTYPES[enc["dtype"]]
        if not isinstance(ints, torch.Tensor) or _dtype_name(ints) != want:
            fail(f"tensor {name!r}: its integers are {_dtype_name(ints)}, its encoding's dtype {enc['dtype']} "
                 f"needs {want}")
        info = torch.iinfo(ints.dtype)
        if enc["qscheme"] == "per_tensor":
            if not info.min <= enc["zero_point"] <= info.max:
                fail(f"tensor {name!r}: zero_point {enc['zero_point']} is outside {want}")
            return QInts(ints, float(enc["scale"]), int(enc["zero_point"]))
        axis = enc["axis"]
        if axis >= ints.ndim:
            fail(f"tensor {name!r}: axis {axis} of a {ints.ndim}-d tensor")
        channels = ints.shape[axis]
        scale, zero_point = stored(f"{name}{SEP}scale"), stored(f"{name}{SEP}zero_point")
        if (not scale.is_floating_point() or tuple(scale.shape) != (channels,) or not bool(torch.isfinite(scale).all())
                or bool((scale <= 0).any())):
            fail(f"tensor {name!r}: its scale must be {channels} finite positive floats")
        if (zero_point.is_floating_point() or tuple(zero_point.shape) != (channels,)
                or bool((zero_point < info.min).any()) or bool((zero_point > info.max).any())):
            fail(f"tensor {name!r}: its zero_point must be {channels} integers within {want}")
        return QInts(ints, scale, zero_point, axis)

    def decode_one(name: str, enc: dict) -> torch.Tensor | QInts | tuple:
        codec = enc.get("codec")
        if codec == "bitmask":
            return bitmask(name, enc)
        if codec == "qtensor":
            return qtensor(name, enc)
        if codec == "tuple":
            return tuple(None if i in enc["none"] else part(f"{name}{SEP}{i}") for i in range(enc["length"]))
        fail(f"tensor {name!r} has unknown codec {codec!r}")

    state: dict[str, Any] = {k: v for k, v in tensors.items() if SEP not in k}
    for name, enc in encodings.items():
        if SEP in name or enc.get("codec") == "alias":  # a part: decoded with its parent; aliases: below
            continue
        state[name] = decode_one(name, enc)
    for name, enc in encodings.items():
        if enc.get("codec") == "alias":
            target = enc.get("of")
            if SEP in name or target not in state or encodings.get(target, {}).get("codec") == "alias":
                fail(f"tensor {name!r} is an alias of {target!r}, which is not a stored tensor")
            state[name] = state[target]
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
    # Only versions above 1: a module without an entry loads as version 1 would (every torch state check is
    # `version is None or version < N` with N ≥ 2), and hundreds of `{"version": 1}` only bloat the header.
    # A version that is not an int (Phi-3 models say "0.0.5") is a label of the model class, no torch layout.
    versions = {k: v for k, v in (getattr(state, "_metadata", None) or {}).items()
                if type(v.get("version")) is int and v != {"version": 1}}
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
