"""`data text` with tokenizers of any transformers family, built offline here (issue 25, item 6)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import one_line_error

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

CORPUS = "the cat sat on the mat\na dog\nthe dog sat\n"


def _llama_tokenizer_dir(folder, tokenizer_class: str | None = None):
    """A Llama-style tokenizer (SentencePiece-like BPE over '▁' pieces, <s>/</s>/<unk>, no padding token) saved
    as a model directory, from a small vocabulary: what `save_pretrained` of a small random Llama writes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece in "▁the ▁cat ▁sat ▁on ▁mat ▁a ▁dog ▁ t h e c a s o n m d g".split():
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tokenizer.pad_token is None  # as Llama's own
    tokenizer.save_pretrained(folder)
    LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(folder)
    if tokenizer_class is not None:  # a family this transformers has no class for
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = tokenizer_class
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


@pytest.mark.parametrize("tokenizer_class", [None, "SomeNewFamilyTokenizer"])
def test_a_llama_tokenizer_makes_token_files(cli, tmp_path, tokenizer_class):
    from safetensors.torch import load_file

    vocab = _llama_tokenizer_dir(tmp_path / "llama", tokenizer_class)
    (tmp_path / "corpus.txt").write_text(CORPUS)
    out = tmp_path / "tokens.safetensors"
    r = cli("data", "text", tmp_path / "corpus.txt", "--tokenizer", tmp_path / "llama", "-o", out, "--max-length", "8")
    assert r.code == 0, r.stderr
    data = load_file(out)
    assert data["inputs"].shape == data["attention_mask"].shape == (3, 8)
    mask = data["attention_mask"].bool()
    assert set(data["inputs"][mask].tolist()) <= set(vocab.values()) - {vocab["<unk>"]}  # every word known
    assert mask[1].sum() < mask[0].sum()  # "a dog" is padded, and the mask hides the padding
    assert (data["inputs"][~mask] == vocab["</s>"]).all()  # padded with the end token (Llama has no pad token)


def test_a_directory_without_tokenizer_files_is_one_clear_line(cli, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "corpus.txt").write_text(CORPUS)
    r = cli("data", "text", tmp_path / "corpus.txt", "--tokenizer", folder, "-o", tmp_path / "t.safetensors")
    assert r.code == 2
    line = one_line_error(r)
    assert "no tokenizer files in" in line and "tokenizer.json" in line
    assert not (tmp_path / "t.safetensors").exists()
