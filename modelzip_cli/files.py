"""Files on disk: readable-input checks, output checks made before any work, and atomic writes.

Every file modelzip writes (checkpoint, report, plot) goes through `atomic_write`: a temporary file in
the output's folder, flushed and fsynced, then renamed over the target.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from modelzip_cli.errors import InputError, OutputError


def check_readable(path: Path, suffixes: tuple[str, ...], what: str = "checkpoint") -> None:
    """An existing regular file with one of `suffixes`, or one line saying what is wrong."""
    if not path.exists():
        raise InputError(f"{path}: no such file", hint="check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a {what} file", hint="pass a file")
    if path.suffix not in suffixes:
        raise InputError(f"{path}: unknown {what} suffix {path.suffix!r}", hint="use " + ", ".join(suffixes))


def files_of(path: Path) -> list[Path]:
    """A file, or every file in a model directory, in a stable order."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def disk_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file in a model directory."""
    return sum(p.stat().st_size for p in files_of(path))


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


def check_distinct(paths: dict[str, Path]) -> None:
    """Two outputs of one run (checkpoint, report, plot) must not be the same file."""
    seen: dict[Path, str] = {}
    for role, path in paths.items():
        key = path.resolve()
        if key in seen:
            raise OutputError(f"the {role} {path} is the same file as the {seen[key]}",
                              hint=f"give the {role} its own path")
        seen[key] = role


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
