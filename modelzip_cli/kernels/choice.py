"""Which kernels modelzip's quantized modules run on: one immutable choice, scoped with `use()`.

A command or a test that needs particular kernels (the float reference an exported graph reproduces, the
plain int8 kernels a report names) says so for the duration of a block; nothing is set for the process.
Fields left None are chosen by the module on the running machine (environment override, then measurement).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    int8_backend: str = "auto"  # auto | plain | torch-ao (nn.int8.BACKENDS)
    int8_kernel: str | None = None  # int_mm | float; None: MODELZIP_INT8_KERNEL or what this CPU runs fast
    weight_only: str | None = None  # a kernels.weight_only.KERNELS name; None: MODELZIP_WO_KERNEL or measured


_CHOICE: ContextVar[KernelChoice] = ContextVar("modelzip_kernels", default=KernelChoice())  # noqa: B039 (frozen)


def current() -> KernelChoice:
    return _CHOICE.get()


@contextlib.contextmanager
def use(**changes) -> Iterator[KernelChoice]:
    """The current choice with `changes` inside the block (names are checked by the modules' own `use_*`)."""
    token = _CHOICE.set(dataclasses.replace(current(), **changes))
    try:
        yield current()
    finally:
        _CHOICE.reset(token)
