"""Checkpoints: read, write, manifest, architecture resolution and replay of structural edits.

A modelzip checkpoint is a set of plain tensors plus a JSON manifest. Loading rebuilds the module tree
from the manifest's architecture, replays its edits (pruning, factorization, quantization) on that tree,
then loads the tensors strictly. Nothing here unpickles code unless the caller says `trust_code`.

Tensors that a plain safetensors/weights-only file cannot hold, or that would waste space, go through a
codec: torch quantized tensors become integer tensors plus scales and zero points; sparse float tensors
become a bitmask plus their non-zero values.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelzip_cli import __version__
from modelzip_cli.errors import InputError, ModelzipError, OutputError, UntrustedCodeError, UsageError
from modelzip_cli.inspection import SEP, check_readable
from modelzip_cli.zoo import ZOO

FORMAT_VERSION = 1
MANIFEST_KEY = "modelzip"  # safetensors metadata key / .pt archive key holding the manifest JSON
TENSORS_KEY = "tensors"  # .pt archive key holding the tensors
TRUST_ENV = "MODELZIP_TRUSTED_MODULES"


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

    def example_input(self, batch: int = 1) -> torch.Tensor:
        if not self.input_shape:
            raise UsageError("no example input shape is known for this model",
                             hint="pass --input-shape, e.g. --input-shape 1,64")
        shape = [batch, *self.input_shape[1:]]
        if self.input_dtype == "long":
            return torch.zeros(shape, dtype=torch.long)
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@dataclass
class Loaded:
    """A model in memory with the manifest that describes it and where it came from."""

    model: nn.Module
    manifest: Manifest
    path: Path | None = None
    source: str = "modelzip"  # modelzip | state-dict | pickled-module


# ---------------------------------------------------------------------------------------------------
# Architectures


def trusted_modules() -> set[str]:
    return {m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()}


def build_arch(ref: str, kwargs: dict | None = None, *, trusted: bool = False) -> nn.Module:
    """Instantiate `zoo:NAME` or `package.module:callable` with kwargs.

    User code is imported only when `trusted` (the user named it with --arch) or when its top-level
    package is listed in MODELZIP_TRUSTED_MODULES.
    """
    kwargs = dict(kwargs or {})
    if ref.startswith("zoo:"):
        name = ref[4:]
        if name not in ZOO:
            raise UsageError(f"unknown architecture {ref!r}",
                             hint="built in: " + ", ".join(f"zoo:{n}" for n in ZOO))
        factory: Callable[..., nn.Module] = ZOO[name].build
    else:
        module_name, sep, attr = ref.partition(":")
        if not sep or not module_name or not attr:
            raise UsageError(f"bad architecture reference {ref!r}",
                             hint="use zoo:NAME or package.module:callable")
        allowed = trusted_modules()
        if not trusted and not any(module_name == m or module_name.startswith(m + ".") for m in allowed):
            raise UntrustedCodeError(
                f"the checkpoint names architecture {ref!r}, which is not built in and not trusted",
                hint=f"pass --arch {ref} or set {TRUST_ENV}={module_name.split('.')[0]} if you trust it")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"cannot import architecture {ref!r}: {exc}",
                             hint="check the module is importable (PYTHONPATH)") from None
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise UsageError(f"--arch-kwargs do not fit {ref}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"--arch-kwargs do not fit {ref}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"architecture {ref!r} did not return an nn.Module")
    model._modelzip_arch = (ref, kwargs)  # so save_model knows how to rebuild it
    return model


def default_input_shape(ref: str | None, kwargs: dict) -> list[int] | None:
    if ref and ref.startswith("zoo:") and ref[4:] in ZOO:
        return ZOO[ref[4:]].input_shape(kwargs)
    return None


# ---------------------------------------------------------------------------------------------------
# Edits: each kind has one replay function, registered by the technique that makes it.

ReplayFn = Callable[[nn.Module, dict, Manifest], nn.Module]
EDIT_REPLAYS: dict[str, ReplayFn] = {}


def register_edit(kind: str) -> Callable[[ReplayFn], ReplayFn]:
    def decorate(fn: ReplayFn) -> ReplayFn:
        EDIT_REPLAYS[kind] = fn
        return fn

    return decorate


def replay_edits(model: nn.Module, manifest: Manifest) -> nn.Module:
    """Apply the manifest's edits, in order, to a freshly built model. Returns the (possibly new) model."""
    import modelzip_cli.techniques  # noqa: F401  (registers every technique's replay functions)

    for i, edit in enumerate(manifest.edits):
        kind = edit.get("kind")
        if kind not in EDIT_REPLAYS:
            raise InputError(f"edit {i + 1} of the manifest has unknown kind {kind!r}",
                             hint="the file was written by a newer modelzip; upgrade")
        model = EDIT_REPLAYS[kind](model, edit, manifest)
    return model


# ---------------------------------------------------------------------------------------------------
# Tensor codecs: state dict ⇄ plain tensors + an encodings table for the manifest.


def _sparse_pays(t: torch.Tensor, nnz: int) -> bool:
    """Bitmask (1 bit/elem) + values beats dense by at least 10%."""
    n = t.numel()
    return n >= 256 and (n / 8 + nnz * t.element_size()) <= 0.9 * n * t.element_size()


def _store(name: str, t: torch.Tensor, tensors: dict, encodings: dict) -> None:
    """Store one plain tensor: as a bitmask plus its non-zero values when that is smaller, else dense.
    Applies to float weights zeroed by pruning and to the integer weights they become once quantized."""
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


def encode_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, Any]]:
    """Split a state dict into stored tensors, per-tensor encodings and JSON constants."""
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
            qscheme = t.qscheme()
            enc = {"codec": "qtensor", "dtype": str(t.dtype).removeprefix("torch.")}
            _store(f"{name}{SEP}int", t.int_repr(), tensors, encodings)
            if qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                enc.update(qscheme="per_tensor", scale=float(t.q_scale()), zero_point=int(t.q_zero_point()))
            else:
                enc.update(qscheme="per_channel", axis=int(t.q_per_channel_axis()))
                scales, zps = t.q_per_channel_scales(), t.q_per_channel_zero_points()
                if torch.equal(scales.float().double(), scales.double()):  # float32 holds them exactly
                    scales = scales.float()
                tensors[f"{name}{SEP}scale"] = scales.contiguous()
                tensors[f"{name}{SEP}zero_point"] = zps.to(torch.int32).contiguous()
            encodings[name] = enc
            continue
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
    state: dict[str, Any] = {k: v for k, v in tensors.items() if SEP not in k}

    def part(key: str) -> torch.Tensor:
        return decode_one(key, encodings[key]) if key in encodings else tensors[key]

    def decode_one(name: str, enc: dict) -> torch.Tensor | tuple:
        codec = enc.get("codec")
        if codec == "bitmask":
            shape, mask_bytes = enc["shape"], tensors[f"{name}{SEP}mask"].numpy()
            n = int(np.prod(shape)) if shape else 1
            mask = torch.from_numpy(np.unpackbits(mask_bytes, count=n).astype(bool))
            dense = torch.zeros(n, dtype=getattr(torch, enc["dtype"]))
            dense[mask] = tensors[f"{name}{SEP}values"]
            return dense.reshape(shape)
        if codec == "qtensor":
            ints, dtype = part(f"{name}{SEP}int"), getattr(torch, enc["dtype"])
            if enc["qscheme"] == "per_tensor":
                return torch._make_per_tensor_quantized_tensor(ints, enc["scale"], enc["zero_point"])
            q = torch._make_per_channel_quantized_tensor(
                ints, tensors[f"{name}{SEP}scale"].double(), tensors[f"{name}{SEP}zero_point"].long(), enc["axis"])
            if q.dtype != dtype:
                raise InputError(f"tensor {name!r}: stored as {q.dtype}, manifest says {dtype}")
            return q
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


# ---------------------------------------------------------------------------------------------------
# Reading


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of corruption
        raise InputError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})",
                         hint="the file may be truncated or corrupt") from None
    return tensors, metadata


def read_torch(path: Path, *, trust_code: bool, mmap: bool = False) -> Any:
    """torch.load with weights_only=True; unpickling code only with trust_code."""
    mmap = mmap and zipfile.is_zipfile(path)  # only the zip archive format can be memory-mapped
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickle protocols; the refusal below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise InputError(f"{path}: not a readable torch file ({str(exc).splitlines()[0]})",
                             hint="the file may be truncated or corrupt") from None
        if not trust_code:
            raise UntrustedCodeError(
                f"{path} holds pickled Python objects, and loading them would run code",
                hint="pass --trust-code only if you trust where the file came from") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable torch file ({str(exc).splitlines()[0]})",
                         hint="the file may be truncated or corrupt") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"{path}: could not unpickle ({exc})") from None


def unwrap_state_dict(obj: Any) -> dict | None:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    return None


def _load_strict(model: nn.Module, state: dict[str, Any], what: str, *, assign: bool = False) -> None:
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())
        raise InputError(f"the tensors do not fit {what}: {first[:400]}",
                         hint="check --arch and --arch-kwargs") from None


def read_raw(path: Path, *, trust_code: bool) -> tuple[dict[str, torch.Tensor] | None, dict | None, Any]:
    """(tensors, manifest dict or None, pickled object or None) of any supported file."""
    check_readable(path)
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        manifest = json.loads(metadata[MANIFEST_KEY]) if MANIFEST_KEY in metadata else None
        return tensors, manifest, None
    obj = read_torch(path, trust_code=trust_code)
    if isinstance(obj, dict) and isinstance(obj.get(MANIFEST_KEY), str):
        return obj.get(TENSORS_KEY, {}), json.loads(obj[MANIFEST_KEY]), None
    state = unwrap_state_dict(obj)
    if state is not None:
        return state, None, None
    if isinstance(obj, nn.Module):
        return None, None, obj
    raise InputError(f"{path} holds neither a modelzip checkpoint, a state dict nor a module",
                     hint="pass a checkpoint written by modelzip, or a state dict with --arch")


# Replays that only build modules and never run the model: safe on the meta device.
META_SAFE_EDITS = {"prune_magnitude", "lowrank", "quantize_weight_only"}


def rebuild(manifest: Manifest, state: dict[str, Any], *, trusted: bool, what: str) -> nn.Module:
    """Build the module tree the manifest describes and load `state` into it strictly.

    When no replay has to run the model, the tree is built on the meta device and the loaded tensors are
    assigned rather than copied: no random initialization, and one copy of the weights in memory instead
    of two. Anything the state does not cover (a non-persistent buffer) sends it down the ordinary path.
    """
    if all(e.get("kind") in META_SAFE_EDITS for e in manifest.edits):
        try:
            with torch.device("meta"):
                model = replay_edits(build_arch(manifest.arch, manifest.arch_kwargs, trusted=trusted), manifest)
        except ModelzipError:
            raise
        except Exception:  # user code that cannot be built on meta: build it for real below
            model = None
        if model is not None:
            _load_strict(model, state, what, assign=True)
            if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
                return model
    model = replay_edits(build_arch(manifest.arch, manifest.arch_kwargs, trusted=trusted), manifest)
    _load_strict(model, state, what)
    return model


def load_checkpoint(path: str | Path, *, arch: str | None = None, arch_kwargs: dict | None = None,
                    trust_code: bool = False, input_shape: list[int] | None = None,
                    input_dtype: str | None = None) -> Loaded:
    """Read any supported input (CONTRACT.md, Checkpoints) and rebuild the module."""
    path = Path(path)
    tensors, manifest_dict, pickled = read_raw(path, trust_code=trust_code)
    if manifest_dict is not None:
        manifest = Manifest.from_dict(manifest_dict)
        if arch is not None and arch != manifest.arch:
            raise UsageError(f"{path} is a modelzip checkpoint of {manifest.arch}; --arch {arch} contradicts it",
                             hint="drop --arch")
        state = OrderedDict(decode_state(tensors, manifest_dict.get("encodings", {}),
                                         manifest_dict.get("constants", {})))
        state._metadata = OrderedDict(manifest_dict.get("state_versions", {}))  # as torch.save would keep it
        model = rebuild(manifest, state, trusted=(arch == manifest.arch),
                        what=f"{manifest.arch} as the manifest rebuilds it")
        source = "modelzip"
    elif pickled is not None:
        model = pickled
        ref, kwargs = getattr(model, "_modelzip_arch", (arch, arch_kwargs or {}))
        manifest = Manifest(arch=ref, arch_kwargs=kwargs, input_shape=default_input_shape(ref, kwargs))
        source = "pickled-module"
    else:
        if arch is None:
            raise UsageError(f"{path} is a plain state dict and does not say which architecture it is",
                             hint="pass --arch zoo:NAME or --arch package.module:callable, with --arch-kwargs")
        manifest = Manifest(arch=arch, arch_kwargs=dict(arch_kwargs or {}),
                            input_shape=default_input_shape(arch, arch_kwargs or {}))
        model = rebuild(manifest, tensors, trusted=True, what=arch)
        source = "state-dict"
    if input_shape is not None:
        manifest.input_shape = list(input_shape)
    if input_dtype is not None:
        manifest.input_dtype = input_dtype
    model.eval()
    return Loaded(model=model, manifest=manifest, path=path, source=source)


def load_model(path: str | Path, **kwargs: Any) -> nn.Module:
    """The rebuilt `nn.Module`, in eval mode."""
    return load_checkpoint(path, **kwargs).model


# ---------------------------------------------------------------------------------------------------
# Writing


def check_output(output: Path, *, inputs: list[Path], force: bool, suffixes: tuple[str, ...]) -> None:
    """Refuse an output that would clobber an input or an existing file, or that cannot be written.

    Called before any work so that a bad output path costs nothing and writes nothing.
    """
    out = output.resolve()
    for inp in inputs:
        if inp.exists() and out == inp.resolve():
            raise OutputError(f"output {output} is the input; modelzip never modifies its input",
                              hint="pass a different -o/--output")
    if output.suffix not in suffixes:
        raise OutputError(f"output {output}: unknown suffix {output.suffix!r}", hint="use " + " or ".join(suffixes))
    if output.is_dir():
        raise OutputError(f"output {output} is a directory", hint="pass a file path")
    if output.exists() and not force:
        raise OutputError(f"output {output} already exists", hint="pass --force to overwrite it")
    folder = out.parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist", hint="create it first")
    try:  # the only reliable test, as root too: actually create a file there
        probe = folder / f".modelzip-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}", hint="choose a writable folder") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary file would be, whatever the writer chose
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(model: nn.Module, manifest: Manifest, path: str | Path) -> None:
    """Write `model` with `manifest` as a modelzip checkpoint, atomically. No pickled code, ever."""
    path = Path(path)
    if manifest.arch is None:
        raise UsageError("the model's architecture is unknown, so the checkpoint could not be rebuilt",
                         hint="pass --arch REF (and --arch-kwargs) naming the architecture")
    state = model.state_dict()
    tensors, encodings, constants = encode_state(state)
    from modelzip_cli.measure import layer_table

    # The layer table travels in the manifest, so `inspect` needs the header only, whatever the file size.
    # Per-module serialization versions: torch.ao's quantized modules read their state differently by version.
    versions = {k: v for k, v in (getattr(state, "_metadata", None) or {}).items() if v.get("version") is not None}
    full = {**manifest.to_dict(), "encodings": encodings, "constants": constants, "state_versions": versions,
            "layers": layer_table(model)}
    text = json.dumps(full, sort_keys=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={MANIFEST_KEY: text}))
    elif path.suffix in {".pt", ".pth", ".bin"}:
        atomic_write(path, lambda tmp: torch.save({MANIFEST_KEY: text, TENSORS_KEY: tensors}, tmp))
    else:
        raise OutputError(f"output {path}: unknown suffix {path.suffix!r}", hint="use .safetensors or .pt")


def save_model(model: nn.Module, path: str | Path, *, arch: str | None = None, arch_kwargs: dict | None = None,
               input_shape: list[int] | None = None, edits: list[dict] | None = None) -> None:
    """Write a module built from a known architecture. Zoo modules built by modelzip know their own."""
    ref, kwargs = getattr(model, "_modelzip_arch", (None, {}))
    ref, kwargs = arch or ref, arch_kwargs if arch_kwargs is not None else kwargs
    manifest = Manifest(arch=ref, arch_kwargs=dict(kwargs or {}),
                        input_shape=input_shape or default_input_shape(ref, kwargs or {}), edits=edits or [])
    save_checkpoint(model, manifest, path)
