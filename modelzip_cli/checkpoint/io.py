"""Checkpoints: read, write, architecture resolution with its trust gate, and rebuilding from a manifest.

Loading rebuilds the module tree from the manifest's architecture, replays its edits (`edits.py`) on that
tree, then loads the tensors strictly. Nothing here unpickles code unless the caller says `trust_code`.
The file layout itself (keys, manifest, codecs) is `format.py`, described in docs/FORMAT.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import itertools
import json
import os
import pickle
import sys
import warnings
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelzip_cli.checkpoint import compressed_tensors, legacy, shards
from modelzip_cli.checkpoint.decoder_edits import Conv1DEdit
from modelzip_cli.checkpoint.edits import Edit, replay_edits, validated_edits
from modelzip_cli.checkpoint.format import (
    CHECKPOINT_SUFFIXES,
    CORRUPT,
    MANIFEST_KEY,
    TENSORS_KEY,
    Encoded,
    Manifest,
    decode_state,
    encode_module,
    parse_manifest,
)
from modelzip_cli.checkpoint.layers import layer_table
from modelzip_cli.errors import (
    CodeRanWarning,
    InputError,
    ModelzipError,
    OutputError,
    UntrustedCodeError,
    UsageError,
    first_line,
)
from modelzip_cli.files import Outputs, atomic_write, check_readable
from modelzip_cli.kernels import native
from modelzip_cli.limits import check_archive, check_memory, check_regular
from modelzip_cli.nn import decoders
from modelzip_cli.nn.surgery import to_dtype
from modelzip_cli.zoo import ZOO

TRUST_ENV = "MODELZIP_TRUSTED_MODULES"


@dataclass
class Loaded:
    """A model in memory with the manifest that describes it and where it came from."""

    model: nn.Module
    manifest: Manifest
    path: Path | None = None
    source: str = "modelzip"  # modelzip | state-dict | pickled-module
    encoded: Encoded | None = None  # the model's state encoded, once a step has changed it (runner)
    notes: list[str] = field(default_factory=list)  # what loading changed, for the report's warnings


# ---------------------------------------------------------------------------------------------------
# Architectures


_TRUSTED_HERE: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("trusted_here", default=frozenset())


def trusted_modules() -> set[str]:
    """MODELZIP_TRUSTED_MODULES, plus the modules a caller of `load_checkpoint` passed as `trusted_modules`."""
    return {m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()} | set(_TRUSTED_HERE.get())


@contextlib.contextmanager
def trusting(modules: Collection[str]) -> Iterator[None]:
    """Trust `modules` (and their submodules) for the duration of the block, as MODELZIP_TRUSTED_MODULES would."""
    token = _TRUSTED_HERE.set(_TRUSTED_HERE.get() | frozenset(modules))
    try:
        yield
    finally:
        _TRUSTED_HERE.reset(token)


def _within(module_name: str, root: str) -> bool:
    return module_name == root or module_name.startswith(root + ".")


def check_trusted(ref: str, *, trusted: bool = False, what: str = "the checkpoint") -> None:
    """The trust gate, before any import: `ref` is built in (`zoo:`), or the user named it (`trusted`), or its
    module is listed in MODELZIP_TRUSTED_MODULES. Anything a file names is untrusted otherwise. The hint
    speaks Python (`load_model`'s arguments); the CLI says its own flags (`runner.load_input`)."""
    if ref.startswith(("zoo:", "hf:")):  # built in: the zoo, and transformers' Auto classes without remote code
        return
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"bad architecture reference {ref!r}", hint="use zoo:NAME or package.module:callable")
    if trusted or any(_within(module_name, m) for m in trusted_modules()):
        return
    root = module_name.split(".")[0]
    error = UntrustedCodeError(
        f"{what} names {ref!r}, which is not built in and not trusted, so it was not imported",
        hint=(f"pass arch={ref!r} or trusted_modules=[{root!r}] to load_model, or " if what == "the checkpoint"
              else "") + f"set {TRUST_ENV}={root} if you trust that code")
    if what == "the checkpoint":
        error.cli_hint = f"pass --trust-arch (or --arch {ref}), or set {TRUST_ENV}={root}, if you trust that code"
    raise error


@contextlib.contextmanager
def _on_import_path() -> Iterator[None]:
    """The current directory on the import path while an architecture is imported, as `python -m` has it;
    last, so that an installed package is never shadowed by a file of the same name here."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_arch(ref: str, *, trusted: bool = False) -> Callable[..., nn.Module]:
    """The callable `package.module:attr` names, imported only after the trust gate, and only if it is what the
    module defines as an architecture: an nn.Module subclass or a function whose `__module__` is that module
    (or a submodule, or within the trusted module that covers it). A name the module imported from elsewhere
    (`from subprocess import Popen`) is refused before anything is called."""
    check_trusted(ref, trusted=trusted)
    module_name, _, attr = ref.partition(":")
    roots = {module_name} | {m for m in trusted_modules() if _within(module_name, m)}
    with _on_import_path():
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except ModelzipError:
            raise
        except Exception as exc:  # ImportError, AttributeError, or whatever the module raises as it is imported
            raise UsageError(f"cannot import architecture {ref!r}: {first_line(exc)}",
                             hint="check the module is importable from the current directory or PYTHONPATH") from None
    is_arch = (isinstance(obj, type) and issubclass(obj, nn.Module)) or inspect.isfunction(obj)
    defined_in = getattr(obj, "__module__", None)
    if not is_arch or not isinstance(defined_in, str) or not any(_within(defined_in, r) for r in roots):
        kind = "class" if isinstance(obj, type) else type(obj).__name__
        made = f"a {kind} of {defined_in}" if isinstance(defined_in, str) else f"a {kind}"
        raise UntrustedCodeError(
            f"{ref!r} is {made}, not an nn.Module subclass or a function that {module_name} defines, "
            "so it was not called", hint="name an architecture where it is defined, in a module you trust")
    return obj


def build_arch(ref: str, kwargs: dict | None = None, *, trusted: bool = False,
               kwargs_label: str = "--arch-kwargs") -> nn.Module:
    """Instantiate `zoo:NAME` or `package.module:callable` with kwargs, after the trust gate
    (`check_trusted`, `import_arch`): user code is imported only when trusted, and only what the module defines
    is called. `kwargs_label` names where the kwargs came from in errors (the flag, or a manifest's field)."""
    kwargs = dict(kwargs or {})
    check_trusted(ref, trusted=trusted)
    if torch.empty(0).device.type != "meta":  # one size estimate before any real build, against the memory limit
        values = declared_values(ref, kwargs, trusted=trusted, kwargs_label=kwargs_label)
        if values is not None:
            check_memory(4 * values, f"{ref} as {kwargs_label} declare it ({values:,} values)",
                         hint=f"check {kwargs_label}")
    if ref.startswith("zoo:"):
        name = ref[4:]
        if name not in ZOO:
            raise UsageError(f"unknown architecture {ref!r}",
                             hint="built in: " + ", ".join(f"zoo:{n}" for n in ZOO))
        factory: Callable[..., nn.Module] = ZOO[name].build
    elif ref.startswith("hf:"):
        from modelzip_cli import hf

        if not isinstance(kwargs.get("config"), dict):
            raise InputError(f"architecture {ref} needs its config", hint='--arch-kwargs \'{"config": {...}}\'')
        factory = functools.partial(hf.build, hf.task_for(kwargs["config"], ref[3:] or None))
    else:
        factory = import_arch(ref, trusted=trusted)
    try:
        model = factory(**kwargs)
    except ModelzipError:
        raise
    except Exception as exc:  # wrong names, types or values: a zoo class raises TypeError, ValueError, RuntimeError
        raise InputError(f"{kwargs_label} do not fit {ref}: {first_line(exc)}", hint=f"check {kwargs_label}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"architecture {ref!r} did not return an nn.Module")
    model._modelzip_arch = (ref, kwargs)  # so save_model knows how to rebuild it
    return model


def declared_values(ref: str, kwargs: dict, *, trusted: bool = False,
                    kwargs_label: str = "--arch-kwargs") -> int | None:
    """How many values (parameters and buffers) `ref` built with `kwargs` holds, counted on the meta device
    without allocating anything (`hf.declared_values` for transformers' models); None for user code that
    cannot be built on meta."""
    if ref.startswith("hf:"):
        from modelzip_cli import hf

        if not isinstance(kwargs.get("config"), dict):
            return None  # build_arch says what is missing
        return hf.declared_values(hf.task_for(kwargs["config"], ref[3:] or None), kwargs["config"])
    try:
        with torch.device("meta"):
            model = build_arch(ref, kwargs, trusted=trusted, kwargs_label=kwargs_label)
    except ModelzipError:
        if ref.startswith("zoo:"):  # built-in classes build on meta: the kwargs are wrong
            raise
        return None
    return sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))


def default_input_shape(ref: str | None, kwargs: dict) -> list[int] | None:
    if ref and ref.startswith("zoo:") and ref[4:] in ZOO:
        return ZOO[ref[4:]].input_shape(kwargs)
    if ref and ref.startswith("hf:") and isinstance(kwargs.get("config"), dict):
        from modelzip_cli import hf

        return hf.example_shape(kwargs["config"], ref[3:])[0]
    return None


def default_input_dtype(ref: str | None, kwargs: dict) -> str:
    if ref and ref.startswith("hf:") and isinstance(kwargs.get("config"), dict):
        from modelzip_cli import hf

        return hf.example_shape(kwargs["config"], ref[3:])[1]
    return "float"


def float_dtype(state: dict[str, Any]) -> torch.dtype | None:
    """The float dtype all stored float tensors share (bf16, fp16, fp64, …), or None when they differ."""
    dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


# ---------------------------------------------------------------------------------------------------
# Reading


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata, each entry checked against the file's size first
    (`shards.read_header`). Plain reads into memory the tensors own: a memory map's pages would stay resident
    beside the copies while the file is open (a second model's bytes at the peak)."""
    files = shards.TensorFiles.of(path)
    return dict(files.all()), files.metadata


def read_torch(path: Path, *, trust_code: bool, mmap: bool = False) -> Any:
    """torch.load with weights_only=True; unpickling code only with trust_code."""
    mmap = mmap and zipfile.is_zipfile(path)  # only the zip archive format can be memory-mapped
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickle protocols; the refusal below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise InputError(f"{path}: not a readable torch file ({first_line(exc)})",
                             hint="the file may be truncated or corrupt") from None
        if not trust_code:
            raise UntrustedCodeError(
                f"{path} holds pickled Python objects, and loading them would run code",
                hint="pass --trust-code only if you trust where the file came from") from None
    except Exception as exc:  # a corrupt archive or pickle stream fails in many ways (EOFError, IndexError, …)
        raise InputError(f"{path}: not a readable torch file ({first_line(exc)})",
                         hint="the file may be truncated or corrupt") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"{path}: could not unpickle ({first_line(exc)})") from None
    warnings.warn(f"--trust-code: ran the pickled code in {path}", CodeRanWarning, stacklevel=2)
    return obj


def unwrap_state_dict(obj: Any) -> dict | None:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    return None


def _load_strict(model: nn.Module, state: dict[str, Any], what: str, *, assign: bool = False,
                 hint: str = "check --arch and --arch-kwargs") -> None:
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except Exception as exc:  # size mismatches, missing keys; a forged state can also trip torch.ao's loaders
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"the tensors do not fit {what}: {first[:400]}", hint=hint) from None


def read_raw(path: Path, *, trust_code: bool) -> tuple[dict[str, torch.Tensor] | None, str | None, Any]:
    """(tensors, manifest text or None, pickled object or None) of any supported file."""
    if shards.is_index(path):  # a sharded checkpoint: the manifest is in the index
        files = shards.TensorFiles.of(path)
        text = files.metadata.get(MANIFEST_KEY)
        return dict(files.all()), text if isinstance(text, str) else None, None
    check_readable(path, CHECKPOINT_SUFFIXES)
    check_regular(path, "checkpoint")  # a FIFO would hang the read, a device never end it
    if path.suffix != ".safetensors":
        check_archive(path, "checkpoint")  # a zip bomb is refused before torch.load inflates it
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        return tensors, metadata.get(MANIFEST_KEY), None
    obj = read_torch(path, trust_code=trust_code)
    if isinstance(obj, dict) and isinstance(obj.get(MANIFEST_KEY), str):
        tensors = obj.get(TENSORS_KEY)
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise InputError(f"{path}: its {TENSORS_KEY!r} entry is not a table of tensors", hint=CORRUPT)
        return tensors, obj[MANIFEST_KEY], None
    state = unwrap_state_dict(obj)
    if state is not None:
        return state, None, None
    if isinstance(obj, nn.Module):
        return None, None, obj
    raise InputError(f"{path} holds neither a modelzip checkpoint, a state dict nor a module",
                     hint="pass a checkpoint written by modelzip, or a state dict with --arch")


def _values(state: dict[str, Any]) -> int:
    """How many values the stored state holds (tensors, the tensors inside tuples, a first-wave file's integers)."""
    n = 0
    for v in state.values():
        for t in (v if isinstance(v, tuple) else (v,)):
            t = getattr(t, "ints", t)  # QInts
            n += t.numel() if isinstance(t, torch.Tensor) else 0
    return n


def _meta_checked(manifest: Manifest, edits: list[Edit], state: dict[str, Any], *, trusted: bool, where: str,
                  kwargs_label: str) -> tuple[nn.Module | None, int]:
    """The architecture built on the meta device (nothing allocated) with the leading edits that replay there,
    and how many did: (None, 0) for a Hugging Face model or user code that cannot be built on meta. A model
    that declares more than twice the values the file stores is refused before anything is allocated."""
    if manifest.arch is None:
        return None, 0
    if manifest.arch.startswith("hf:"):  # transformers ties weights as it builds: counted, then built for real
        declared, stored = declared_values(manifest.arch, manifest.arch_kwargs) or 0, _values(state)
        shrunk = any(e.shrinks for e in edits)
        if declared > (16 if shrunk else 4) * stored + (1 << 20):  # int4 stores two values a byte
            raise InputError(f"{where}: {kwargs_label} declare a model of {declared:,} values, but the file stores "
                             f"{stored:,}; nothing was allocated", hint=CORRUPT)
        return None, 0
    try:
        with torch.device("meta"):
            model = build_arch(manifest.arch, manifest.arch_kwargs, trusted=trusted, kwargs_label=kwargs_label)
    except ModelzipError:
        if manifest.arch.startswith("zoo:"):  # built-in classes build on meta: the kwargs are wrong
            raise
        return None, 0
    done = 0
    while done < len(edits) and edits[done].meta_safe:
        done += 1
    with torch.device("meta"):
        model = replay_edits(model, manifest, edits[:done])
    declared, stored = sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers())), _values(state)
    if declared > 2 * stored + (1 << 20):
        raise InputError(f"{where}: {kwargs_label} and the edits declare a model of {declared:,} values, but the "
                         f"file stores {stored:,}; nothing was allocated", hint=CORRUPT)
    return model, done


def _upgrade_first_wave(manifest: Manifest, state: dict[str, Any], *, trusted: bool,
                        where: str) -> tuple[Manifest, dict[str, Any]]:
    """A format-1 file's torch.ao layouts → the plain int8 modules' (legacy.py), once the model its other
    edits describe has been checked on meta against what the file stores."""
    others = [e for e in manifest.edits if e.get("kind") not in legacy.V1_KINDS]
    _meta_checked(replace(manifest, edits=others), validated_edits(replace(manifest, edits=others)), state,
                  trusted=trusted, where=where, kwargs_label="the manifest's arch_kwargs")
    try:
        return legacy.upgrade(manifest, state, lambda edits: replay_edits(
            build_arch(manifest.arch, manifest.arch_kwargs, trusted=trusted), replace(manifest, edits=edits)))
    except ModelzipError:
        raise
    except Exception as exc:  # a forged first-wave layout
        raise InputError(f"{where}: its first-wave (format 1) layout cannot be read: {first_line(exc)}",
                         hint=CORRUPT) from None


def rebuild(manifest: Manifest, state: dict[str, Any], *, trusted: bool, where: str,
            kwargs_label: str = "the manifest's arch_kwargs") -> nn.Module:
    """Build the module tree the manifest describes and load `state` into it strictly.

    The tree is built on the meta device first and checked against the stored tensors before anything is
    allocated: a manifest cannot make modelzip allocate more than what its file holds. The loaded tensors are
    then assigned (no random initialization, one copy of the weights, their stored dtype kept). A Hugging
    Face model, user code that cannot be built on meta, or a module with state the file does not hold (a
    non-persistent buffer) is built for real.
    """
    edits = validated_edits(manifest)
    what = f"{manifest.arch} as {kwargs_label} and the edits build it"
    hint = "check --arch and --arch-kwargs" if kwargs_label.startswith("--") else CORRUPT
    model, done = _meta_checked(manifest, edits, state, trusted=trusted, where=where, kwargs_label=kwargs_label)
    if model is not None and done == len(edits):
        _load_strict(model, state, what, assign=True, hint=hint)
        if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            return model
    model = replay_edits(build_arch(manifest.arch, manifest.arch_kwargs, trusted=trusted, kwargs_label=kwargs_label),
                         manifest, edits)
    dtype = float_dtype(state)
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)  # the output keeps the input's float dtype
    _load_strict(model, state, what, hint=hint)
    return model


def one_float_dtype(model: nn.Module, where: str) -> str | None:
    """A model whose float tensors mix dtypes cannot run (a float64 bias beside float32 weights): cast them
    all to the dtype that holds most values. Quantized modules' scales are float32 whatever the model's dtype,
    and do not count. Returns a note saying so, or None."""
    counts: Counter = Counter()
    for m in model.modules():
        scales = callable(getattr(m, "logical_weights", None))  # modelzip's int8 and weight-only modules
        for t in itertools.chain(m.parameters(recurse=False), () if scales else m.buffers(recurse=False)):
            if t.is_floating_point():
                counts[t.dtype] += t.numel()
    if len(counts) <= 1:
        return None
    dtype = counts.most_common(1)[0][0]
    to_dtype(model, dtype)
    mixed = ", ".join(str(d).removeprefix("torch.") for d in counts)
    return f"{where} mixes float dtypes ({mixed}): loaded as {str(dtype).removeprefix('torch.')}"


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite: its minimum and maximum are (both are NaN when any
    value is), one pass without a temporary as large as `t`."""
    if t.numel() == 0:
        return True
    t = t.detach()
    if (fast := native.all_finite(t)) is not None:
        return fast
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # float8: no aminmax
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_finite(model: nn.Module, where: str) -> None:
    """Non-finite weights make every technique fail or write garbage: refuse them, naming the tensors."""
    bad = [name for name, t in model.state_dict().items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not all_finite(t)]
    if bad:
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        raise InputError(f"{where}: non-finite values (NaN or ±inf) in {', '.join(bad[:6])}{more}",
                         hint="the checkpoint is corrupt, or the training that made it diverged")


def check_quant_params(model: nn.Module, where: str) -> None:
    """The scales of modelzip's quantized modules are positive (as quantizing makes them: an input scale at least
    float32's smallest normal, a weight scale at least that over 127, for an all-zero row) and static zero
    points lie on the int8 grid: a forged 0 or 1e-45 would zero a layer, or divide by zero in every call,
    without any error."""
    from modelzip_cli.nn.int8 import AMAX, AMIN, EPS

    for name, module in model.named_modules():
        if not callable(getattr(module, "logical_weights", None)):
            continue
        for key, t in module.named_buffers(recurse=False):
            least = EPS if key == "input_scale" else EPS / 256
            scale = key.endswith(("scale", "scales")) and t.is_floating_point() and t.numel()
            if scale and not bool((t >= least).all()):
                raise InputError(f"{where}: {name}.{key} holds a scale of {float(t.min()):.3g}; quantization "
                                 f"scales are at least {least:.3g}", hint=CORRUPT)
        q = module._buffers.get("qweight")
        if "weight_scale" in module._buffers and isinstance(q, torch.Tensor) and q.dtype != torch.int8:
            raise InputError(f"{where}: {name}.qweight is {str(q.dtype).removeprefix('torch.')}, not int8",
                             hint=CORRUPT)
        zp = getattr(module, "input_zero_point", None)
        if isinstance(zp, torch.Tensor) and not bool(((zp >= AMIN) & (zp <= AMAX)).all()):
            raise InputError(f"{where}: {name}.input_zero_point is {int(zp.flatten()[0])}, outside the int8 range "
                             f"[{AMIN}, {AMAX}]", hint=CORRUPT)


def _check_pickled(model: nn.Module, ref: str, kwargs: dict, where: str) -> None:
    """A pickled module must be what its recorded (or --arch) architecture builds, or its output could not
    be rebuilt: compare names and shapes with the architecture built on meta."""
    try:
        with torch.device("meta"):
            expected = build_arch(ref, kwargs, trusted=True).state_dict()
    except ModelzipError:
        if ref.startswith("zoo:"):
            raise
        return  # user code that cannot be built on meta: its own load will tell
    actual = model.state_dict()
    for name in sorted(set(expected) | set(actual)):
        a, e = actual.get(name), expected.get(name)
        a_shape = list(a.shape) if isinstance(a, torch.Tensor) else None
        e_shape = list(e.shape) if isinstance(e, torch.Tensor) else None
        if a_shape != e_shape:
            found = "missing" if a is None else f"of shape {a_shape}"
            raise InputError(f"{where}: the pickled module does not match {ref} with --arch-kwargs "
                             f"{json.dumps(kwargs)}: {name} is {found}, the architecture has "
                             f"{'none' if e is None else e_shape}", hint="pass the --arch-kwargs it was built with")


def load_checkpoint(path: str | Path, *, arch: str | None = None, arch_kwargs: dict | None = None,
                    trust_code: bool = False, input_shape: list[int] | None = None,
                    input_dtype: str | None = None, task: str | None = None,
                    output_key: str | None = None, trusted_modules: Collection[str] = (),
                    trust_arch: bool = False) -> Loaded:
    """Read any supported input (docs/FORMAT.md) and rebuild the module. Callable inside
    `torch.inference_mode()`: the module is built outside it, so replays that trace (structured pruning)
    work and the result can still be fine-tuned.

    A checkpoint of user code (`package.module:callable`) is rebuilt only when that code is trusted: `arch`
    names it, `trusted_modules` (or MODELZIP_TRUSTED_MODULES) lists its module, or `trust_arch` says to
    trust whatever architecture the file records (the CLI's --trust-arch)."""
    with torch.inference_mode(False), trusting(trusted_modules):
        return _linear_conv1d(_load_checkpoint(Path(path), arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code,
                                               input_shape=input_shape, input_dtype=input_dtype, task=task,
                                               output_key=output_key, trust_arch=trust_arch))


def _linear_conv1d(loaded: Loaded) -> Loaded:
    """A transformers model's Conv1D layers (GPT-2 and kin) become the nn.Linear they compute, recorded as an
    edit, so every technique that handles Linears handles them and the output replays them."""
    names = decoders.conv1d_layers(loaded.model)
    if names and (loaded.manifest.arch or "").startswith("hf:"):
        decoders.conv1d_to_linear(loaded.model, names)
        loaded.manifest = loaded.manifest.with_edits([Conv1DEdit(modules=names)])
    return loaded


def _load_checkpoint(path: Path, *, arch: str | None, arch_kwargs: dict | None, trust_code: bool,
                     input_shape: list[int] | None, input_dtype: str | None, task: str | None,
                     output_key: str | None, trust_arch: bool) -> Loaded:
    from modelzip_cli import hf

    path = shards.resolve(path)  # `out.safetensors` written as shards: its index
    if hf.is_model_dir(path) and compressed_tensors.is_compressed(hf.read_config(path)):
        loaded = _load_compressed_dir(path, task=task, output_key=output_key, input_shape=input_shape,
                                      input_dtype=input_dtype)
        check_finite(loaded.model, str(path))
        return loaded
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path, input_shape=input_shape, input_dtype=input_dtype)
    if hf.is_model_dir(path):
        loaded = _load_hf_dir(path, task=task, output_key=output_key, input_shape=input_shape, input_dtype=input_dtype)
        check_finite(loaded.model, str(path))  # as for every other input: NaN weights are refused, not quantized
        return loaded
    where = str(path)
    tensors, manifest_text, pickled = read_raw(path, trust_code=trust_code)
    if manifest_text is not None:
        schema = parse_manifest(manifest_text, where)
        manifest = schema.manifest()
        if arch is not None and arch != manifest.arch:
            error = UsageError(f"{path} is a modelzip checkpoint of {manifest.arch}; the architecture passed, {arch}, "
                               "contradicts it", hint="leave arch= out")
            error.cli_hint = "drop --arch"  # runner.load_input says the flag
            raise error
        state = decode_state(tensors, schema.codecs(), schema.constant_values(), where=where)
        trusted = trust_arch or arch == manifest.arch
        if legacy.needs_upgrade({"format_version": schema.format_version, "edits": manifest.edits}):
            manifest, state = _upgrade_first_wave(manifest, state, trusted=trusted, where=where)
        state = OrderedDict(state)
        state._metadata = OrderedDict(schema.versions())  # as torch.save would keep it
        model = rebuild(manifest, state, trusted=trusted, where=where)
        source = "modelzip"
    elif pickled is not None:
        model = pickled
        ref, kwargs = getattr(model, "_modelzip_arch", (arch, arch_kwargs or {}))
        if ref is not None and not ref.startswith("hf:"):
            _check_pickled(model, ref, kwargs, where)
        manifest = Manifest(arch=ref, arch_kwargs=kwargs, input_shape=default_input_shape(ref, kwargs))
        source = "pickled-module"
    else:
        if arch is None:
            error = UsageError(f"{path} is a plain state dict and does not say which architecture it is",
                               hint="pass arch='zoo:NAME' or arch='package.module:callable', with arch_kwargs={...}")
            error.cli_hint = "pass --arch zoo:NAME or --arch package.module:callable, with --arch-kwargs"
            raise error
        manifest = Manifest(arch=arch, arch_kwargs=dict(arch_kwargs or {}),
                            input_shape=default_input_shape(arch, arch_kwargs or {}),
                            input_dtype=default_input_dtype(arch, arch_kwargs or {}))
        model = rebuild(manifest, tensors, trusted=True, where=where, kwargs_label="--arch-kwargs")
        source = "state-dict"
    check_finite(model, where)
    check_quant_params(model, where)
    note = one_float_dtype(model, where)
    if input_shape is not None:
        manifest.input_shape = list(input_shape)
    if input_dtype is not None:
        manifest.input_dtype = input_dtype
    model.eval()
    return Loaded(model=model, manifest=manifest, path=path, source=source, notes=[note] if note else [])


def _load_hf_dir(path: Path, *, task: str | None, output_key: str | None, input_shape: list[int] | None,
                 input_dtype: str | None) -> Loaded:
    """A Hugging Face model directory: built from its config.json by transformers' Auto classes (never
    remote code), its weights loaded strictly; the manifest keeps the whole config."""
    from modelzip_cli import hf

    model, config = hf.load_dir(path, task, output_key)
    shape, dtype = hf.example_shape(config, hf.task_for(config, task))
    kwargs = {"config": config, **({"output_key": output_key} if output_key else {})}
    manifest = Manifest(arch=f"hf:{hf.task_for(config, task)}", arch_kwargs=kwargs,
                        input_shape=list(input_shape or shape), input_dtype=input_dtype or dtype)
    model._modelzip_arch = (manifest.arch, kwargs)
    return Loaded(model=model.eval(), manifest=manifest, path=path, source="hf-directory")


def _load_compressed_dir(path: Path, *, task: str | None, output_key: str | None, input_shape: list[int] | None,
                         input_dtype: str | None) -> Loaded:
    """A compressed-tensors directory (compressed_tensors.load_dir): weight-only where the scheme maps exactly, its
    edits in the manifest so that the model saves and reloads as any modelzip checkpoint."""
    from modelzip_cli import hf

    model, config, edits, notes = compressed_tensors.load_dir(path, task, output_key)
    task = hf.task_for(config, task)
    shape, dtype = hf.example_shape(config, task)
    kwargs = {"config": config, **({"output_key": output_key} if output_key else {})}
    manifest = Manifest(arch=f"hf:{task}", arch_kwargs=kwargs, input_shape=list(input_shape or shape),
                        input_dtype=input_dtype or dtype, edits=edits)
    model._modelzip_arch = (manifest.arch, kwargs)
    return Loaded(model=model, manifest=manifest, path=path, source="compressed-tensors", notes=notes)
def _load_gguf(path: Path, *, input_shape: list[int] | None, input_dtype: str | None) -> Loaded:
    """A .gguf file (checkpoint/gguf.py): dequantized on load into a plain transformers causal LM, said in a note."""
    from modelzip_cli import hf
    from modelzip_cli.checkpoint import gguf as gguf_read

    model, config = gguf_read.load_gguf(path)
    check_finite(model, str(path))
    shape, dtype = hf.example_shape(config, "causal-lm")
    manifest = Manifest(arch="hf:causal-lm", arch_kwargs={"config": config}, input_shape=list(input_shape or shape),
                        input_dtype=input_dtype or dtype)
    model._modelzip_arch = (manifest.arch, manifest.arch_kwargs)
    return Loaded(model=model, manifest=manifest, path=path, source="gguf", notes=[gguf_read.NOTE.format(path=path)])


def load_model(path: str | Path, **kwargs: Any) -> nn.Module:
    """The rebuilt module, in eval mode: for a Hugging Face model, the transformers module itself."""
    from modelzip_cli import hf

    return hf.unwrap(load_checkpoint(path, **kwargs).model)


# ---------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(model: nn.Module, manifest: Manifest, path: str | Path, *,
                    encoded: Encoded | None = None, outputs: Outputs | None = None) -> None:
    """Write `model` with `manifest` as a modelzip checkpoint, atomically. No pickled code, ever.
    `encoded` is the model's state already encoded (the runner encodes once for figures and file);
    `outputs` stages the file with the run's other outputs (renamed together at the end)."""
    path = Path(path)
    if manifest.arch is None:
        raise UsageError("the model's architecture is unknown, so the checkpoint could not be rebuilt",
                         hint="pass --arch REF (and --arch-kwargs) naming the architecture")
    encoded = encoded or encode_module(model)
    text = manifest_json(manifest, encoded.encodings, encoded.constants, encoded.state_versions,
                         layer_table(model, encoded=encoded))
    tensors = encoded.tensors
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata={MANIFEST_KEY: text})
    elif path.suffix in {".pt", ".pth", ".bin"}:
        def write(tmp: Path) -> None:
            torch.save({MANIFEST_KEY: text, TENSORS_KEY: tensors}, tmp)
    else:
        raise OutputError(f"output {path}: unknown suffix {path.suffix!r}", hint="use .safetensors or .pt")
    if outputs is not None:
        outputs.write(path, write)
    else:
        atomic_write(path, write)


def manifest_json(manifest: Manifest, encodings: dict, constants: dict, versions: dict, layers: list[dict]) -> str:
    """The manifest as a checkpoint stores it. The layer table travels in it, so `inspect` needs the header
    only, whatever the file size."""
    full = {**manifest.to_dict(), "encodings": encodings, "constants": constants, "state_versions": versions,
            "layers": layers}
    if not manifest.arch.startswith(("zoo:", "hf:")):  # user code: say what loading it will need
        root = manifest.arch.partition(":")[0].split(".")[0]
        full["arch_trust"] = (f"{manifest.arch} is user code: it is imported only when trusted "
                              f"({TRUST_ENV}={root}, --trust-arch, or load_model(path, trusted_modules=[{root!r}]))")
    return json.dumps(full, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def save_model(model: nn.Module, path: str | Path, *, arch: str | None = None, arch_kwargs: dict | None = None,
               input_shape: list[int] | None = None, edits: list[dict] | None = None) -> None:
    """Write a module built from a known architecture. Zoo modules built by modelzip know their own."""
    ref, kwargs = getattr(model, "_modelzip_arch", (None, {}))
    ref, kwargs = arch or ref, arch_kwargs if arch_kwargs is not None else kwargs
    manifest = Manifest(arch=ref, arch_kwargs=dict(kwargs or {}),
                        input_shape=input_shape or default_input_shape(ref, kwargs or {}), edits=edits or [])
    save_checkpoint(model, manifest, path)
