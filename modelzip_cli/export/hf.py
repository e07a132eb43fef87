"""`export --format hf | compressed-tensors`: a Hugging Face directory that transformers' `from_pretrained` loads
without modelzip, checked by loading it back before the command says done.

- `hf`: dense float weights (safetensors) and a `config.json` whose widths are the model's own: structured
  pruning's smaller `intermediate_size` (`n_inner`), `num_attention_heads`, `num_key_value_heads`, where every
  layer has the same widths (a model whose layers differ says so, exit 2). Low-rank factorized Linears are
  multiplied back into one dense Linear (a standard config has no place for two factors): the directory
  computes the same function but holds the full-rank parameter count, and the report says so. Quantized
  models are refused: `--format compressed-tensors` keeps their integers.
- `compressed-tensors`: the same dense skeleton, with weight-only int4/int8 Linears (RTN, GPTQ, AWQ) as
  W4A16/W8A16 `pack-quantized` and dynamic int8 ones as W8A8 `int-quantized` (ctformat.py).

Tokenizer files and the generation config are copied from the input directory when the model came from one.
The check loads the written directory with the Auto class the model was built with and compares its outputs
with modelzip's on the example input and on `--eval-data`: max |Δ| within TOLERANCE × max |output|, else the
gate fails (exit 1, the directory and report written, the figures in the report).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modelzip_cli import hf
from modelzip_cli.checkpoint import compressed_tensors as ctformat
from modelzip_cli.checkpoint.edits import LowRankEdit
from modelzip_cli.checkpoint.io import Loaded
from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.errors import InputError, OutputError, UsageError, first_line
from modelzip_cli.export.onnx import ExportConfig, Written, as_data_input, example_args, scheme_of
from modelzip_cli.files import Outputs, check_output, disk_bytes, inside, same_file
from modelzip_cli.kernels import weight_only as wo_kernels
from modelzip_cli.measure.report import Gate, Report, Step
from modelzip_cli.nn import int8
from modelzip_cli.nn.weight_only import WeightOnlyEmbedding, WeightOnlyLinear
from modelzip_cli.pipeline.data import Dataset

DIR_FORMATS = ("hf", "compressed-tensors")
DIR_SUFFIXES = {"hf": "-hf", "compressed-tensors": "-compressed-tensors"}
TOLERANCE = 1e-3  # the written directory's max |Δ| from modelzip's outputs, relative to max |output|
# W8A8: transformers' compressed-tensors runtime rounds activations to amax/127.5 steps, modelzip (and vLLM's
# int8 kernels) to amax/127: the two grids differ by 0.4%, so the logits cannot agree to TOLERANCE (1.3e-2
# measured on a random tiny Llama). Such a directory is held to the stated tolerance for quantized
# exports instead: every sample's output cosine to modelzip's at least W8A8_MIN_COSINE.
W8A8_MIN_COSINE = 0.999
# files of a model directory that travel with the weights
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
          "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
# config key → module-name suffixes whose output width it is, and whether it counts heads (width / head_dim)
WIDTHS = (("intermediate_size", ("mlp.up_proj", "mlp.gate_proj", "mlp.fc1", "intermediate.dense"), False),
          ("n_inner", ("mlp.c_fc",), False),
          ("num_attention_heads", ("self_attn.q_proj",), True),
          ("num_key_value_heads", ("self_attn.k_proj",), True))


def default_output(path: Path, fmt: str) -> Path:
    """model.safetensors → model-hf/ beside it; a model directory DIR → DIR-hf in the current directory."""
    name = (path.resolve().name if path.is_dir() else path.stem) + DIR_SUFFIXES[fmt]
    return Path(name) if path.is_dir() else path.with_name(name)


def check_dir_output(output: Path, *, inputs: list[Path], force: bool) -> None:
    """A directory output: never an input nor inside one; an existing one is replaced only with --force and
    only when it is a model directory (holds config.json), never any other folder."""
    for inp in inputs:
        if same_file(output, inp) or inside(output, inp) or inside(inp, output):
            raise OutputError(f"output {output} is or holds an input of this run ({inp}); modelzip never modifies "
                              "its inputs", hint="write it somewhere else")
    if output.exists():
        if not force:
            raise OutputError(f"output {output} already exists", hint="pass --force to replace it")
        if not (output.is_dir() and (output / "config.json").is_file()):
            raise OutputError(f"output {output} exists and is not a model directory; --force replaces only a "
                              "directory holding a config.json", hint="choose another -o")
    check_output(output.with_name(output.name + ".probe"), inputs=inputs, force=True, suffixes=(".probe",))


# ---------------------------------------------------------------------------------------------------
# The dense skeleton


@dataclass
class Dense:
    """The transformers model that the directory holds (float, with the model's own widths in its config), the
    modelzip quantized Linears by name in it, and what the conversion changed."""

    model: nn.Module
    task: str
    output_key: str | None
    quantized: dict[str, nn.Module] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _hf_parts(loaded: Loaded) -> tuple[nn.Module, str, str | None, dict]:
    arch = loaded.manifest.arch or ""
    if not (arch.startswith("hf:") and isinstance(loaded.model, hf.HFModel)):
        raise UsageError(f"{loaded.path or 'the model'} is not a Hugging Face model ({arch or 'no architecture'}); "
                         "a Hugging Face directory holds one", hint="export --format onnx or pt2")
    kwargs = loaded.manifest.arch_kwargs
    return loaded.model.model, arch[3:], kwargs.get("output_key"), dict(kwargs.get("config") or {})


def _out_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.Sequential) and len(m) and hasattr(m[-1], "out_features"):
        return m[-1].out_features
    if type(m).__name__ == "Conv1D":  # transformers' transposed Linear: weight (in, out)
        return int(m.weight.shape[1])
    return getattr(m, "out_features", None)


def new_widths(inner: nn.Module, config: dict) -> dict:
    """The config values the model's layers now have (module docstring), or exit 2 when layers differ."""
    heads = config.get("num_attention_heads") or config.get("n_head")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    modules = dict(inner.named_modules())
    updates = {}
    for key, suffixes, counts_heads in WIDTHS:
        if key not in config:
            continue
        found = {n: _out_width(m) for n, m in modules.items() if n.endswith(suffixes) and _out_width(m)}
        if not found:
            continue
        values = {w // head_dim if counts_heads and head_dim else w for w in found.values()}
        if len(values) > 1:
            by = sorted(found.items(), key=lambda kv: kv[1])
            raise UsageError(f"the layers differ in width ({key}: {by[0][1]} in {by[0][0]}, {by[-1][1]} in "
                             f"{by[-1][0]}); a config.json holds one width for every layer",
                             hint="prune --method structured --uniform keeps them equal, or export --format onnx")
        value = values.pop()
        if config[key] is not None and value != config[key] or key == "n_inner" and config[key] is None \
                and value != 4 * config.get("n_embd", 0):
            updates[key] = value
    if head_dim and {"num_attention_heads", "num_key_value_heads"} & set(updates) and "head_dim" not in config:
        updates["head_dim"] = head_dim  # fewer heads of the same size: the default hidden / heads would change it
    return updates


def _float_dtype(inner: nn.Module) -> torch.dtype:
    return next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32)


def dense_state(inner: nn.Module, lowrank: set[str], keep_quantized: bool) -> tuple[dict, dict, list[str]]:
    """The float state dict of `inner` with its modelzip modules undone (module docstring), the quantized
    Linears kept for compressed-tensors, and notes."""
    dtype = _float_dtype(inner)
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, nn.Module] = {}
    notes: list[str] = []
    done: list[str] = []  # prefixes whose submodules are already covered

    def emit(prefix: str, tensors: dict) -> None:
        state.update({f"{prefix}{k}": v.detach() for k, v in tensors.items()})

    for name, m in inner.named_modules():
        if any(name.startswith(d + ".") for d in done):
            continue
        prefix = f"{name}." if name else ""
        if name in lowrank and isinstance(m, nn.Sequential):
            first, second = m[0], m[1]
            if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
                raise UsageError(f"{name} is a low-rank pair holding quantized factors, which cannot be multiplied "
                                 "back into one Linear", hint="export the float low-rank model, then quantize")
            weight = second.weight.detach().double() @ first.weight.detach().double()  # (out, r) @ (r, in)
            emit(prefix, {"weight": weight.to(dtype), **({"bias": second.bias} if second.bias is not None else {})})
            done.append(name)
        elif isinstance(m, WeightOnlyEmbedding):
            emit(prefix, {"weight": m.dequantized_weight().to(dtype)})
            done.append(name)
            notes.append(f"{name}: the weight-only quantized embedding is stored dequantized (float)")
        elif isinstance(m, WeightOnlyLinear | int8._Int8Weighted):
            if not keep_quantized:
                raise UsageError(f"the model is quantized ({getattr(m, 'scheme', 'int8')} in {name}); a dense "
                                 "Hugging Face directory would hold its weights dequantized to float",
                                 hint="export --format compressed-tensors (its integers, for transformers and vLLM)")
            ctformat.check_exportable(name, m)
            quantized[name] = m
            emit(prefix, {"weight": m.dequantized_weight().to(dtype),
                          **({"bias": m.bias.to(dtype)} if m.bias is not None else {})})
            done.append(name)
        else:
            emit(prefix, dict(m.named_parameters(recurse=False)))
            emit(prefix, {k: b for k, b in m.named_buffers(recurse=False)
                          if k not in m._non_persistent_buffers_set})
    if lowrank:
        notes.append(f"{len(lowrank)} low-rank factorized Linear(s) multiplied back into dense Linears: a "
                     "config.json has no place for two factors, so the directory holds the full-rank parameters")
    return state, quantized, notes


def dense_model(loaded: Loaded, *, keep_quantized: bool) -> Dense:
    """The transformers model the directory will hold, built afresh from the new config and loaded strictly
    (a width the config cannot express fails here, before anything is written)."""
    inner, task, output_key, config = _hf_parts(loaded)
    lowrank = {n.removeprefix("model.") for e in loaded.manifest.edits if e.get("kind") == LowRankEdit.kind
               for n in e.get("ranks", {})}
    state, quantized, notes = dense_state(inner, lowrank, keep_quantized)
    updates = new_widths(inner, config)
    if updates:
        notes.append("config.json widths: " + ", ".join(f"{k} {config.get(k)} → {v}" for k, v in updates.items()))
    with torch.random.fork_rng():
        model = hf.build(task, {**config, **updates}, output_key).model
    # transformers' Conv1D (GPT-2 and kin) holds the transpose of the Linear modelzip computes it as
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    state = {k: v.t().contiguous() if k.endswith(".weight") and k.rpartition(".")[0] in conv1d else v
             for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), first_line(exc))
        raise UsageError(f"the model's widths cannot be written in a {config.get('model_type')} config.json: "
                         f"{detail[:200]}", hint="export --format onnx or pt2") from None
    model = model.to(_float_dtype(inner)).eval()
    return Dense(model, task, output_key, quantized, notes)


# ---------------------------------------------------------------------------------------------------
# Writing


def _float_linears(model: nn.Module, quantized: dict) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


def write_dir(dense: Dense, fmt: str, folder: Path, source: Path | None) -> list[str]:
    """Write `dense` as a `fmt` directory into `folder` (empty); the notes of what was written."""
    notes = []
    model = dense.model
    if fmt == "hf":
        model.save_pretrained(str(folder))
    else:
        packed = ctformat.compress(dense.quantized, _float_linears(model, dense.quantized), _float_dtype(model))
        state = {k: v for k, v in model.state_dict().items()
                 if k.rpartition(".")[0] not in dense.quantized}
        state.update(packed.tensors)
        model.config.quantization_config = packed.config
        try:
            model.save_pretrained(str(folder), state_dict=state)
        finally:
            del model.config.quantization_config
        notes.append(f"compressed-tensors {', '.join(packed.schemes)} ({packed.config['format']}): "
                     f"{len(dense.quantized)} quantized Linear(s); {len(packed.config.get('ignore', []))} kept "
                     "float, listed in ignore")
    copied = [n for n in COPIED if source is not None and source.is_dir() and (source / n).is_file()]
    for name in copied:
        shutil.copyfile(source / name, folder / name)
    if not any(n.startswith(("tokenizer", "vocab")) for n in copied):
        notes.append("no tokenizer files copied: the input is not a Hugging Face directory holding them; copy them "
                     "from the original model directory")
    return notes


def load_written(folder: Path, dense: Dense) -> hf.HFModel:
    """The written directory through transformers' own loader (the Auto class of the model's task)."""
    transformers = hf.require_transformers()
    auto = getattr(transformers, hf.TASKS[dense.task])
    try:  # compressed-tensors draws progress bars on stderr while it packs and unpacks
        with contextlib.redirect_stderr(io.StringIO()):
            model = auto.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
            written = hf.HFModel(model.eval(), dense.output_key, dense.task)
            with torch.inference_mode():
                written(torch.ones(1, 2, dtype=torch.long) if dense.task != "image-classification"
                        else torch.zeros(1, 3, 8, 8))
    except Exception as exc:
        raise InputError(f"transformers cannot load the written directory: {first_line(exc, 200)}",
                         hint="report this as a bug, with MODELZIP_DEBUG=1") from None
    return written


def compare(reference: nn.Module, written: nn.Module, inputs: list[torch.Tensor], *, exact_int8: bool) -> dict:
    """Max |Δ| of the written directory's outputs from modelzip's over `inputs`, relative to max |output|.
    The reference runs modelzip's documented numerics: weight-only on dequantized weights, dynamic int8 with
    activations quantized per token (int_mm), as the directory's runtime computes them."""
    worst, scale, cosine = 0.0, 0.0, 1.0
    kernel = "int_mm" if exact_int8 else "float"
    for x in inputs:
        with torch.inference_mode(), int8.use_backend("plain"), int8.use_kernel(kernel), \
                wo_kernels.use_kernel("float"):
            ref = reference(x).float()
            out = written(x).float()
        if ref.shape != out.shape:
            return {"max_abs_diff": None, "max_abs_output": float(ref.abs().max()), "relative": None,
                    "shapes": [list(ref.shape), list(out.shape)]}
        worst = max(worst, float((ref - out).abs().max()))
        cos = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1), dim=1, eps=1e-12)
        cosine = min(cosine, float(cos.min()))
        scale = max(scale, float(ref.abs().max()))
    return {"max_abs_diff": worst, "max_abs_output": scale, "relative": worst / max(scale, 1e-12),
            "cosine_min": cosine}


def check_inputs(example: list[torch.Tensor], data: Dataset | None, limit: int = 64) -> list[torch.Tensor]:
    inputs = list(example)
    if data is not None:
        x = data.inputs[:limit]
        inputs += [x[i:i + 16] for i in range(0, len(x), 16)]
    return inputs


def export_directory(loaded: Loaded, cfg: ExportConfig, output: Path, staged: Outputs,
                     data: Dataset | None) -> Written:
    """`--format hf | compressed-tensors` (py): written, loaded back by transformers, compared."""
    t0 = time.perf_counter()
    dense = dense_model(loaded, keep_quantized=cfg.format == "compressed-tensors")
    if cfg.format == "compressed-tensors" and not dense.quantized:
        raise UsageError("the model has no quantized Linear for compressed-tensors to hold",
                         hint="export --format hf for a float model, or quantize it first (weight-only or dynamic)")
    notes = list(dense.notes)
    source = loaded.path if loaded.path is not None and loaded.path.is_dir() else None
    folder = staged.write_folder(output, lambda tmp: notes.extend(write_dir(dense, cfg.format, tmp, source)))
    duration = round(time.perf_counter() - t0, 4)
    runner = load_written(folder, dense)
    length = loaded.manifest.input_shape[-1]
    example = [as_data_input(example_args(loaded, b, n, seed=1)) for b in (1, 3) for n in (length, max(2, length // 2))]
    dynamic = any(isinstance(m, int8.DynamicInt8Linear) for m in dense.quantized.values())
    check = compare(loaded.model, runner, check_inputs(example, data), exact_int8=dynamic)
    check.update(tolerance=TOLERANCE, min_cosine=W8A8_MIN_COSINE if dynamic else None)
    if dynamic:
        notes.append("W8A8: transformers rounds activations to amax/127.5 steps, modelzip and vLLM to amax/127; "
                     f"checked to cosine ≥ {W8A8_MIN_COSINE} when max |Δ| exceeds "
                     f"{TOLERANCE:g} of max |output|")
    after = {"format": cfg.format, "parameters": count_parameters(dense.model), "bytes": disk_bytes(folder),
             "int8": None, "scheme": scheme_of(loaded.manifest), "inputs": ["input_ids", "attention_mask"],
             "check": check}
    step = Step(op="export", config=cfg.to_dict(), before={"parameters": count_parameters(loaded.model)},
                after=after, duration_s=duration, notes=notes)
    return Written(output, runner, step)


def gate(report: Report, check: dict | None) -> None:
    """The export's own gate: the written directory must reproduce the model (exit 1 with the figures)."""
    if check is None:
        return
    passed = check["relative"] is not None and (check["relative"] <= check["tolerance"] or
                                                check.get("min_cosine") is not None
                                                and check["cosine_min"] >= check["min_cosine"])
    gate = report.gate = report.gate or Gate()
    gate.export_check = check
    if passed:
        return
    if check["relative"] is None:
        gate.fail(f"the written directory's outputs have shape {check['shapes'][1]}, modelzip's {check['shapes'][0]}")
        return
    gate.fail(f"the written directory's outputs differ from modelzip's by max |Δ| {check['max_abs_diff']:.3g} "
              f"({check['relative']:.2e} of max |output| {check['max_abs_output']:.3g}), more than "
              f"{check['tolerance']:g}" + (f", and a cosine of {check['cosine_min']:.5f}, below {check['min_cosine']}"
                                           if check.get("min_cosine") else ""))
