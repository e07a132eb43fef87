"""The sample decoder LM: a small Llama-architecture causal LM (grouped-query attention, SwiGLU MLP,
RMSNorm, tied embeddings) and its byte-level BPE tokenizer, trained on this machine from Python's own
documentation, saved as a Hugging Face directory (`tiny_llama/`).

The corpus is documents, not sentences: each pydoc topic and each standard-library module's docstrings
(the module's, its public functions' and classes', and their methods') is one document. A document's set
is decided by a hash of its name, so held-out windows never share a document with training or
calibration ones, on every machine with the same Python. Nothing is downloaded.

    python -m sample_models.decoder DIR     # {train,calib,heldout}.jsonl and their 128-token windows in DIR
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
NAME = "tiny_llama"
EOS = "<|endoftext|>"
SETS = {"heldout": 0.10, "calib": 0.10, "train": 0.80}  # fractions of the hash space, in this order
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc", "lib2to3"}  # side effects
VOCAB = 2048
WINDOW = 128
CONFIG = {  # ~1.05 M parameters: under the 5 MB limit for a tracked file in fp32
    "vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "rope_theta": 10000.0,
}
STEPS, BATCH, LR = 800, 16, 3e-3


def _module_text(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 — a module that does not import here is simply not in the corpus
            return ""
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(dir(module)):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            parts.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            parts += [inspect.getdoc(v) or "" for k, v in sorted(vars(obj).items())
                      if not k.startswith("_") and inspect.isfunction(v)]
    return "\n\n".join(p for p in parts if p)


def documents() -> dict[str, str]:
    """name → text: every pydoc topic and every importable public standard-library module's docs."""
    import pydoc_data.topics

    docs = {f"topic:{k}": v for k, v in sorted(pydoc_data.topics.topics.items())}
    for name in sorted(sys.stdlib_module_names):
        if not name.startswith("_") and name not in SKIP:
            text = _module_text(name)
            if text:
                docs[f"module:{name}"] = text
    return docs


def split() -> dict[str, list[str]]:
    """Each document in exactly one set, by the first 8 bytes of the SHA-256 of its name."""
    from sample_models.text_sets import set_of

    sets: dict[str, list[str]] = {name: [] for name in SETS}
    for name, text in documents().items():
        sets[set_of(name, SETS)].append(text)
    return sets


def write_texts(out_dir: Path) -> dict[str, Path]:
    """NAME.jsonl per set, one {"text": document} a line: what `modelzip data text --pack` reads."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, docs in split().items():
        files[name] = out_dir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return files


def write_windows(out_dir: Path, length: int = WINDOW, tokenizer_dir: Path = HERE / NAME) -> dict[str, Path]:
    """NAME.safetensors per set: the windows `modelzip data text --pack` cuts from NAME.jsonl."""
    from modelzip_cli.commands import data as datamake

    return {name: datamake.packed_text(path, tokenizer_dir, out_dir / f"{name}.safetensors", max_length=length,
                                       force=True).paths[0]
            for name, path in write_texts(out_dir).items()}


def train_tokenizer(docs: list[str]):
    """A byte-level BPE of VOCAB tokens with EOS, as transformers' PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=CONFIG["max_position_embeddings"])


def windows(tokenizer, docs: list[str], length: int = WINDOW) -> torch.Tensor:
    """Documents joined with EOS and cut into (N, length) windows of token ids; the tail is dropped."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.backend_tokenizer.encode(doc, add_special_tokens=False).ids + [tokenizer.eos_token_id]
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.int64).reshape(n, length)  # (N, L)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 32) -> float:
    """exp of the mean next-token NLL over every position of every window."""
    total, count = 0.0, 0
    for chunk in ids.split(batch):
        logits = model(input_ids=chunk).logits[:, :-1]  # (B, L-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + nll.item(), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def build(out: Path = HERE / NAME, steps: int = STEPS, seed: int = 0) -> dict:
    """Train the tokenizer and the model, save both to `out`, return the figures."""
    import transformers

    sets = split()
    tokenizer = train_tokenizer(sets["train"])
    train_ids, held_ids = windows(tokenizer, sets["train"]), windows(tokenizer, sets["heldout"])
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, bos_token_id=tokenizer.eos_token_id,
                                                                   eos_token_id=tokenizer.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = train_ids[torch.randint(len(train_ids), (BATCH,), generator=gen)]  # (B, L)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    ppl = perplexity(model, held_ids)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"arch": "transformers LlamaForCausalLM", "kwargs": CONFIG,
            "parameters": sum(p.numel() for p in model.parameters()),
            "heldout_perplexity": round(ppl, 3), "heldout_tokens": held_ids.numel(),
            "train_tokens": train_ids.numel(),
            "train": {"steps": steps, "batch_size": BATCH, "window": WINDOW, "lr": LR, "optimizer": "AdamW"}}


if __name__ == "__main__":
    for set_name, path in write_windows(Path(sys.argv[1])).items():
        print(set_name, path)
