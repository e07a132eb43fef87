"""GPTQ's column-by-column rounding and the layer-by-layer calibration it runs in (gptq.py, sequential.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

from modelzip_cli.nn.weight_only import rtn
from modelzip_cli.pipeline import sequential
from modelzip_cli.pipeline.sequential import Hessian
from modelzip_cli.techniques.gptq import gptq


def _correlated(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Inputs as a transformer's are: low-rank correlated, a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g) @ torch.randn(32, cols, generator=g) + 0.1 * torch.randn(n, cols, generator=g)
    x[:, :4] *= 10
    return x


@pytest.mark.parametrize("bits,group,cols", [(4, 128, 576), (4, 32, 256), (8, 128, 256), (4, 64, 200)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_far_below_round_to_nearest(bits, group, cols, act_order):
    x = _correlated(2048, cols)
    w = torch.randn(64, cols, generator=torch.Generator().manual_seed(1)) * 0.05
    h = Hessian(cols)
    for chunk in x.split(300):
        h.add(chunk)
    q, loss = gptq(w, h.h, bits, group, act_order=act_order)
    base = rtn(w, bits, group)

    def err(weight):
        return ((x @ weight.T - x @ w.T) ** 2).mean().item()

    assert err(q.dequantized(group)) < err(base.dequantized(group)) / 5
    assert loss > 0
    lo, hi = (0, 15) if bits == 4 else (-127, 127)
    assert q.ints.min() >= lo and q.ints.max() <= hi
    assert q.scales.shape == (64, -(-cols // group)) and q.zero_points.shape == q.scales.shape
    if act_order:  # static groups: the scales are round-to-nearest's, fixed from the original weights
        torch.testing.assert_close(q.scales, base.scales)


def test_hessian_is_the_running_mean_of_2_xtx():
    x = torch.randn(1000, 16)
    h = Hessian(16)
    for chunk in x.split(137):
        h.add(chunk)
    torch.testing.assert_close(h.h, 2 * x.T @ x / 1000, rtol=1e-4, atol=1e-4)


def test_dead_inputs_do_not_break_the_inverse():
    x = torch.randn(512, 64)
    x[:, 5] = 0
    h = Hessian(64)
    h.add(x)
    q, _ = gptq(torch.randn(8, 64), h.h, 4, 32)
    assert torch.isfinite(q.scales).all() and (q.ints[:, 5] == q.zero_points[:, 0]).all()


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_blocks_found_in_a_decoder_and_not_in_an_mlp():
    model = _tiny_llama()
    blocks = sequential.blocks_of(model)
    assert blocks.prefix == "model.layers" and len(blocks.layers) == 3
    assert sequential.blocks_of(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) is None


def test_layer_by_layer_pass_equals_the_whole_model():
    model = _tiny_llama()
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    seen: list[int] = []
    blocks = sequential.blocks_of(model)
    inputs = sequential.first_inputs(model, blocks, batches, lambda m, b: m(input_ids=b))
    for i, block in enumerate(blocks.layers):
        seen.append(i)
        inputs = sequential.run_block(block, inputs)
    assert seen == [0, 1, 2]
    with torch.no_grad():
        for (args, _), batch in zip(inputs, batches, strict=True):
            full = model(input_ids=batch, output_hidden_states=True).hidden_states[-1]  # after the final norm
            torch.testing.assert_close(model.model.norm(args[0]), full, rtol=1e-5, atol=1e-5)


def test_calibrate_sees_quantized_predecessors():
    """What block i receives is computed by blocks 0..i-1 as per_block left them."""
    model = _tiny_llama()
    batches = [torch.randint(0, 64, (2, 8))]
    first: dict[int, torch.Tensor] = {}

    def per_block(i, block, inputs):
        first[i] = inputs[0][0][0].clone()
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.data.zero_()  # the block becomes the identity (residuals only)

    sequential.calibrate(model, batches, lambda m, b: m(input_ids=b), per_block)
    torch.testing.assert_close(first[1], first[0])
    torch.testing.assert_close(first[2], first[0])


def _magnitude(w: torch.Tensor, ratio: float) -> torch.Tensor:
    w = w.clone()
    w.view(-1)[torch.topk(w.abs().flatten(), int(w.numel() * ratio), largest=False).indices] = 0
    return w


def test_wanda_and_sparsegpt_keep_outputs_better_than_magnitude():
    from modelzip_cli.techniques.gptq import sparsegpt, wanda

    x = _correlated(2048, 256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    h = Hessian(256)
    h.add(x)

    def err(weight):
        return ((x @ weight.T - x @ w.T) ** 2).mean().item()

    by_wanda, by_sparsegpt, by_magnitude = wanda(w, h.h, 0.5), sparsegpt(w, h.h, 0.5), _magnitude(w, 0.5)
    assert (by_wanda == 0).sum(1).eq(128).all()  # exactly half of every output row
    assert abs((by_sparsegpt == 0).float().mean().item() - 0.5) < 1e-3
    assert err(by_wanda) < err(by_magnitude) * 0.7
    assert err(by_sparsegpt) < err(by_wanda) / 3
    kept = by_sparsegpt != 0
    assert not torch.equal(by_sparsegpt[kept], w[kept])  # the kept weights were updated


def test_sparsegpt_chooses_its_mask_run_by_run_on_the_updated_weights():
    """The mask is chosen every MASK_BLOCK columns from the weights as the updates have left them (adaptive mask
    selection), so each run of columns holds exactly its share of zeros; one mask over a 128-wide row cannot
    adapt. On correlated inputs the adaptive mask keeps the output closer than one chosen once."""
    from modelzip_cli.techniques.gptq import MASK_BLOCK, sparsegpt

    x = _correlated(2048, 128)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    h = Hessian(128)
    h.add(x)
    adaptive, once = sparsegpt(w, h.h, 0.5), sparsegpt(w, h.h, 0.5, mask_block=128)
    runs = (adaptive == 0).reshape(48, -1, MASK_BLOCK).sum((0, 2))  # zeros per run of columns
    assert runs.eq(48 * MASK_BLOCK // 2).all()
    assert not (once == 0).reshape(48, -1, MASK_BLOCK).sum((0, 2)).eq(48 * MASK_BLOCK // 2).all()

    def err(weight):
        return ((x @ weight.T - x @ w.T) ** 2).mean().item()

    assert err(adaptive) < err(once)


@pytest.mark.parametrize("shape", [(1, 100), (48, 200), (64, 576), (7, 33)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_sparsegpt_prunes_the_layers_exact_share(shape, ratio):
    """Each run's share of zeros is what brings the layer's count to int(out · in · ratio): rounding down run by
    run (one short in each of 18 runs of 32 on a 576-wide layer) never adds up."""
    from modelzip_cli.techniques.gptq import sparsegpt

    out, cols = shape
    g = torch.Generator().manual_seed(out + cols)
    w, x = torch.randn(out, cols, generator=g), torch.randn(400, cols, generator=g)
    assert int((sparsegpt(w, 2 * x.T @ x / 400, ratio) == 0).sum()) == int(out * cols * ratio)


def test_awq_scales_folded_into_the_norm_leave_the_block_unchanged():
    from modelzip_cli.techniques import awq

    model = _tiny_llama()
    block = model.model.layers[0]
    x = torch.randn(2, 8, 32)
    position = model.model.rotary_emb(x, torch.arange(8)[None])
    with torch.no_grad():
        before = block(x, position_embeddings=position)
        s = torch.rand(32) + 0.5
        awq.fold_into(block.input_layernorm, s)
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            proj.weight.mul_(s[None, :])
        up_s = torch.rand(48) + 0.5
        awq.fold_into(block.mlp.up_proj, up_s)
        block.mlp.down_proj.weight.mul_(up_s[None, :])
        after = block(x, position_embeddings=position)
    before, after = (o[0] if isinstance(o, tuple) else o for o in (before, after))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_awq_search_and_clipping_beat_round_to_nearest_on_outlier_channels():
    from modelzip_cli.techniques import awq

    x = _correlated(2048, 256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    s, alpha, err = awq.search(x, [w], 4, 128)
    base = ((x @ rtn(w, 4, 128).dequantized(128).T - x @ w.T) ** 2).sum() / (x @ w.T).pow(2).sum()
    assert alpha > 0 and err < float(base)
    clipped = awq.clip(w * s[None, :], x / s[None, :], 4, 128)
    q = rtn(clipped, 4, 128).dequantized(128) / s[None, :]
    assert ((x @ q.T - x @ w.T) ** 2).sum() / (x @ w.T).pow(2).sum() <= err * 1.0001


@pytest.mark.parametrize("method", ["gptq", "awq", "wanda", "sparsegpt"])
def test_calibration_steps_run_on_the_context_device_and_come_back(method, monkeypatch):
    """--device reaches every calibration step: the model is moved to ctx.device for the step (here the CPU,
    through the same code path a GPU takes) and is where it was afterwards, every tensor of the result too."""
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import Dataset
    from modelzip_cli.techniques.base import handler
    from modelzip_cli.techniques.prune import SparseGPTConfig, WandaConfig
    from modelzip_cli.techniques.quantize import AWQConfig, GPTQConfig

    moves: list[torch.device] = []
    real = sequential.on_device.__wrapped__

    def spy(model, device):
        moves.append(torch.device(device))
        return real(model, device)

    monkeypatch.setattr(sequential, "on_device", contextlib.contextmanager(spy))
    cfg = {"gptq": GPTQConfig(group_size=16), "awq": AWQConfig(group_size=16), "wanda": WandaConfig(ratio=0.5),
           "sparsegpt": SparseGPTConfig(ratio=0.5)}[method]
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    ctx = Context(calib_data=Dataset(inputs=ids, targets=None, path=Path("calib")), device=torch.device("cpu"))
    out = handler(cfg)(_tiny_llama(), cfg, ctx)
    model = out[0] if isinstance(out, tuple) else out.model
    assert moves == [torch.device("cpu")]
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_of_stacked_rows_is_gptq_of_each_layer(act_order):
    """q, k and v read one input: GPTQ of their stacked rows (one walk) gives each what a walk of its own gives."""
    from modelzip_cli.techniques.gptq import gptq_rows

    x = _correlated(512, 96)
    h = Hessian(96)
    h.add(x)
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(rows, 96, generator=g) for rows in (16, 8, 8)]
    q, loss = gptq_rows(torch.cat(ws), h.h, 4, 32, act_order=act_order)
    for w, ints, scales, part in zip(ws, q.ints.split([16, 8, 8]), q.scales.split([16, 8, 8]),
                                     loss.split([16, 8, 8]), strict=True):
        alone, alone_loss = gptq(w, h.h, 4, 32, act_order=act_order)
        assert torch.equal(ints, alone.ints)
        torch.testing.assert_close(scales, alone.scales)
        assert float(part.sum()) == pytest.approx(alone_loss, rel=1e-4)


def test_rebatched_windows_keep_every_sample_in_order():
    batches = [torch.arange(i * 48, (i + 1) * 48).reshape(3, 2, 8) for i in range(5)]  # (B, 2, L): ids and mask
    big = sequential.rebatched(batches)
    assert len(big) == 1 and torch.equal(torch.cat(big), torch.cat(batches))
    floats = [torch.randn(3, 4)]
    assert sequential.rebatched(floats) is floats  # not token windows: as they are


def test_rebatched_splits_to_the_pass_size_and_pass_size_follows_the_widest_layer():
    batches = [torch.arange(i * 64, (i + 1) * 64).reshape(8, 8) for i in range(2)]  # 16 windows of 8 tokens
    small = sequential.rebatched(batches, tokens=24)
    assert [len(b) for b in small] == [3] * 5 + [1] and torch.equal(torch.cat(small), torch.cat(batches))
    wide = nn.Sequential(nn.Linear(8, 4096), nn.Linear(4096, 8))
    assert sequential.pass_tokens(wide) == sequential.PASS_BYTES // (4 * 4096)
    assert sequential.pass_tokens(nn.Linear(8, 8)) == sequential.PASS_TOKENS


def test_gptq_puts_each_blocks_packed_layers_in_once_calibration_is_past_it(monkeypatch):
    """The float weights of a block go as soon as the next block's inputs are made, not at the end: when block
    i is calibrated, every block before it already holds its packed layers."""
    from modelzip_cli.nn.weight_only import WeightOnlyLinear
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import Dataset
    from modelzip_cli.techniques.base import handler
    from modelzip_cli.techniques.quantize import GPTQConfig

    model = _tiny_llama()
    seen: list[list[int]] = []  # at each block's calibration: the blocks already packed
    real = sequential.feed

    def spy(block, inputs):
        seen.append([i for i, b in enumerate(model.model.layers) if isinstance(b.mlp.down_proj, WeightOnlyLinear)])
        return real(block, inputs)

    monkeypatch.setattr(sequential, "feed", spy)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    ctx = Context(calib_data=Dataset(inputs=ids, targets=None, path=Path("calib")))
    cfg = GPTQConfig(group_size=16)
    out = handler(cfg)(model, cfg, ctx)
    assert seen == [[], [0], [0, 1]]
    assert all(isinstance(m, WeightOnlyLinear) for n, m in out[0].named_modules() if n.endswith("_proj"))


def test_gptq_leaves_a_layer_no_batch_reaches_float():
    """A Linear in a block that the forward never calls has no Hessian: it stays as it is, the rest are packed."""
    from modelzip_cli.nn.weight_only import WeightOnlyLinear
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import Dataset
    from modelzip_cli.techniques.base import handler
    from modelzip_cli.techniques.quantize import GPTQConfig

    model = _tiny_llama()
    model.model.layers[0].unused = nn.Linear(32, 32)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = GPTQConfig(group_size=16)
    out, [edit], _ = handler(cfg)(model, cfg, Context(calib_data=Dataset(inputs=ids, targets=None, path=Path("c"))))
    assert type(out.model.layers[0].unused) is nn.Linear and "model.layers.0.unused" not in edit.modules
    assert isinstance(out.model.layers[0].mlp.down_proj, WeightOnlyLinear)


@pytest.mark.parametrize("method", ["gptq", "awq", "wanda", "sparsegpt", "dynamic"])
def test_offloaded_activations_give_the_same_model_and_leave_no_file(method, tmp_path, monkeypatch):
    """--offload-activations: block boundaries go to files under the folder (read back a batch at a time) and
    the calibrated model is the one calibration in memory gives, bit for bit; the files are gone afterwards."""
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import Dataset
    from modelzip_cli.techniques.base import handler
    from modelzip_cli.techniques.prune import SparseGPTConfig, WandaConfig
    from modelzip_cli.techniques.quantize import AWQConfig, DynamicConfig, GPTQConfig

    cfg = {"gptq": GPTQConfig(group_size=16), "awq": AWQConfig(group_size=16), "wanda": WandaConfig(ratio=0.5),
           "sparsegpt": SparseGPTConfig(ratio=0.5),
           "dynamic": DynamicConfig(smoothing="auto", exclude=["lm_head"])}[method]
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    written: list[Path] = []
    append = sequential.Offloaded.append

    def spy(self, entry):
        append(self, entry)
        written.append(self.entries[-1][0])
        assert all(isinstance(v, Path | str | tuple | dict) for v in self.entries[-1])  # no tensor kept here

    monkeypatch.setattr(sequential.Offloaded, "append", spy)
    states = []
    for offload in (None, tmp_path):
        ctx = Context(calib_data=Dataset(inputs=ids, targets=None, path=Path("calib")), offload=offload)
        out = handler(cfg)(_tiny_llama(), cfg, ctx)
        model = out[0] if isinstance(out, tuple) else out.model
        states.append({k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    assert written and all(p.parent.parent == tmp_path for p in written)
    assert list(tmp_path.iterdir()) == []
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_offload_folder_that_is_not_a_folder_is_refused(cli, tmp_path):
    from tests.conftest import DIGITS_TEACHER

    r = cli("quantize", str(DIGITS_TEACHER), "--method", "dynamic", "--offload-activations", str(tmp_path / "missing"),
            "-o", str(tmp_path / "out.safetensors"))
    assert r.code == 2 and "not a folder" in r.stderr and not (tmp_path / "out.safetensors").exists()
