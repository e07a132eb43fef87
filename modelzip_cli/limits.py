"""Bounds on what an input file may make modelzip read, parse or allocate (docs/FORMAT.md, "Reading an untrusted
file"): regular files only (a FIFO or a device would hang or never end), size caps on text, decompressed sizes of
archives checked before they are inflated, recursion-safe parsing, and one memory limit that sizes declared by
a file (an architecture, a tensor, a conversion) are checked against before anything is allocated.

The memory limit is MODELZIP_MAX_MEMORY (`8G`, `512M`, bytes) when set, else the room left under the process's
address-space limit (RLIMIT_AS) and the memory the machine has available (MemAvailable), whichever is smaller.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelzip_cli.errors import InputError, UsageError

MEMORY_ENV = "MODELZIP_MAX_MEMORY"
MAX_DEPTH = 64  # lists and tables in a config, recipe or manifest: real ones nest a handful deep
TEXT_CAP = 16 << 20  # a config, recipe, plan or tokenizer config: far larger than any real one (1 MB is a lot)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str = MEMORY_ENV) -> int:
    """`8G`, `512M`, `1.5G`, `1000000` → bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise UsageError(f"{what}={text!r} is not a size", hint="e.g. 8G, 512M or a number of bytes") from None
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{what}={text!r} must be a positive size", hint="e.g. 8G")
    return int(value)


def _address_space_left() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def _physical() -> int | None:
    """The memory the machine has available now (MemAvailable), else its physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def memory_limit() -> int:
    """Bytes a run may allocate for what one file declares (module docstring)."""
    if os.environ.get(MEMORY_ENV):
        return parse_size(os.environ[MEMORY_ENV])
    known = [b for b in (_address_space_left(), _physical()) if b is not None]
    return min(known) if known else 1 << 40


def gb(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GB" if nbytes >= 1 << 28 else f"{nbytes / (1 << 20):.1f} MB"


def check_memory(nbytes: float, what: str, hint: str = "check the file") -> None:
    """Refuse, before allocating, `what` of about `nbytes` that does not fit the memory limit."""
    limit = memory_limit()
    if nbytes > limit:
        raise InputError(f"{what} needs about {gb(nbytes)}, more than the {gb(limit)} memory limit; nothing was "
                         "allocated", hint=f"{hint}, or raise {MEMORY_ENV}")


def check_regular(path: Path, what: str) -> None:
    """`path` (symlinks followed) is a regular file: never a FIFO, a device (`/dev/zero`) or a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file", hint="check the path") from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a directory, not a file", hint="pass a file")
    if not stat.S_ISREG(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "socket"
        raise InputError(f"{what} {path} is a {kind}, not a regular file", hint="pass a regular file")


def read_bytes(path: Path, what: str, cap: int = TEXT_CAP) -> bytes:
    """A regular file's bytes, at most `cap` of them (a larger file is an error, found without reading it all)."""
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in meanwhile cannot block
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError(f"{what} {path} is not a regular file", hint="pass a regular file")
            data = f.read(cap + 1)
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror})") from None
    if len(data) > cap:
        raise InputError(f"{what} {path} is larger than {gb(cap)}, more than such a file ever holds",
                         hint="check the path")
    return data


def read_text(path: Path, what: str, cap: int = TEXT_CAP) -> str:
    try:
        return read_bytes(path, what, cap).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None


def parse(loader: Callable[[Any], Any], text: str | bytes, what: str, hint: str = "check the file") -> Any:
    """`loader(text)` (json.loads, tomllib.loads) as a value nested at most MAX_DEPTH deep: nesting too deep for
    the parser, or for the code that later copies or walks the value (recursively), is one line."""
    try:
        value = loader(text)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply to read", hint=hint) from None
    if depth(value) > MAX_DEPTH:
        raise InputError(f"{what} is nested more than {MAX_DEPTH} levels deep", hint=hint)
    return value


def depth(value: Any) -> int:
    """How deeply lists and dicts nest in `value`, found without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((child, d + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def check_archive(path: Path, what: str) -> None:
    """A zip archive (torch's `.pt`, numpy's `.npz`) whose members inflate to more than the memory limit, or to
    more than 1000 times their stored size (a zip bomb), is refused before any member is read."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # the reader says what is wrong with it
    inflated = sum(m.file_size for m in members)
    stored = sum(m.compress_size for m in members)
    if inflated > 1000 * stored + (64 << 20):
        raise InputError(f"{what} {path} inflates {gb(stored)} to {gb(inflated)}: a zip bomb, not a real file",
                         hint="check where the file came from")
    check_memory(inflated, f"{what} {path}")
