"""A `.gguf` file as a MODEL (inspect, eval, compare, and every technique): read by transformers' GGUF loader,
every tensor dequantized to float32, then put into a plain transformers model built from the config the file
describes, so that what follows sees an ordinary float causal LM (the GGUF's integers are not kept: the
load says so in a note). Llama, Mistral, Qwen2 and GPT-2 files (what transformers' GGUF loader reads); gguf
and accelerate are the `[gguf]` extra.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from modelzip_cli.errors import InputError, UsageError, first_line
from modelzip_cli.hf import HFModel, build, require_transformers
from modelzip_cli.limits import check_memory, check_regular

EXTRA_HINT = "pip install 'modelzip[gguf]'"
NOTE = "{path}: GGUF read by transformers' GGUF loader, every tensor dequantized to float32 (its integers are not kept)"


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("GGUF export and .gguf models need the gguf package", hint=EXTRA_HINT) from None
    return gguf


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and not path.is_dir()


def _config_overrides(path: Path) -> dict:
    """The GPT-2 widths transformers' GGUF loader does not carry into GPT2Config (it reads `context_length` as
    n_ctx only, and `feed_forward_length` under a name GPT-2 ignores): n_positions and n_inner, from the file's
    metadata. Other architectures: none."""
    gguf = require_gguf()
    try:
        fields = gguf.GGUFReader(str(path)).fields
        arch = str(bytes(fields["general.architecture"].parts[-1]), "utf-8")
        if arch != "gpt2":
            return {}
        return {"n_positions": int(fields["gpt2.context_length"].parts[-1][0]),
                "n_inner": int(fields["gpt2.feed_forward_length"].parts[-1][0])}
    except Exception as exc:  # the reader raises many types for a file it cannot parse
        raise InputError(f"{path}: not a GGUF file the gguf reader can read ({first_line(exc)})") from None


def load_gguf(path: Path) -> tuple[HFModel, dict]:
    """(the model as a modelzip causal LM, its config dict) from a .gguf file; exit 2 when it cannot be read."""
    require_gguf()
    transformers = require_transformers()
    path = Path(path)
    check_regular(path, "GGUF file")
    check_memory(8 * path.stat().st_size, f"GGUF file {path} (dequantized to float32)")  # up to 8× a 4-bit file
    overrides = _config_overrides(path)
    try:  # (its tensor conversion draws a progress bar of its own on stderr)
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                       local_files_only=True, dtype=torch.float32,
                                                                       **overrides)
    except Exception as exc:  # transformers raises many types for a file it cannot read
        raise InputError(f"{path}: transformers' GGUF loader cannot load it ({first_line(exc)})",
                         hint="pass a GGUF file of a Llama, Mistral, Qwen2 or GPT-2 model") from None
    config = loaded.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "quantization_config"):
        config.pop(key, None)
    model = build("causal-lm", config)  # a plain float model: no GGUF quantizer attached to it
    missing, unexpected = model.model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if not k.endswith("inv_freq")] or unexpected:
        raise InputError(f"{path}: the GGUF's tensors do not fill a {config.get('model_type')} model "
                         f"(missing {list(missing)[:2]}, unexpected {list(unexpected)[:2]})")
    model.model.tie_weights()
    return model.eval(), config
