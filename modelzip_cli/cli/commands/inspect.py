"""`modelzip inspect`: what a checkpoint holds, read from its header."""

from __future__ import annotations

from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    RUN_OPTIONS,
    Input,
    TrustCode,
    _options,
    command,
    emit,
)


@command(_options(trust_code=(TrustCode, False)), RUN_OPTIONS[1:], name="inspect")
def inspect_(model: Input, sha256: Annotated[bool, typer.Option(
        "--sha256", help="also hash the whole file (reads all of it)")] = False, *, shared) -> None:
    """Parameters, bytes, format, edit history and a per-layer table — from the header alone."""
    from modelzip_cli.commands.inspect import inspect_checkpoint

    emit(inspect_checkpoint(model, trust_code=shared.trust_code, hash_file=sha256), shared)
