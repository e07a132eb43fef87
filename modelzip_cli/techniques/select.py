"""Module selection: a predicate of (module, qualified name), exposed as --include / --exclude globs."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from modelzip_cli.errors import UsageError

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatchcase(name, g) for g in globs)


def select_modules(model: nn.Module, *, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                   types: tuple[type, ...] = WEIGHTED, what: str = "Linear or Conv") -> list[tuple[str, nn.Module]]:
    """Modules of `types` whose qualified name matches an --include glob (all if none) and no --exclude glob.

    An --include glob that matches no module at all is an error (a typo should not silently select nothing).
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    for g in include or []:
        if not any(fnmatchcase(n, g) for n, _ in named):
            raise UsageError(f"--include {g!r} matches no module",
                             hint="module names look like " + ", ".join(n for n, _ in named[:4]))
    chosen = [(n, m) for n, m in named if isinstance(m, types)
              and (not include or matches(n, include)) and not (exclude and matches(n, exclude))]
    if not chosen:
        raise UsageError(f"no {what} module is selected", hint="check --include / --exclude")
    return chosen


def unsupported_layers(model: nn.Module) -> str | None:
    """A note naming weighted layers modelzip does not handle (transformers' Conv1D in GPT-2 and kin), or None."""
    found = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ == "Conv1D"
                    and type(m).__module__.startswith("transformers")})
    return f"this model's {', '.join(found)} layers (transformers' transposed Linear) are not handled yet" \
        if found else None


def output_layer(model: nn.Module, example) -> str | None:
    """Qualified name of the last weighted module in execution order: the classifier head."""
    from modelzip_cli.nn.surgery import run_with_hooks

    order: list[str] = []
    run_with_hooks(model, example, [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
                                    for n, m in model.named_modules() if n and isinstance(m, WEIGHTED)])
    return order[-1] if order else None
