"""Kernels for weight-only layers (W4A16, W8A16), chosen per layer shape by measurement on this machine.

The file format does not change: int8 weights, or int4 packed two per byte (low nibble first), per-group
float32 scales and int8 zero points, the weight padded to whole groups. A kernel packs those tensors into
its own layout the first time a layer runs (kept in memory, never stored) and computes the layer:

- int4pack: torch's packed int4 CPU kernel (`torch._weight_int4pack_mm_for_cpu`), bf16 activations. Its
  dequantization is (q − 8)·s + z, so z = (8 − zero point)·s. It takes groups of 32, 64, 128 or 256
  (a wider group is written as several of these with the same scale) and widths N divisible by 16.
- int8pack: torch's int8 weight kernel (`torch._weight_int8pack_mm`), bf16 activations. It takes one scale
  per output channel, so a grouped weight runs as one call per group, summed; groups of a multiple of 16.
- bf16: a dequantized bf16 copy of the weight (2 bytes per weight in memory), bf16 activations: where the
  CPU multiplies bf16 natively (AMX, AVX512-BF16) this beats fp32 once the product is compute-bound.
- float: a dequantized copy in the input's dtype (4 bytes per weight for fp32), the float layer's own
  speed: the fallback, never slower than float.

The choice: a call's row count falls in a size class (ROW_CLASSES); for each (bits, shape, group, class,
dtype) every kernel that can run the layer is timed on the layer's own weights (`_probe`), and the
fastest is kept if it beat float by MARGIN: for the process (`CHOICES`) and in a file of measurements keyed
by the machine (CPU model and flags, torch version, core count), `$MODELZIP_CACHE_DIR/wo_kernels.json`
(default ~/.cache/modelzip), so that every process on one machine runs a layer on the same kernel and gives
the same output bits. Delete the file to measure again; where it cannot be written, each process measures.

The probe runs on one thread: on a machine whose cores other processes keep busy, two-thread timings
are dominated by threads waiting for each other. The cost: such contention at run time hurts most the
kernel that makes the most calls (int8pack, one per group: 0.05× fp32 measured on this shared 2-core
machine while other jobs ran, 1.4× on one thread), which the probe does not see.

`MODELZIP_WO_KERNEL=<name>` forces a kernel for a process (a layer it cannot run falls back to float, with
a note); `available()` answers whether this torch has a kernel that runs here. The bf16 kernels agree with
the dequantize-and-matmul reference within bf16 rounding of the activations (relative error about 3e-3;
tests allow 1e-2); float is exact.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from modelzip_cli.kernels import choice

KERNEL_ENV = "MODELZIP_WO_KERNEL"
KERNELS = ("int4pack", "int8pack", "bf16", "float")
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 CPU kernel takes
# (largest row count of the class, rows the probe times it at): decoding one token, a few rows, a batch
ROW_CLASSES = ((2, 1), (32, 16), (None, 128))
PROBE_ROUNDS = 5  # interleaved rounds; the fastest time of each kernel counts (noise only adds time)
PROBE_BYTES, PROBE_COPIES = 64 << 20, 64  # the weight copies a few-row probe cycles through (see _copies)
# A kernel replaces float only when it measured this many times faster: a near tie under a busy machine's
# noise must not pick a kernel that is slower in fact, nor flip the choice (and its rounding) between runs.
MARGIN = 1.25
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # inputs the bf16 kernels may round


@dataclass(frozen=True)
class Geometry:
    """What a kernel needs to know of a layer: (bits, in, out, stored group size, groups)."""

    bits: int
    in_features: int
    out_features: int
    group_size: int
    groups: int

    @property
    def padded(self) -> int:
        return self.groups * self.group_size


@dataclass
class Stored:
    """A weight-only layer's stored tensors: qweight (N, cols), scales and zero points (N, groups)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    dequantize: Callable[[], torch.Tensor]  # → the float32 weight (N, in)


@dataclass(frozen=True)
class Kernel:
    name: str
    unsupported: Callable[[Geometry], str | None]  # why it cannot run this layer, or None
    pack: Callable[[Geometry, Stored], tuple]
    # (geometry, packed, x (M, in), bias (out,) or None) → (M, out) in x's dtype
    run: Callable[[Geometry, tuple, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _int4_group(geo: Geometry) -> int | None:
    """The kernel's group size that tiles the stored group (same scale repeated), or None; one that also
    divides the layer's width where there is one (a 576-wide layer in groups of 128 runs as 9 groups of 64,
    with no padding to copy into each input)."""
    fits = [g for g in INT4_GROUPS if geo.group_size % g == 0]
    return next((g for g in fits if geo.in_features % g == 0), fits[0] if fits else None)


def _int4_width(geo: Geometry, g: int) -> int:
    """The width K the kernel multiplies: the layer's own where groups of g tile it, else the padded one."""
    return geo.in_features if geo.in_features % g == 0 else geo.padded


def _padded_input(geo: Geometry, x: torch.Tensor) -> torch.Tensor:
    """(M, in) → (M, padded), contiguous: zeros against the stored weight's pad columns (exact)."""
    return F.pad(x, (0, geo.padded - geo.in_features)) if geo.padded != geo.in_features else x.contiguous()


def _unpacked_int4(geo: Geometry, qweight: torch.Tensor) -> torch.Tensor:
    """(N, cols) packed bytes → (N, padded) integers 0..15, low nibble first."""
    ints = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)
    return ints[:, : geo.padded]


def _int4_unsupported(geo: Geometry) -> str | None:
    if geo.bits != 4:
        return "int4 only"
    if _int4_group(geo) is None:
        return f"group {geo.group_size} is not a multiple of 32 (the int4 kernel takes groups of 32 to 256)"
    if geo.out_features % 16:
        return f"width {geo.out_features} is not a multiple of 16 (the int4 kernel's tile)"
    return None


def _int4_pack(geo: Geometry, w: Stored) -> tuple:
    g = _int4_group(geo)
    width = _int4_width(geo, g)
    ints = _unpacked_int4(geo, w.qweight)[:, :width].to(torch.int32)  # (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints.contiguous(), 1)
    repeat = geo.group_size // g
    s = w.scales.float().repeat_interleave(repeat, dim=1)[:, : width // g]  # (N, K / g)
    zp = w.zero_points.float().repeat_interleave(repeat, dim=1)[:, : width // g]
    # the kernel computes (q − 8)·s + z; modelzip's (q − zp)·s is that with z = (8 − zp)·s
    scales_and_zeros = torch.stack([s, (8 - zp) * s], dim=-1).transpose(0, 1)  # (K / g, N, 2)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous(), g, width


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's (M, out) result in x's dtype, plus the bias (added in that dtype, to a new tensor)."""
    y = y.to(x.dtype)
    return y if bias is None else y.add_(bias if bias.dtype == y.dtype else bias.to(y.dtype))


def _int4_run(geo: Geometry, packed: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    weight, scales_and_zeros, g, width = packed
    xk = F.pad(x, (0, width - geo.in_features)) if width != geo.in_features else x.contiguous()  # (M, K)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk.to(torch.bfloat16), weight, g, scales_and_zeros)
    return _finish(y, x, bias)


def _int8_unsupported(geo: Geometry) -> str | None:
    if geo.bits != 8:
        return "int8 only"
    if geo.group_size % 16:  # torch 2.13's kernel crashes on rows whose width is not a multiple of 16
        return f"group {geo.group_size} is not a multiple of 16 (the int8 kernel's block)"
    return None


def _int8_pack(geo: Geometry, w: Stored) -> tuple:
    q = w.qweight.reshape(geo.out_features, geo.groups, geo.group_size)  # (N, groups, G)
    # a fresh copy: a tensor read from a file may start at any byte, and the kernel's loads need alignment
    # (a weight loaded from safetensors crashed it where the same weight built in memory ran)
    q = q.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # (groups, N, G)
    return q, w.scales.t().to(torch.bfloat16).contiguous()  # (groups, N)


def _int8_run(geo: Geometry, packed: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    q, scales = packed
    rows = x.shape[0]
    xg = _padded_input(geo, x).to(torch.bfloat16).reshape(rows, geo.groups, geo.group_size)  # (M, groups, G)
    xg = xg.transpose(0, 1).contiguous()  # (groups, M, G)
    y = torch.ops.aten._weight_int8pack_mm(xg[0], q[0], scales[0]).float()
    for i in range(1, geo.groups):
        y += torch.ops.aten._weight_int8pack_mm(xg[i], q[i], scales[i])
    return _finish(y, x, bias)


def _bf16_run(geo: Geometry, packed: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _finish(F.linear(x.to(torch.bfloat16), packed[0]), x, bias)


def _float_run(geo: Geometry, packed: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, packed[0].to(x.dtype), bias)  # what the layer computed before it had kernels, bit for bit


KERNEL_TABLE = {k.name: k for k in (
    Kernel("int4pack", _int4_unsupported, _int4_pack, _int4_run),
    Kernel("int8pack", _int8_unsupported, _int8_pack, _int8_run),
    Kernel("bf16", lambda geo: None, lambda geo, w: (w.dequantize().to(torch.bfloat16),), _bf16_run),
    Kernel("float", lambda geo: None, lambda geo, w: (w.dequantize(),), _float_run),
)}


@functools.cache
def available(name: str) -> bool:
    """Whether torch has kernel `name` and it runs on this machine (a tiny call, once per process)."""
    geo = Geometry(4 if name == "int4pack" else 8, 64, 16, 32, 2)
    cols = 32 if geo.bits == 4 else 64
    w = Stored(torch.zeros(16, cols, dtype=torch.uint8 if geo.bits == 4 else torch.int8), torch.ones(16, 2),
               torch.zeros(16, 2, dtype=torch.int8), lambda: torch.zeros(16, 64))
    kernel = KERNEL_TABLE[name]
    try:
        with torch.no_grad():
            y = kernel.run(geo, kernel.pack(geo, w), torch.ones(1, 64), None)
    except Exception:  # a torch without the op, or a build/CPU it does not run on
        return False
    return tuple(y.shape) == (1, 16) and bool(torch.isfinite(y).all())


def use_kernel(name: str) -> contextlib.AbstractContextManager:
    """Run weight-only layers on kernel `name` inside the block (e.g. "float": the reference numerics an
    exported graph reproduces), whatever they chose."""
    if name not in KERNELS:
        raise ValueError(f"unknown weight-only kernel {name!r}")
    return choice.use(weight_only=name)


def forced() -> str | None:
    """The kernel a use_kernel() block or MODELZIP_WO_KERNEL forces, or None (auto). An unknown name in the
    environment is ignored as auto."""
    if scoped := choice.current().weight_only:
        return scoped
    name = os.environ.get(KERNEL_ENV, "auto")
    return name if name in KERNELS else None


def row_class(rows: int) -> int:
    """The index in ROW_CLASSES of a call on `rows` rows."""
    for i, (top, _) in enumerate(ROW_CLASSES):
        if top is None or rows <= top:
            return i
    raise AssertionError("the last row class takes every size")


def candidates(geo: Geometry, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """The kernels that can run this layer on inputs of `dtype`, and why each other one cannot."""
    ok, why = [], {}
    for name, kernel in KERNEL_TABLE.items():
        reason = kernel.unsupported(geo)
        if reason is None and name != "float" and dtype not in FAST_DTYPES:
            reason = f"{dtype} inputs stay in their own precision"
        if reason is None and not available(name):
            reason = "not available in this torch or on this CPU"
        if reason is None:
            ok.append(name)
        else:
            why[name] = reason
    return ok, why


CACHE_ENV = "MODELZIP_CACHE_DIR"


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelzip"
    return Path(root) / "wo_kernels.json"


@functools.cache
def machine_key() -> str:
    """What a measurement holds for: the CPU (model and flags), torch's version and the core count."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    cpu = [ln for ln in info if ln.startswith(("model name", "flags"))][:2]
    text = "|".join([*cpu, torch.__version__, str(os.cpu_count())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(key: str, name: str) -> None:
    """Add one measured choice to the machine's file (best effort: a read-only home only costs re-measuring)."""
    data = _read_cache()
    mine = data.get(machine_key())
    data[machine_key()] = {**(mine if isinstance(mine, dict) else {}), key: name}
    path = cache_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except OSError:
        tmp.unlink(missing_ok=True)


def _remembered(key: str) -> str | None:
    mine = _read_cache().get(machine_key())
    name = mine.get(key) if isinstance(mine, dict) else None
    return name if name in KERNEL_TABLE else None


# (geometry, row class, dtype) → the kernel measured fastest on this machine, in this process
CHOICES: dict[tuple, str] = {}


def _copies(packed: tuple, rows: int) -> list[tuple]:
    """Copies of a packed weight to cycle through while timing: in a model, a layer's weights come from
    memory, not from a cache warmed by the call before (a 576×576 fp32 GEMV measured 23 µs cache-hot and
    164 µs cycling through 60 copies; int4pack 28 and 24). Few rows only: many rows are bound by arithmetic."""
    size = sum(t.numel() * t.element_size() for t in packed if isinstance(t, torch.Tensor))
    count = 1 if rows >= ROW_CLASSES[-1][1] else max(1, min(PROBE_COPIES, PROBE_BYTES // max(size, 1)))
    return [packed] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in packed)
                       for _ in range(count - 1)]


def _probe(geo: Geometry, packs: dict[str, tuple], rows: int, dtype: torch.dtype) -> str:
    """The fastest of `packs` on `rows` random rows, if it beats float by MARGIN; else float. One thread
    (where a busy machine's noise is smallest: two threads wait for each other whenever either is
    descheduled), interleaved rounds, the fastest round of each, each round a pass over copies."""
    x = torch.randn(rows, geo.in_features).to(dtype)
    best = {name: float("inf") for name in packs}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            copies = {name: _copies(packed, rows) for name, packed in packs.items()}
            for name, packed in packs.items():  # warm-up: first calls allocate
                KERNEL_TABLE[name].run(geo, packed, x, None)
            for _ in range(PROBE_ROUNDS):
                for name, each in copies.items():
                    run = KERNEL_TABLE[name].run
                    t0 = time.perf_counter()
                    for packed in each:
                        run(geo, packed, x, None)
                    best[name] = min(best[name], (time.perf_counter() - t0) / len(each))
    finally:
        torch.set_num_threads(old_threads)
    fastest = min(best, key=best.get)
    return fastest if best[fastest] * MARGIN < best.get("float", float("inf")) else "float"


class LayerKernels:
    """One weight-only layer's kernels: which runs each row class, and the packed tensors, built at first
    use from the stored tensors and kept while those are the same tensors (a load or .to() clears it)."""

    def __init__(self):
        self._stored: Stored | None = None
        self.packed: dict[str, tuple[Stored, tuple]] = {}  # kernel → (the stored tensors it was packed from, packed)
        self.chosen: dict[tuple, str] = {}  # (row class, dtype, forced kernel or None) → kernel
        self.notes: dict[str, str] = {}  # kernel forced but unusable → why

    def stored(self, qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
               dequantize: Callable[[], torch.Tensor]) -> Stored:
        """The layer's stored tensors, as one object kept while they are the same tensors (packs follow it)."""
        w = self._stored
        if w is None or w.qweight is not qweight or w.scales is not scales or w.zero_points is not zero_points:
            w = self._stored = Stored(qweight, scales, zero_points, dequantize)
        return w

    def _pack(self, name: str, geo: Geometry, w: Stored) -> tuple:
        hit = self.packed.get(name)
        if hit is None or hit[0] is not w:
            with torch.inference_mode(False), torch.no_grad():
                hit = self.packed[name] = (w, KERNEL_TABLE[name].pack(geo, w))
        return hit[1]

    def choose(self, geo: Geometry, w: Stored, rows: int, dtype: torch.dtype) -> str:
        """The kernel for a call on `rows` rows of `dtype`: forced, else cached, else measured now."""
        cls, want = row_class(rows), forced()
        hit = self.chosen.get((cls, dtype, want))
        if hit is not None:
            return hit
        ok, why = candidates(geo, dtype)
        if want is not None:
            name = want if want in ok else "float"
            if want not in ok:
                self.notes[want] = why[want]
        else:
            key = (geo, cls, dtype)
            text = "/".join(map(str, (*astuple(geo), cls, str(dtype).removeprefix("torch."))))
            name = CHOICES.get(key) or _remembered(text)
            if name is None or name not in ok:
                packs = {n: self._pack(n, geo, w) for n in ok}
                name = _probe(geo, packs, ROW_CLASSES[cls][1], dtype)
                _remember(text, name)
                for loser in set(packs) - {name} - set(self.chosen.values()):
                    self.packed.pop(loser, None)  # keep only what runs
            CHOICES[key] = name
        self.chosen[(cls, dtype, want)] = name
        return name

    def run(self, geo: Geometry, w: Stored, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(M, in) → (M, out) in x's dtype, bias added."""
        name = self.choose(geo, w, x.shape[0], x.dtype)
        return KERNEL_TABLE[name].run(geo, self._pack(name, geo, w), x, bias)

    def __deepcopy__(self, memo) -> LayerKernels:
        return LayerKernels()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
