"""A causal LM as a GGUF file (llama.cpp and every runner built on it), written with the `gguf` package, with
llama.cpp's tensor names and metadata (as its convert_hf_to_gguf.py writes them) and the tokenizer.

Families: Llama and Mistral (GGUF architecture `llama`; the query and key rows permuted into llama.cpp's
rotary layout, as the converter does), Qwen2 (`qwen2`) and GPT-2 (`gpt2`: learned positions, LayerNorms
with biases, one fused query-key-value projection; transformers' Conv1D weights are stored transposed, as the
Linear they compute, the converter's layout). Types (`--gguf-type`):

- `f16`: 2-D weights in float16, norms and biases float32 (the converter's `--outtype f16`);
- `q8_0`: blocks of 32 weights, int8 with one float16 scale (symmetric);
- `q4_0`: blocks of 32, 4-bit with one float16 scale, zero point 8 (symmetric);
- `q4_1`: blocks of 32, 4-bit with a float16 scale and a float16 minimum (asymmetric: modelzip's int4);
- `q4_k`: super-blocks of 256, eight 4-bit sub-blocks of 32 whose scales and minimums are 6-bit integers of two
  float16 values (4.5 bits a weight; quantized by export/q4_k.py, since the `gguf` package cannot write K-quants);
  a row whose length is not a multiple of 256 is Q5_0, as llama-quantize falls back;
- `auto` (the default): f16 for a float model, q8_0 for weight-only int8, q4_1 for weight-only int4.

From a modelzip weight-only model the stored integers map **directly** when the GGUF block fits inside one
of its groups (the group size a multiple of 32) and the schemes agree: int8 (symmetric) → Q8_0, int4
(asymmetric, a zero point per group) → Q4_1, int4 whose zero points are all 8 → Q4_0; the only rounding left is
the scale (and minimum) stored as float16. Otherwise the weight is dequantized and **requantized** into the
type (a second rounding; the notes say which layers); Q4_K is always quantized from the float (dequantized)
weight. For the 4-bit types the embedding table and a separate output layer are Q8_0 (llama-quantize keeps them
at Q6_K or better, which this module cannot write). A row whose length is not a multiple of 32 is float16.

Tokenizer: byte-level BPE (tokenizer.json), written as llama.cpp's `gpt2` model with the pre-tokenizer its
splitting regex names (`gpt-2`, `qwen2`, `llama-bpe`), its merges and special tokens (gguf.SpecialVocab).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelzip_cli.checkpoint.gguf import EXTRA_HINT, load_gguf, require_gguf  # noqa: F401  (re-exported)
from modelzip_cli.errors import InputError, UsageError, first_line
from modelzip_cli.export import q4_k
from modelzip_cli.hf import HFModel, require_transformers, unwrap
from modelzip_cli.nn.weight_only import WeightOnlyLinear

GGUF_TYPES = ("auto", "f16", "q8_0", "q4_0", "q4_1", "q4_k")
FOUR_BIT = ("q4_0", "q4_1", "q4_k")
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}  # model_type → GGUF arch
# GPT-2's config names → the names the rest of this module reads (GPT2Config.attribute_map)
_GPT2_KEYS = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
              "max_position_embeddings": "n_positions"}
BLOCK = 32  # Q8_0, Q4_0 and Q4_1 blocks
# the splitting regex of a byte-level BPE tokenizer → llama.cpp's pre-tokenizer name (transformers' GGUF
# reader knows the same names); a plain ByteLevel pre-tokenizer with its own regex is GPT-2's
_GPT2_PRE = "gpt-2"


def resolve_type(gguf_type: str, scheme: str | None) -> str:
    """`auto` → the type a model maps onto: f16 (float), q8_0 (int8), q4_1 (int4: asymmetric groups)."""
    if gguf_type != "auto":
        return gguf_type
    return {"weight-only": "q8_0", "weight-only int4": "q4_1"}.get(scheme or "", "f16" if scheme is None else "q8_0")


def family(loaded_model: nn.Module, config: dict) -> str:
    """The GGUF architecture of a causal LM, or exit 2 saying which models GGUF export takes."""
    model_type = config.get("model_type")
    if not isinstance(loaded_model, HFModel) or not loaded_model.causal_lm or model_type not in FAMILIES:
        raise UsageError(f"--format gguf exports Llama, Mistral, Qwen2 and GPT-2 causal LMs; this model is "
                         f"{model_type or type(loaded_model).__name__}",
                         hint="export it with --format onnx or pt2")
    return FAMILIES[model_type]


def _standard_keys(config: dict) -> dict:
    """A GPT-2 config under the standard names (its MLP width: n_inner, else 4 × n_embd); others unchanged."""
    if config.get("model_type") != "gpt2":
        return config
    out = {**config, **{k: config[v] for k, v in _GPT2_KEYS.items() if v in config}}
    out["intermediate_size"] = config.get("n_inner") or 4 * int(config["n_embd"])
    return out


# ---------------------------------------------------------------------------------------------------
# Tensors


def _rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives a query or key projection (LlamaModel.permute): per head,
    the two rotary halves interleaved."""
    index = torch.arange(rows)
    return index.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


@dataclass
class Encoded:
    data: np.ndarray
    qtype: object  # gguf.GGMLQuantizationType
    how: str  # direct | requantized | float


def _ints(m: WeightOnlyLinear) -> torch.Tensor:
    """A weight-only layer's integers (out, in): int8 −127…127, or int4 0…15."""
    q = m.qweight
    if m.bits == 8:
        return q[:, : m.in_features].to(torch.int16)
    return torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(q.shape[0], -1)[:, : m.in_features].to(torch.int16)


def _per_block(t: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """(R, groups) → (R, cols / 32): each block of 32 columns takes its group's value (group % 32 == 0)."""
    return t[:, torch.arange(0, cols, BLOCK) // group]


def _direct(m: WeightOnlyLinear, qtype_name: str, rows: torch.Tensor | None) -> np.ndarray | None:
    """GGUF blocks (R, blocks · bytes) from `m`'s stored integers, or None when they do not map exactly."""
    k = m.in_features
    if k % BLOCK or m.group_size % BLOCK:
        return None
    ints, scales, zps = _ints(m), m.scales.float(), m.zero_points.to(torch.int16)
    if rows is not None:
        ints, scales, zps = ints[rows], scales[rows], zps[rows]
    r, nb = ints.shape[0], k // BLOCK
    d = _per_block(scales, m.group_size, k).numpy().astype(np.float16).view(np.uint8).reshape(r, nb, 2)
    if qtype_name == "q8_0":
        if m.bits != 8:
            return None
        qs = ints.to(torch.int8).numpy().view(np.uint8).reshape(r, nb, BLOCK)
        return np.concatenate([d, qs], axis=-1).reshape(r, -1)
    if m.bits != 4:
        return None
    zp = _per_block(zps, m.group_size, k)  # (R, nb)
    q = ints.numpy().astype(np.uint8).reshape(r, nb, 2, BLOCK // 2)  # gguf packs a block's halves low, high
    qs = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    if qtype_name == "q4_0":
        if not bool((zps == 8).all()):
            return None
        return np.concatenate([d, qs], axis=-1).reshape(r, -1)
    if qtype_name == "q4_1":  # w = d·q + m, m = −zero_point · scale
        mins = (-zp.float() * _per_block(scales, m.group_size, k)).numpy().astype(np.float16)
        return np.concatenate([d, mins.view(np.uint8).reshape(r, nb, 2), qs], axis=-1).reshape(r, -1)
    return None


def encode(name: str, weight: torch.Tensor, module: nn.Module | None, qtype_name: str, rows: torch.Tensor | None,
           gguf) -> Encoded:
    """One tensor in the GGUF type: 1-D float32; 2-D directly from stored integers when they map, else the
    float weight quantized (requantized when it was integer)."""
    q = gguf.GGMLQuantizationType
    w = weight.detach().float()
    if rows is not None:
        w = w[rows]
    if w.ndim == 1 or qtype_name == "f32":
        return Encoded(w.numpy().astype(np.float32), q.F32, "float")
    if qtype_name == "f16" or w.shape[-1] % BLOCK:
        return Encoded(w.numpy().astype(np.float16), q.F16, "float" if module is None else "requantized")
    if qtype_name == "q4_k":
        how = "requantized" if module is not None else "float"
        if w.shape[-1] % q4_k.QK_K:  # llama-quantize's fallback for a row that no super-block fits
            return Encoded(gguf.quants.quantize(w.numpy().astype(np.float32), q.Q5_0), q.Q5_0, how)
        return Encoded(q4_k.quantize(w.numpy()), q.Q4_K, how)
    target = {"q8_0": q.Q8_0, "q4_0": q.Q4_0, "q4_1": q.Q4_1}[qtype_name]
    if isinstance(module, WeightOnlyLinear):
        blocks = _direct(module, qtype_name, rows)
        if blocks is not None:
            return Encoded(blocks, target, "direct")
    data = gguf.quants.quantize(w.numpy().astype(np.float32), target)
    return Encoded(data, target, "requantized" if module is not None else "float")


def _weights(hf: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """name → float tensor (quantized layers dequantized) and name → the quantized module of a `.weight`."""
    tensors, modules = {}, {}
    quantized = {n: m for n, m in hf.named_modules() if hasattr(m, "logical_weights")}
    for name, m in quantized.items():
        for key, t in m.logical_weights().items():
            tensors[f"{name}.{key}"] = t
        modules[f"{name}.weight"] = m
    conv1d = {n for n, m in hf.named_modules() if type(m).__name__ == "Conv1D"}
    for name, t in hf.state_dict().items():
        owner, _, key = name.rpartition(".")
        if owner not in quantized and t.is_floating_point():
            # transformers' Conv1D (GPT-2) holds its weight (in, out): GGUF holds the Linear's (out, in)
            tensors[name] = t.t() if owner in conv1d and key == "weight" else t
    return tensors, modules


@dataclass
class Plan:
    """What was written: the GGUF type, per tensor how (direct / requantized / float), and notes."""

    gguf_type: str
    how: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def write_gguf(model: nn.Module, config: dict, gguf_type: str, tokenizer_dir: Path, path: Path, name: str) -> Plan:
    """Write `model` (an HFModel causal LM of `config`) as GGUF at `path`."""
    gguf = require_gguf()
    arch_name = family(model, config)
    config = _standard_keys(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    hf = unwrap(model)
    blocks = int(config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(arch, blocks)
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or
                                                               config["num_attention_heads"])
    tensors, modules = _weights(hf)
    tied = getattr(hf, "lm_head", None) is not None and \
        hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    plan = Plan(gguf_type)
    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    _metadata(writer, config, arch_name, name, gguf_type, gguf)
    _tokenizer(writer, tokenizer_dir, int(config["vocab_size"]), gguf)
    for hf_name, t in tensors.items():
        if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
            continue  # buffers: rotary frequencies, GPT-2's causal mask (older transformers)
        if tied and hf_name.startswith("lm_head."):
            continue  # llama.cpp reads the embedding table as the output layer when output.weight is absent
        gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise InputError(f"--format gguf: no GGUF tensor for {hf_name} ({arch_name})",
                             hint="GGUF holds the standard layers of the family: export a model whose layers "
                                  "are unfactorized (no lowrank), or use --format onnx")
        rows = None
        if arch_name == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            rows = _rotary_rows(t.shape[0], heads)
        elif arch_name == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            rows = _rotary_rows(t.shape[0], kv_heads)
        big = gname in ("token_embd.weight", "output.weight")
        qtype_name = "q8_0" if big and gguf_type in FOUR_BIT else gguf_type
        if gname == "position_embd.weight":  # GPT-2's learned positions: float32, as the converter keeps them
            qtype_name = "f32"
        enc = encode(hf_name, t, modules.get(hf_name), qtype_name, rows, gguf)
        writer.add_tensor(gname, enc.data, raw_dtype=None if enc.qtype in (gguf.GGMLQuantizationType.F32,
                                                                          gguf.GGMLQuantizationType.F16)
                          else enc.qtype)
        plan.how[gname] = f"{enc.qtype.name} {enc.how}"
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    direct = sorted(n for n, h in plan.how.items() if h.endswith("direct"))
    requant = sorted(n for n, h in plan.how.items() if h.endswith("requantized"))
    if direct:
        plan.notes.append(f"{len(direct)} tensor(s) mapped directly from modelzip's integers into "
                          f"{gguf_type.upper()} blocks (only the scales rounded to float16)")
    if requant:
        plan.notes.append(f"{len(requant)} tensor(s) dequantized and requantized into the GGUF type (their "
                          f"grouping or scheme does not map onto its blocks): " + ", ".join(requant[:4])
                          + (" …" if len(requant) > 4 else ""))
    if gguf_type in FOUR_BIT:
        plan.notes.append("token_embd (and output) in Q8_0, as llama-quantize keeps them above 4 bits (it takes "
                          "Q6_K, which modelzip cannot write)")
    fallback = sorted(n for n, h in plan.how.items() if gguf_type == "q4_k" and h.startswith("Q5_0"))
    if fallback:
        plan.notes.append(f"{len(fallback)} tensor(s) in Q5_0: their rows are not a multiple of Q4_K's 256 "
                          "weights (llama-quantize's fallback): " + ", ".join(fallback[:4])
                          + (" …" if len(fallback) > 4 else ""))
    return plan


def _rope_theta(config: dict) -> float | None:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta") or (params.get("rope_theta") if isinstance(params, dict) else None)
    return None if theta is None else float(theta)


def _metadata(writer, config: dict, arch_name: str, name: str, gguf_type: str, gguf) -> None:
    """The converter's hyperparameters (TextModel / LlamaModel.set_gguf_parameters)."""
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
             "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S}[gguf_type]
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(int(config["num_hidden_layers"]))
    if config.get("max_position_embeddings"):
        writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    heads = int(config["num_attention_heads"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    if arch_name == "gpt2":  # learned positions, LayerNorm (GPT2Model.set_gguf_parameters)
        writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        return
    if (theta := _rope_theta(config)) is not None:
        writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
    if config.get("head_dim"):
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch_name == "llama":
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(int(head_dim))


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name of a byte-level BPE tokenizer's splitting, or exit 2."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return _GPT2_PRE
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    for part in parts:
        regex = (part.get("pattern") or {}).get("Regex") if part.get("type") == "Split" else None
        for known in ("qwen2", "llama-bpe"):
            if regex is not None and regex == GGUF_PRE_TOKENIZER_SPLITS[known]:
                return known
    raise UsageError("--format gguf: the tokenizer's pre-tokenizer is none that llama.cpp names (GPT-2's byte "
                     "level, Qwen2's or Llama-3's splitting)", hint="export with --format hf or onnx")


def _tokenizer(writer, folder: Path, vocab_size: int, gguf) -> None:
    """tokenizer.ggml.*: llama.cpp's `gpt2` model (byte-level BPE), tokens with their types, merges and special
    token ids (as convert_hf_to_gguf.py's _set_vocab_gpt2)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"--format gguf needs the model's tokenizer: {folder} has no tokenizer.json",
                         hint="pass --tokenizer DIR (the Hugging Face directory the model came from)")
    data = json.loads(path.read_text())
    if (data.get("model") or {}).get("type") != "BPE":
        raise UsageError("--format gguf writes byte-level BPE tokenizers; this one is "
                         f"{(data.get('model') or {}).get('type')}", hint="export with --format hf or onnx")
    transformers = require_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise InputError(f"{folder}: transformers cannot load its tokenizer ({first_line(exc)})") from None
    vocab = tok.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    specials = set(tok.all_special_tokens)
    tokens, types = [], []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------------
# Reading back


def read_back(path: Path, plan: Plan) -> dict:
    """The gguf reader's view of the written file: every tensor the plan wrote, of the type it wrote."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t.tensor_type.name for t in reader.tensors}
    missing = sorted(set(plan.how) - set(found))
    wrong = sorted(n for n in plan.how if n in found and found[n] != plan.how[n].split()[0])
    if missing or wrong:
        raise InputError(f"the written GGUF does not hold what was written (missing {missing[:3]}, wrong type "
                         f"{wrong[:3]}); nothing was written")
    types: dict[str, int] = {}
    for t in found.values():
        types[t] = types.get(t, 0) + 1
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    return {"tensors": len(found), "types": types, "architecture": arch}


TOKENIZER_PROBE = ("def read(path: str) -> bytes:\n    \"\"\"Return the file's bytes.\"\"\"\n"
                   "    return open(path, 'rb').read()  # 3 + 4 = 7, naïve café\n\n\tThe end. <|endoftext|>")


def check_tokenizer(path: Path, folder: Path) -> dict:
    """The tokenizer transformers rebuilds from the file's metadata tokenizes a probe text (code, numbers,
    whitespace, accents, a special token) into the same ids as the model's own; else the file is refused."""
    transformers = require_transformers()
    path = Path(path)
    try:
        ours = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise InputError(f"transformers cannot rebuild the tokenizer from the written GGUF ({first_line(exc)}); "
                         "nothing was written") from None
    a, b = ours(TOKENIZER_PROBE)["input_ids"], theirs(TOKENIZER_PROBE)["input_ids"]
    if a != b:
        raise InputError(f"the GGUF's tokenizer does not tokenize as the model's own ({len(a)} ids against "
                         f"{len(b)} on a probe text); nothing was written", hint="check the tokenizer directory")
    return {"probe_tokens": len(a), "same_ids": True}
