"""checkpoint/decoder_edits.py and nn/decoders.py: decoder surgery and its replay, on tiny transformers models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra is not installed")

from modelzip_cli.checkpoint.decoder_edits import BlocksEdit, Conv1DEdit, DecoderEdit  # noqa: E402
from modelzip_cli.checkpoint.edits import Edit  # noqa: E402
from modelzip_cli.checkpoint.format import Manifest  # noqa: E402
from modelzip_cli.errors import InputError  # noqa: E402
from modelzip_cli.nn import decoders  # noqa: E402

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
MANIFEST = Manifest(arch="hf:causal-lm")


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **LLAMA)).eval()


def test_the_three_kinds_round_trip_through_their_classes():
    for edit in (Conv1DEdit(modules=["h.0.attn.c_attn"]), BlocksEdit(stack="model.layers", removed=[1]),
                 DecoderEdit(ratio=0.5, importance="activations",
                             blocks=[{"block": "model.layers.0", "kv_heads": 1, "intermediate": 32}])):
        assert Edit.parse(edit.to_dict()) == edit


def test_kept_kv_groups_and_channels_keep_their_weights_and_the_block_runs():
    model = llama()
    ids = torch.randint(0, 64, (2, 10))
    _, blocks = decoders.decoder_blocks(model)
    attn, mlp = blocks[0].attention, blocks[0].mlp
    assert (attn.heads, attn.kv_heads, attn.group, mlp.width) == (4, 2, 2, 64)
    q_before = model.get_submodule(attn.q.linear).weight[16:32].clone()  # query heads 2 and 3: KV group 1
    decoders.shrink_attention(model, attn, [1])
    decoders.shrink_mlp(model, mlp, list(range(0, 64, 2)))
    decoders.set_widths(model, [b for b in blocks if b is blocks[0]])
    assert torch.equal(model.get_submodule(attn.q.linear).weight, q_before)
    assert model.get_submodule(attn.o).in_features == 16 and model.get_submodule(mlp.down).in_features == 32
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 10, 64)  # the block runs with one KV group of two query heads


def test_a_decoder_edit_replays_the_widths_and_a_forged_one_is_one_line():
    model = llama()
    rows = [{"block": f"model.layers.{i}", "kv_heads": 1, "intermediate": 24} for i in range(3)]
    model = DecoderEdit(ratio=0.5, importance="weight norms", blocks=rows).replay(model, MANIFEST)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) \
        == (2, 1, 24)
    assert model.model.layers[2].self_attn.k_proj.out_features == 8
    with pytest.raises(InputError, match="3 KV groups kept, but it has 1"):
        DecoderEdit(ratio=0.5, importance="x", blocks=[{"block": "model.layers.0", "kv_heads": 3}]).replay(
            model, MANIFEST)


def test_removed_blocks_leave_the_rest_renumbered_and_the_config_counting_them():
    model = llama()
    last = model.model.layers[2]
    model = BlocksEdit(stack="model.layers", removed=[0]).replay(model, MANIFEST)
    assert model.model.layers[1] is last and last.self_attn.layer_idx == 1
    assert model.config.num_hidden_layers == 2
    with torch.no_grad():
        model.generate(torch.randint(0, 64, (1, 4)), max_new_tokens=3, do_sample=False)  # the KV cache fits
    with pytest.raises(InputError, match="removes blocks"):
        BlocksEdit(stack="model.layers", removed=[5]).replay(model, MANIFEST)


def test_conv1d_becomes_the_linear_it_computes():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("gpt2", n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 32, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
        names = decoders.conv1d_layers(model)
        assert len(names) == 4
        decoders.conv1d_to_linear(model, names)
        assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
