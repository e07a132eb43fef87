"""The Typer app: the commands (one file each in cli/commands/), and the one place where an outcome becomes
an exit code and one line on stderr.

Nothing heavy is imported at module level: `modelzip --help` must not import torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from modelzip_cli.cli.commands.analyze import analyze
from modelzip_cli.cli.commands.chain import chain
from modelzip_cli.cli.commands.compare import compare
from modelzip_cli.cli.commands.data import data_app
from modelzip_cli.cli.commands.distill import distill
from modelzip_cli.cli.commands.eval import eval_
from modelzip_cli.cli.commands.export import export
from modelzip_cli.cli.commands.inspect import inspect_
from modelzip_cli.cli.commands.lowrank import lowrank
from modelzip_cli.cli.commands.prune import prune
from modelzip_cli.cli.commands.quantize import quantize
from modelzip_cli.cli.options import HELP_OPTIONS, MethodHelp
from modelzip_cli.errors import (
    INTERNAL_ERROR,
    CodeRanWarning,
    Interrupted,
    ModelzipError,
    QualityGateFailed,
    exit_code_for,
    os_condition,
)
from modelzip_cli.version import __version__

# add_completion: --install-completion / --show-completion (bash, zsh, fish, PowerShell) on the root command
app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings=HELP_OPTIONS, help="Make PyTorch models smaller and faster from the shell.")

def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"modelzip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                                 help="print the version and exit")] = False) -> None:
    """modelzip reads a checkpoint, writes a new checkpoint plus a JSON report. Exit codes: 0 ok,
    1 quality gate failed, 2 bad usage or input (nothing written), 3 internal error, 130 / 143 interrupted
    (SIGINT / SIGTERM; nothing written)."""


for _command in (inspect_, eval_, prune, quantize, lowrank, distill, chain, analyze, compare, export):
    app.command(_command.command_name, cls=MethodHelp)(_command)
app.add_typer(data_app, name="data")


app.add_typer(data_app, name="data")


# --------------------------------------------------------------------------------------------------
# Entry point: the one place exceptions become exit codes.


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so every `finally` on the way out runs
    (temporaries are removed) before one line says so. A second signal, during that cleanup or after it,
    is ignored by the same handler: never switched to SIG_IGN from inside it (a signal already pending then
    makes Python print "Signal 15 ignored due to race condition" with a traceback), and never back to the
    default action while an interrupted process is on its way out (a late SIGTERM would kill it, exit -15).
    An `Interrupted` raised inside a destructor, where Python can only print it, is raised again instead."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    first: list[int] = []
    lost: list[bool] = []  # the first signal's Interrupted was raised in a destructor: the next signal raises it

    def handler(signum, frame):
        if first and not lost:  # the run is already stopping
            return
        if lost:  # the first signal, sent again (or a second one that came before it): still the first's exit code
            lost.clear()
            raise Interrupted(first[0])
        first.append(signum)
        raise Interrupted(signum)

    def unraisable(info):  # raised where nothing can catch it (a destructor): no traceback; send it again a
        if isinstance(info.exc_value, Interrupted) and first:  # moment later, to arrive outside the destructor
            lost.append(True)  # (a SIGTERM right behind a SIGINT took the first's place here: exit 143, not 130)
            threading.Timer(0.01, os.kill, args=(os.getpid(), first[0])).start()
        else:
            previous_hook(info)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if first and h == signal.SIG_DFL else h)


def _one_line(text: str) -> str:
    """Control characters a file put into a message (a forged name, say) are escaped: one line stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _route_warnings(fallback):
    """`CodeRanWarning` is one line on stderr; any other warning goes where it went before."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CodeRanWarning):
            print(f"modelzip: warning: {_one_line(str(message))}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


@functools.cache
def _click_command():
    """The Click command Typer builds from `app`, built once: reading every command's signature costs more
    than a small command's work, and tests and workers call `run` many times in one process."""
    return typer.main.get_command(app)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; exceptions become one line on stderr (README, "Exit codes")."""
    from modelzip_cli.pipeline import distributed

    if distributed.launched():  # under torchrun every rank runs the command; one of them says how it ended
        return distributed.run_on_every_rank(lambda: _outcome(argv))
    code, line = _outcome(argv)
    if line:
        print(line, file=sys.stderr)
    return code


def _outcome(argv: list[str] | None) -> tuple[int, str | None]:
    """The exit code and the one error line (not yet printed) of one run of the app."""
    import warnings

    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    debug = os.environ.get("MODELZIP_DEBUG") == "1"
    with warnings.catch_warnings():  # restores the filters and showwarning on the way out
        # Libraries' warnings (torch.ao's deprecations, torch's notes on meta tensors) are ours to handle, not
        # the user's: they would break the one-line output. MODELZIP_DEBUG=1 shows them.
        if not debug:
            warnings.simplefilter("ignore")
        warnings.simplefilter("always", CodeRanWarning)
        warnings.showwarning = _route_warnings(warnings.showwarning)
        fail = functools.partial(_failure, as_json="--json" in args)
        try:
            with _signals_interrupt():
                code = _click_command().main(args=args, prog_name="modelzip", standalone_mode=False)
            return (code if isinstance(code, int) else 0), None
        except SystemExit as exc:
            return (exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)), None
        except Interrupted as exc:
            return fail(exit_code_for(exc), "interrupted", kind=None)
        except (KeyboardInterrupt, typer.Abort):  # outside the main thread; end of input at a prompt
            return fail(130, "interrupted", kind=None)
        except typer.TyperException as exc:  # a parse error: one line, as every other error
            ctx = getattr(exc, "ctx", None)
            return fail(getattr(exc, "exit_code", 2), " ".join(exc.format_message().split()),
                        f"see '{ctx.command_path} --help'" if ctx is not None else None)
        except QualityGateFailed as exc:  # under --json the report on stdout already says why (its gate)
            if debug:
                raise
            return exit_code_for(exc), f"modelzip: error: {_one_line(exc.line())}"
        except ModelzipError as exc:
            if debug:
                raise
            return fail(exit_code_for(exc), exc.message, exc.hint)
        except Exception as exc:  # a condition of the machine (a full disk, …), else a bug: one line
            if debug:
                raise
            condition = os_condition(exc)
            if condition is not None:
                return fail(exit_code_for(exc), condition.message, condition.hint)
            detail = _one_line(str(exc).splitlines()[0]) if str(exc).strip() else ""
            return fail(INTERNAL_ERROR, f"{type(exc).__name__}: {detail}", "this is a bug; rerun with "
                        "MODELZIP_DEBUG=1 for the traceback and report it", kind="internal error")


def _failure(code: int, error: str, hint: str | None = None, *, kind: str | None = "error",
             as_json: bool = False) -> tuple[int, str]:
    """The exit code and the one line for stderr; with --json also one JSON object on stdout (error, hint,
    exit_code), so that a script reading stdout learns why as well as that."""
    if as_json:
        sys.stdout.write(json.dumps({"error": error, "hint": hint, "exit_code": code}) + "\n")
        sys.stdout.flush()
    text = error + (f" ({hint})" if hint else "")
    return code, f"modelzip: {kind}: {_one_line(text)}" if kind else f"modelzip: {text}"


def main() -> None:
    sys.exit(run())
