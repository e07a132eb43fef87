"""modelzip's own C kernels: built from the package's source by the machine's C compiler the first time they
are needed, kept in the cache folder, loaded with ctypes. Nothing else is compiled or loaded: the source is
the file shipped in this package, and the library's name carries the hash of that source and of the flags,
so a changed source or compiler builds anew. Where there is no compiler, the build fails, or the CPU lacks the
instructions, the kernel is unavailable (`why_not` says why) and weight-only layers run on torch's kernels.

- wo4_vnni.c: int4 and int8 weights × int8 activations (rounded per group) on AVX-512 VNNI, OpenMP over output
  rows (`wo4_vnni`, `wo8_vnni`).
  The OpenMP runtime it links by name (libgomp.so.1) is the one torch has loaded already: one thread pool.
- rtn.c: round-to-nearest int4/int8 in one pass over a float32 or bfloat16 weight, the same bits as torch's
  reference (`nn.weight_only.rtn`), and counts of non-zero and non-finite values (a streamed 7B model's figures,
  the checkpoint format's sparse-or-dense choice and the finiteness checks read every weight); plain C whose
  loops gcc also compiles for AVX-512 and AVX2, the CPU's best chosen at load, so it builds wherever gcc runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

VNNI_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")  # what wo4_vnni.c's instructions need (/proc/cpuinfo)
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
RTN_CFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off")  # no fused or reassociated arithmetic
SOURCES = ("wo4_vnni.c",)  # the kernels whose speed the weight-only probe measures


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cache_dir() -> Path:
    from modelzip_cli.kernels.weight_only import cache_path

    return cache_path().parent / "native"


def _build(source: str, flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str]:
    """The library of `source` (a file of this package), built once per source and flags; (None, why) where
    it cannot be."""
    text = resources.files("modelzip_cli.kernels").joinpath(source).read_bytes()
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None, "no C compiler (gcc or cc) to build it"
    key = hashlib.sha256(text + "\0".join(flags).encode() + compiler.encode()).hexdigest()[:16]
    folder = _cache_dir()
    lib = folder / f"{Path(source).stem}-{key}.so"
    if not lib.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = Path(tmp) / source
                src.write_bytes(text)
                built = Path(tmp) / lib.name
                proc = subprocess.run([compiler, *flags, str(src), "-o", str(built)], capture_output=True,
                                      text=True, timeout=COMPILE_TIMEOUT_S)
                if proc.returncode != 0:
                    return None, f"the C compiler failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
                os.replace(built, lib)  # atomic: another process sees no library or the whole one
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"could not build it ({exc})"
    try:
        return ctypes.CDLL(str(lib)), ""
    except OSError as exc:
        return None, f"could not load it ({exc})"


@functools.cache
def sources_key() -> str:
    """A hash of the C sources: a measurement of their kernels holds for this code only."""
    files = resources.files("modelzip_cli.kernels")
    return hashlib.sha256(b"".join(files.joinpath(s).read_bytes() for s in SOURCES)).hexdigest()[:16]


@functools.cache
def _vnni() -> tuple[ctypes.CDLL | None, str]:
    """The library of wo4_vnni.c, or (None, why it is unavailable here)."""
    import torch

    missing = [f for f in VNNI_FLAGS if f not in _cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):  # ATEN_CPU_CAPABILITY limits it too
        return None, f"torch runs {torch.backends.cpu.get_cpu_capability()} code here"
    return _build("wo4_vnni.c", CFLAGS)


def _vnni_function(name: str, pointers: int) -> tuple[object | None, str]:
    """(C function `name` of wo4_vnni.c taking `pointers` pointers then six ints, returning 0 or -1 where it found
    no memory for its scratch, "") or (None, why it is unavailable here)."""
    lib, why = _vnni()
    if lib is None:
        return None, why
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int] * 6
    fn.restype = ctypes.c_int
    return fn, ""


@functools.cache
def wo4_vnni() -> tuple[object | None, str]:
    """(the C function `wo4_vnni`, "") or (None, why it is unavailable here)."""
    return _vnni_function("wo4_vnni", 6)


@functools.cache
def wo8_vnni() -> tuple[object | None, str]:
    """(the C function `wo8_vnni`, "") or (None, why it is unavailable here)."""
    return _vnni_function("wo8_vnni", 7)


@functools.cache
def rtn() -> ctypes.CDLL | None:
    """The library of rtn.c (rtn4, rtn8, count4, nonzero, scan), or None where it cannot be built."""
    lib = _build("rtn.c", RTN_CFLAGS)[0]
    if lib is None:
        return None
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.rtn4.argtypes, lib.rtn4.restype = [p, i, n, n, n, p, p, p, i], n
    lib.rtn8.argtypes, lib.rtn8.restype = [p, i, n, n, n, p, p, i], n
    lib.count4.argtypes, lib.count4.restype = [p, p, n, n, n, i], n
    lib.nonzero.argtypes, lib.nonzero.restype = [p, n, i, i, i], n
    lib.scan.argtypes, lib.scan.restype = [p, n, i, ctypes.c_uint64, ctypes.POINTER(ctypes.c_int64), i], n
    return lib


COUNT_FROM = 1 << 16  # elements from which a count goes to C (below, torch's call costs less than ctypes')


def count_nonzero(t) -> int:
    """`torch.count_nonzero(t)` as an int, in one pass of rtn.c where it can (a contiguous CPU tensor of real
    numbers, 64 K elements or more): a 45 M-element bfloat16 weight in a few ms where torch took 30 ms."""
    import torch

    if t.numel() < COUNT_FROM or not t.is_cpu or not t.is_contiguous() or t.is_complex() or t.dtype == torch.bool \
            or t.element_size() not in (1, 2, 4, 8) or (lib := rtn()) is None:
        return int(torch.count_nonzero(t))
    return int(lib.nonzero(t.data_ptr(), t.numel(), t.element_size(), int(t.is_floating_point()),
                           torch.get_num_threads()))


EXPONENTS = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000, "float64": 0x7FF0000000000000}


def scan(t) -> tuple[int, bool] | None:
    """(`count_nonzero(t)`, whether every value is finite) in one pass of rtn.c over a float tensor (what a
    streamed run asks of each tensor it reads: the finiteness check and the input's stored size), or None where
    it does not apply: a contiguous CPU tensor of float16, bfloat16, float32 or float64, 64 K elements or more
    (45 M bfloat16 values read cold: 11 ms on one thread, where torch's count_nonzero took 68 and its aminmax 20)."""
    import torch

    exponent = EXPONENTS.get(str(t.dtype).removeprefix("torch."))
    if exponent is None or t.numel() < COUNT_FROM or not t.is_cpu or not t.is_contiguous() or (lib := rtn()) is None:
        return None
    special = ctypes.c_int64(0)
    nonzero = lib.scan(t.data_ptr(), t.numel(), t.element_size(), exponent, ctypes.byref(special),
                       torch.get_num_threads())
    return int(nonzero), special.value == 0


def all_finite(t) -> bool | None:
    """Whether every value of a float tensor is finite, by `scan`; None where it does not apply."""
    scanned = scan(t)
    return None if scanned is None else scanned[1]
