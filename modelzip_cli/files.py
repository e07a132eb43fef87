"""Files on disk: readable-input checks, output checks made before any work, and atomic writes.

The output-path policy, one for every command: each file a run writes (checkpoint, report, plot, plan,
intermediate, export, data file) is a `Target`, and `check_targets` checks them all before any work:
never an input of the run nor a file inside an input folder (a Hugging Face directory), never two
targets on one file, an existing file only with --force, a name the file system takes, a folder that
exists and is writable. A path that a file names (a recipe's export `output`) is `confined` to the
folder the user chose for the run's output: a file never chooses where modelzip writes.

Every file is written inside a staging folder beside its target (`.NAME.PID.tmp/NAME`), flushed and
fsynced, then renamed over the target. Writers that make their own temporaries (safetensors does, beside
the file it writes) make them inside that folder too. A run stages all its files (`Outputs`) and renames
them only once everything succeeded: a run that fails or is interrupted leaves nothing, and a staging
folder left by a killed run is removed by the next write to the same target.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelzip_cli.errors import InputError, ModelzipError, OutputError

NAME_MAX = 255  # bytes in one file name on every file system modelzip writes to (ext4, xfs, btrfs, tmpfs, APFS)


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


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it, symlinks resolved (a file in an input model directory)."""
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


@dataclass(frozen=True)
class Target:
    """One file a run writes: its role (in messages), its path, and the suffixes it may have.
    `folder_may_be_made`: the run creates the folder (--keep-intermediate)."""

    role: str
    path: Path
    suffixes: tuple[str, ...]
    folder_may_be_made: bool = False


def check_targets(targets: list[Target], *, inputs: list[Path | None], force: bool) -> None:
    """The output-path policy (module docstring): every file the run writes, checked against every input
    and against each other, before any work, so that a bad path costs nothing and writes nothing."""
    check_distinct({t.role: t.path for t in targets})
    for t in targets:
        check_output(t.path, inputs=[p for p in inputs if p is not None], force=force, suffixes=t.suffixes,
                     role=t.role, folder_may_be_made=t.folder_may_be_made)


def confined(name: str, folder: Path, what: str) -> Path:
    """`name`, a relative path that a file (a recipe) gives for an output, placed in `folder`, the folder
    of the output the user named; a path that leaves it (absolute, `..`, a symlink out) is refused."""
    relative = Path(name)
    path = folder / relative
    escapes = "\0" in name or not name.strip() or relative.is_absolute() or ".." in relative.parts
    if escapes or not path.resolve().is_relative_to(folder.resolve()):
        raise OutputError(f"{what} {name!r} is outside the run's output folder {folder}; a file never chooses "
                          "where modelzip writes", hint="give a plain file name, or pass the path on the command line")
    return path


def check_output(output: Path, *, inputs: list[Path], force: bool, suffixes: tuple[str, ...],
                 role: str = "output", folder_may_be_made: bool = False) -> None:
    """Refuse an output that would clobber an input of the run (or a file inside an input folder) or an
    existing file, or that cannot be written. `folder_may_be_made`: the run creates the folder.

    Called before any work so that a bad output path costs nothing and writes nothing.
    """
    for inp in inputs:
        if same_file(output, inp):
            raise OutputError(f"{role} {output} is an input of this run ({inp}); modelzip never modifies its inputs",
                              hint="write it somewhere else")
        if inside(output, inp):
            raise OutputError(f"{role} {output} is inside the input folder {inp}; modelzip never modifies its "
                              "inputs", hint="write it outside that folder")
    if len(os.fsencode(output.name)) > NAME_MAX:
        raise OutputError(f"{role} name is {len(os.fsencode(output.name))} bytes long, more than the "
                          f"{NAME_MAX} a file system takes: {output.name[:40]}…", hint="use a shorter name")
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


def _stage_prefix(path: Path) -> str:
    """`.NAME.`, or for a long name a shortened one with a hash: the staging folder's name always fits."""
    name = path.name
    if len(os.fsencode(name)) > 200:  # 40 characters are at most 160 bytes
        name = f"{name[:40]}~{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]}"
    return f".{name}."


def staging_folder(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: a folder beside it, named after this
    process, that holds the file under its own name (and any temporary its writer makes)."""
    return path.parent / f"{_stage_prefix(path)}{os.getpid()}.tmp"


def temporary_path(path: Path) -> Path:
    return staging_folder(path) / path.name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_stale_temporaries(path: Path) -> None:
    """Remove staging folders (and temporary files, as older versions wrote them) of `path` left by runs
    that were killed (their process no longer exists)."""
    prefix = _stage_prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix):-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(tmp)


def _disk_full(folder: Path) -> bool:
    """Whether `folder`'s file system is (nearly) out of space: a writer that failed there (torch.save says
    only "unexpected pos") most likely ran out of it."""
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


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
        if tmp.parent.exists() or tmp.parent.is_symlink():  # left by a dead process of this pid, or planted (a link)
            _remove(tmp.parent)
        tmp.parent.mkdir()
        try:
            write(tmp)
            for item in files_of(tmp):
                with open(item, "rb+") as f:
                    os.fsync(f.fileno())
        except Exception as exc:
            if not isinstance(exc, OSError | ModelzipError) and _disk_full(path.parent):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
            raise
        return tmp

    def write_folder(self, path: Path, write: Callable[[Path], None]) -> Path:
        """write(tmp) into the temporary folder of the directory `path`, fsync its files; returns the folder."""
        tmp = self.write(path, lambda t: (t.mkdir(), write(t)))
        return tmp

    def staged(self, path: Path) -> Path:
        return self._staged[Path(path)]

    def commit(self) -> None:
        """Rename every staged file over its target, then fsync the folders."""
        umask = os.umask(0)
        os.umask(umask)
        for path, tmp in self._staged.items():
            os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~umask)  # as an ordinary file would be
            if tmp.is_dir() and path.is_dir() and not path.is_symlink():  # --force over an earlier directory
                os.replace(path, tmp.parent / ".replaced")
            os.replace(tmp, path)
            _remove(tmp.parent)
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
            _remove(tmp.parent)
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
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
