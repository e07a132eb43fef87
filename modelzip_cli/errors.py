"""Domain exceptions and the one table that turns them into exit codes.

Code deep in the library raises these; only `cli.run` catches them. Every message is one line that
says what is wrong and what to do (the hint). Exit codes are documented in README.md.
"""

from __future__ import annotations

import errno
import re

INTERNAL_ERROR = 3  # anything that is not a ModelzipError is a bug
CORRUPT = "the file is corrupt or was not written by modelzip"  # the hint of every forged-file error


class ModelzipError(Exception):
    """Base class: a message plus an optional hint."""

    exit_code = INTERNAL_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        return f"{self.message}" + (f" ({self.hint})" if self.hint else "")

    def __str__(self) -> str:
        return self.line()


class UsageError(ModelzipError):
    """Bad options or a bad combination of them. Nothing is written."""

    exit_code = 2


class InputError(UsageError):
    """A file that cannot be read, or that does not fit (model, data, recipe). Nothing is written."""


class UntrustedCodeError(UsageError):
    """Loading would run code the user has not said they trust."""


class OutputError(UsageError):
    """The output cannot be written where asked (exists, equals the input, unwritable)."""


class QualityGateFailed(ModelzipError):
    """The output was written, but a quality gate (--max-accuracy-drop) failed."""

    exit_code = 1


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: the run stops, its temporaries are removed, exit 128 + the signal number
    (130 / 143). A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


class CodeRanWarning(UserWarning):
    """--trust-code unpickled a file, which ran its code. The CLI prints it whatever --quiet says."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message cut to one line (its type's name when it has no message)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


# Conditions of the machine, not bugs: exit 2 with one line (a failed run has written nothing).
OS_CONDITIONS = {
    errno.ENOSPC: ("no space left on device", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter name or path"),
    errno.EACCES: ("permission denied", "choose a file and folder you may read or write"),
    errno.EPERM: ("operation not permitted", "choose a file and folder you may read or write"),
    errno.EROFS: ("read-only file system", "write elsewhere"),
}


def _errno_of(exc: BaseException) -> int | None:
    """The errno of an OSError, or the one a library's message carries (safetensors says "os error 28")."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in OS_CONDITIONS:
            return e.errno
        found = re.search(r"(?:os error|errno) (\d+)", str(e or ""), re.IGNORECASE)
        if e is not None and found and int(found.group(1)) in OS_CONDITIONS:
            return int(found.group(1))
    return None


def os_condition(exc: BaseException) -> UsageError | None:
    """A full disk, a name too long, a permission or a read-only file system as one usage line; else None."""
    code = _errno_of(exc)
    if code is None:
        return None
    what, hint = OS_CONDITIONS[code]
    where = next((e.filename for e in (exc, exc.__cause__, exc.__context__)
                  if isinstance(e, OSError) and e.filename), None)
    return UsageError(f"{what}{f': {where}' if where else ''}; nothing was written", hint=hint)


def exit_code_for(exc: BaseException) -> int:
    """The one mapping from exception to exit code: 1 gate, 2 usage/input (and conditions of the machine:
    a full disk, …), 3 a bug."""
    if isinstance(exc, ModelzipError | Interrupted):
        return exc.exit_code
    condition = os_condition(exc)
    return condition.exit_code if condition is not None else INTERNAL_ERROR
