"""Files on disk: readable-input checks, output checks made before any work, and atomic writes.

Every file modelzip writes (checkpoint, report, intermediates, plot) is written to a temporary file in
its folder, flushed and fsynced, then renamed over the target. A run stages all its files (`Outputs`)
and renames them only once everything succeeded: a run that fails or is interrupted leaves nothing,
and a temporary left by a killed run is removed by the next write to the same target.
"""

from __future__ import annotations

import contextlib
import glob
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


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: symlinks resolved, hard links too when both exist."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(output: Path, *, inputs: list[Path], force: bool, suffixes: tuple[str, ...],
                 role: str = "output", folder_may_be_made: bool = False) -> None:
    """Refuse an output that would clobber an input of the run or an existing file, or that cannot be
    written. `folder_may_be_made`: the run creates the folder (--keep-intermediate).

    Called before any work so that a bad output path costs nothing and writes nothing.
    """
    for inp in inputs:
        if same_file(output, inp):
            raise OutputError(f"{role} {output} is an input of this run ({inp}); modelzip never modifies its inputs",
                              hint="write it somewhere else")
    if output.suffix not in suffixes:
        raise OutputError(f"{role} {output}: unknown suffix {output.suffix!r}", hint="use " + " or ".join(suffixes))
    if output.is_dir():
        raise OutputError(f"{role} {output} is a directory", hint="pass a file path")
    if output.exists() and not force:
        raise OutputError(f"{role} {output} already exists", hint="pass --force to overwrite it")
    folder = output.resolve().parent
    if folder_may_be_made and not folder.exists():
        return
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


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: beside it, named after this process."""
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of `path` left by runs that were killed (their process no longer exists)."""
    prefix = f".{path.name}."
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix):-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


class Outputs:
    """The files one run writes, staged: each is written to its temporary as the run goes (`write`) and
    all are renamed into place at the end (`commit`). Leaving the `with` block by an exception (an error,
    an interrupt) removes the temporaries and any folder the run made: a failed run writes nothing."""

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # target → its temporary
        self._made: list[Path] = []  # folders this run created, outermost first

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    def folder(self, path: Path) -> None:
        """Create `path` (and missing parents), remembering what was made so that `discard` removes it."""
        missing = [p for p in [path, *path.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            self._made.append(p)

    def write(self, path: Path, write: Callable[[Path], None]) -> Path:
        """write(tmp) into the temporary of `path` and fsync it; returns the temporary (to measure it)."""
        path = Path(path)
        remove_stale_temporaries(path)
        tmp = temporary_path(path)
        self._staged[path] = tmp  # before writing: a write that fails half-way is discarded too
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        return tmp

    def staged(self, path: Path) -> Path:
        return self._staged[Path(path)]

    def commit(self) -> None:
        """Rename every staged file over its target, then fsync the folders."""
        umask = os.umask(0)
        os.umask(umask)
        for path, tmp in self._staged.items():
            os.chmod(tmp, 0o666 & ~umask)  # as an ordinary file would be, whatever the writer chose
            os.replace(tmp, path)
        for folder in {path.parent for path in self._staged}:
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._staged.clear()
        self._made.clear()

    def discard(self) -> None:
        for tmp in self._staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged.clear()
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._made.clear()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside `path`, fsync it, then rename over `path`."""
    with Outputs() as outputs:
        outputs.write(path, write)
        outputs.commit()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
