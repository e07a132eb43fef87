"""modelzip: make PyTorch models smaller and faster from the shell.

`load_model` and `save_model` are the Python entry points; torch is imported only when they are called,
so `modelzip --help` stays fast.
"""

from __future__ import annotations

from modelzip_cli.version import __version__

__all__ = ["__version__", "load_model", "save_model"]


def load_model(path, **kwargs):
    """Load a modelzip checkpoint (or a raw state dict with `arch=`) and return the module in eval mode."""
    from modelzip_cli.checkpoint.io import load_model as _load

    return _load(path, **kwargs)


def save_model(model, path, **kwargs):
    """Write `model` as a modelzip checkpoint (atomic). See `checkpoint.save_model`."""
    from modelzip_cli.checkpoint.io import save_model as _save

    return _save(model, path, **kwargs)
