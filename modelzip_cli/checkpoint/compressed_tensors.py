"""compressed-tensors: the quantized Hugging Face directories that transformers (with the `compressed-tensors`
package), vLLM and SGLang load, written from modelzip's quantized Linears and read back as modelzip models.

modelzip's weight-only codec (edits.WeightOnlyLinear) and compressed-tensors' `pack-quantized` format describe
the same integers, shifted:

- int4: modelzip stores u in 0..15 with a zero point z in 0..15 per group (asymmetric), w = (u − z)·s.
  compressed-tensors stores signed q in −8..7 and a signed zero point: q = u − 8, zp = z − 8 give the same
  w = (q − zp)·s. Written as `symmetric: false` with `weight_zero_point` (packed along the output rows, as
  the format packs zero points). Read back, a symmetric int4 scheme (llm-compressor's W4A16) is z = 8.
- int8: modelzip is symmetric ±127 (zero point 0), compressed-tensors' symmetric int8: the same integers.
- groups: modelzip's groups are `group_size` contiguous input columns, the last one padded; a layer no wider
  than the group size has one group per row, which compressed-tensors calls the `channel` strategy.
- dynamic int8 (W8A8): int8 weights symmetric per output channel (`weight_scale` (out, 1)), activations
  quantized per token (or per tensor) at run time: `int-quantized`.

Each distinct scheme is one config group whose `targets` name its layers exactly; `ignore` lists every other
Linear (kept float). Packing and the config classes are the compressed-tensors package's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modelzip_cli.checkpoint.edits import WeightOnlyEdit
from modelzip_cli.errors import InputError, UsageError, first_line
from modelzip_cli.nn import int8
from modelzip_cli.nn.surgery import replace_module, to_dtype
from modelzip_cli.nn.weight_only import Quantized, WeightOnlyLinear

QUANT_METHOD = "compressed-tensors"
EXTRA_HINT = "pip install 'modelzip[compressed-tensors]'"


def require() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UsageError("compressed-tensors directories need the compressed-tensors package",
                         hint=EXTRA_HINT) from None


def is_compressed(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass
class Compressed:
    """A model's quantized Linears in compressed-tensors form: tensors keyed like the model's state dict, and
    the `quantization_config` of config.json."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    schemes: list[str] = field(default_factory=list)  # W4A16, W8A16, W8A8: what was written, for the report


def _weight_args(m: nn.Module) -> dict:
    """QuantizationArgs fields of a quantized Linear's weights."""
    if isinstance(m, WeightOnlyLinear):
        grouped = m.group_size < m.in_features
        return {"num_bits": m.bits, "type": "int", "symmetric": m.bits == 8, "dynamic": False,
                "strategy": "group" if grouped else "channel", "group_size": m.group_size if grouped else None}
    return {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "channel"}


def _input_args(m: nn.Module) -> dict | None:
    if isinstance(m, int8.DynamicInt8Linear):
        return {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                "strategy": "token" if m.act == "per-token" else "tensor"}
    return None


def scheme_name(m: nn.Module) -> str:
    return f"W{_weight_args(m)['num_bits']}A{8 if _input_args(m) else 16}"


def check_exportable(name: str, m: nn.Module) -> None:
    """A quantized module compressed-tensors can hold, or exit 2 saying why not."""
    if isinstance(m, int8.DynamicInt8Linear) and m.smoothed:
        raise UsageError(f"{name} divides its input by per-channel smoothing scales before quantizing it; "
                         "compressed-tensors' W8A8 has no such step",
                         hint="quantize with --smoothing off (or fold the scales into the norms), or export "
                              "--format onnx")
    if isinstance(m, int8._Int8Weighted) and not isinstance(m, int8.DynamicInt8Linear):
        raise UsageError(f"{name} is static int8 (calibrated per-tensor activations); compressed-tensors export "
                         "covers weight-only int4/int8 and dynamic int8", hint="export --format onnx")


def _packed(m: WeightOnlyLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """weight_packed (int32), weight_scale, weight_shape and, for int4, weight_zero_point of one layer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rows = m.out_features
    if m.bits == 8:
        ints = m.qweight.to(torch.int16)
    else:  # two nibbles per byte, low first (edits.WeightOnlyLinear._store)
        ints = torch.stack([m.qweight & 0x0F, m.qweight >> 4], dim=-1).reshape(rows, -1).to(torch.int16)
    q = ints[:, : m.in_features]
    zp = m.zero_points.to(torch.int16)
    if m.bits == 4:  # unsigned 0..15 → the format's signed −8..7
        q, zp = q - 8, zp - 8
    out = {"weight_packed": pack_to_int32(q.to(torch.int8).contiguous(), m.bits),
           "weight_scale": m.scales.to(dtype).contiguous(),  # (out, groups)
           "weight_shape": torch.tensor([rows, m.in_features], dtype=torch.int64)}
    if m.bits == 4:
        out["weight_zero_point"] = pack_to_int32(zp.to(torch.int8).contiguous(), 4, packed_dim=0)
    return out


def compress(quantized: dict[str, nn.Module], float_linears: list[str], dtype: torch.dtype) -> Compressed:
    """compressed-tensors tensors and config for `quantized` (name → modelzip quantized Linear); every name of
    `float_linears` (the Linears kept float) goes to `ignore`."""
    require()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    result = Compressed()
    groups: dict[tuple, list[str]] = {}
    formats = set()
    for name, m in quantized.items():
        check_exportable(name, m)
        key = (tuple(sorted(_weight_args(m).items(), key=str)), tuple(sorted((_input_args(m) or {}).items())))
        groups.setdefault(key, []).append(name)
        if isinstance(m, WeightOnlyLinear):
            formats.add("pack-quantized")
            result.tensors.update({f"{name}.{k}": v for k, v in _packed(m, dtype).items()})
        else:
            formats.add("int-quantized")
            result.tensors[f"{name}.weight"] = m.qweight.contiguous()  # (out, in) int8
            result.tensors[f"{name}.weight_scale"] = m.weight_scale.to(dtype).reshape(-1, 1).contiguous()
        if m.bias is not None:
            result.tensors[f"{name}.bias"] = m.bias.detach().to(dtype).contiguous()
    config_groups = {}
    for i, ((weights, inputs), names) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        m = quantized[names[0]]
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=sorted(names), weights=QuantizationArgs(**dict(weights)),
            input_activations=QuantizationArgs(**dict(inputs)) if inputs else None,
            format="pack-quantized" if isinstance(m, WeightOnlyLinear) else "int-quantized")
        result.schemes.append(scheme_name(m))
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    qc = QuantizationConfig(config_groups=config_groups, format=fmt, quantization_status="compressed",
                            ignore=sorted(float_linears))
    result.config = {**qc.model_dump(mode="json", exclude_none=True), "quant_method": QUANT_METHOD}
    result.schemes = sorted(set(result.schemes))
    return result


# ---------------------------------------------------------------------------------------------------
# Reading: a compressed-tensors directory as a modelzip model


@dataclass
class Layer:
    """One quantized Linear read from a directory: its modelzip weight-only integers when the scheme maps
    exactly, else its dequantized float weight."""

    name: str
    bits: int | None = None
    group_size: int | None = None
    ints: torch.Tensor | None = None  # (out, in) int64 in modelzip's range
    scales: torch.Tensor | None = None  # (out, groups) float32
    zero_points: torch.Tensor | None = None  # (out, groups) int64
    weight: torch.Tensor | None = None  # (out, in) dequantized, when not exact


def schemes_by_layer(qc: dict, model: nn.Module) -> dict[str, object]:
    """Linear name (in `model`) → its QuantizationScheme, by compressed-tensors' own target matching."""
    require()
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import match_named_modules

    try:
        config = QuantizationConfig.model_validate(qc)
    except Exception as exc:
        raise InputError(f"the quantization_config of config.json is not one compressed-tensors reads "
                         f"({first_line(exc)})") from None
    out: dict[str, object] = {}
    for scheme in config.config_groups.values():
        for name, m in match_named_modules(model, list(scheme.targets), config.ignore or []):
            if isinstance(m, nn.Linear):
                out[name] = scheme
    return out


def read_layer(name: str, tensors: dict[str, torch.Tensor], scheme) -> Layer:
    """A quantized Linear's stored tensors (`tensors`: `weight_*` keys of that layer) → a Layer."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = scheme.weights
    if w is None or w.type != "int" or w.dynamic not in (False, "false"):
        raise InputError(f"{name}: compressed-tensors scheme {w} is not an integer weight scheme modelzip reads",
                         hint="modelzip reads int4/int8 weight schemes (pack-quantized, int-quantized)")
    scale = tensors["weight_scale"].float()
    if "weight_packed" in tensors:
        shape = [int(v) for v in tensors["weight_shape"].tolist()]
        q = unpack_from_int32(tensors["weight_packed"], w.num_bits, torch.Size(shape)).to(torch.int64)
    else:
        q = tensors["weight"].to(torch.int64)
    out, cols = q.shape
    zp = tensors.get("weight_zero_point")
    if zp is not None and "weight_packed" in tensors and zp.dtype == torch.int32:
        zp = unpack_from_int32(zp, w.num_bits, torch.Size([out, scale.shape[-1]]), packed_dim=0)
    zp = torch.zeros(scale.shape, dtype=torch.int64) if zp is None else zp.to(torch.int64).reshape(scale.shape)
    strategy = str(w.strategy)
    group = w.group_size if strategy.endswith("group") else cols if strategy.endswith("channel") else None
    if scale.ndim != 2 or group is None or scale.shape[0] != out or scale.shape[1] != math.ceil(cols / group):
        return Layer(name, weight=_dequantized(q, scale, zp, group or cols))
    if w.num_bits == 4:  # signed −8..7 → modelzip's 0..15
        return Layer(name, bits=4, group_size=group, ints=q + 8, scales=scale, zero_points=zp + 8)
    if w.num_bits == 8 and not zp.any() and q.abs().max() <= int8.WMAX:
        return Layer(name, bits=8, group_size=group, ints=q, scales=scale, zero_points=zp)
    return Layer(name, weight=_dequantized(q, scale, zp, group))


def _dequantized(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, group: int) -> torch.Tensor:
    if scale.numel() == 1:
        return (q - zp.reshape(())) * scale.reshape(())
    index = torch.arange(q.shape[1]) // group  # column → its group
    return (q - zp[:, index]).float() * scale.reshape(q.shape[0], -1)[:, index]


def weight_only_layer(linear: nn.Linear, layer: Layer) -> WeightOnlyLinear:
    group = 0 if layer.group_size >= linear.in_features else layer.group_size
    return WeightOnlyLinear.from_quantized(linear, Quantized(layer.ints, layer.scales, layer.zero_points),
                                           layer.bits, group)



def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        raise InputError(f"{path} is a compressed-tensors directory without .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as exc:
            raise InputError(f"{f}: not a readable safetensors file ({first_line(exc)})") from None
    return tensors


def load_dir(path: Path, task: str | None, output_key: str | None) -> tuple[nn.Module, dict, list[dict], list[str]]:
    """A compressed-tensors directory as a modelzip model: the float architecture built from config.json (no
    remote code), each quantized Linear read into modelzip's weight-only format where its scheme maps exactly
    (int4 symmetric or not, int8 symmetric within ±127, grouped or per channel), else dequantized to float; the
    other tensors loaded strictly. Returns the HFModel, its config (without quantization_config), the
    weight-only edits that rebuild it, and notes."""
    from modelzip_cli import hf

    require()
    config = hf.read_config(path)
    hf.check_files(path)
    plain = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version",
                                                          "_name_or_path")}
    task = hf.task_for(plain, task)
    hf.check_declared(path, task, plain)
    model = hf.build(task, plain, output_key)
    inner = model.model
    tensors = _read_tensors(path)
    schemes = schemes_by_layer(config["quantization_config"], inner)
    exact: dict[tuple[int, int], list[str]] = {}
    dequantized: list[str] = []
    for name, scheme in schemes.items():
        own = {k[len(name) + 1:]: tensors.pop(k) for k in [k for k in tensors if k.startswith(name + ".")]
               if not k[len(name) + 1:].startswith("bias")}
        if "weight_scale" not in own:
            raise InputError(f"{path}: {name} is quantized by config.json but its weight_scale is missing")
        layer = read_layer(name, own, scheme)
        linear = inner.get_submodule(name)
        if layer.ints is not None:
            new = weight_only_layer(linear, layer)
            if linear.bias is not None and f"{name}.bias" in tensors:
                new.bias.data.copy_(tensors.pop(f"{name}.bias"))
            replace_module(inner, name, new)
            exact.setdefault((layer.bits, 0 if layer.group_size >= linear.in_features else layer.group_size),
                             []).append(name)
        else:
            tensors[f"{name}.weight"] = layer.weight
            dequantized.append(name)
    missing, unexpected = inner.load_state_dict(tensors, strict=False)
    loaded_params = {id(p) for n, p in inner.named_parameters() if n in tensors}
    params = dict(inner.named_parameters())
    replaced = tuple(f"{n}." for names in exact.values() for n in names)
    missing = [k for k in missing if not k.startswith(replaced)  # read above
               and not (k in params and id(params[k]) in loaded_params)]  # tied weights
    if missing or unexpected:
        what = f"lack {missing[0]}" if missing else f"hold {unexpected[0]}, which the model has no place for"
        raise InputError(f"{path}: the weights {what}", hint="check that config.json matches the weights")
    if hasattr(inner, "tie_weights"):
        inner.tie_weights()
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    if floats and floats[0] != torch.float32:
        to_dtype(model, floats[0])
    edits = [WeightOnlyEdit(modules=[f"model.{n}" for n in names], bits=bits, group_size=group).to_dict()
             for (bits, group), names in sorted(exact.items())]
    notes = []
    if exact:
        notes.append(f"compressed-tensors directory: {sum(map(len, exact.values()))} quantized Linear(s) read into "
                     "modelzip's weight-only format exactly (" + ", ".join(
                         f"int{b} {'group ' + str(g) if g else 'per channel'}" for b, g in sorted(exact)) + ")")
    if dequantized:
        notes.append(f"compressed-tensors directory: {len(dequantized)} quantized Linear(s) dequantized to float on "
                     f"load (their scheme has no exact modelzip form, e.g. {dequantized[0]}); activation "
                     "quantization, if any, is not kept")
    config = {k: v for k, v in model.model.config.to_dict().items()
              if k not in ("quantization_config", "transformers_version", "_name_or_path")}
    return model.eval(), config, edits, notes


def dequantize(model: nn.Module, edits: list[dict]) -> tuple[list[dict], str]:
    """Replace the weight-only Linears read from a compressed-tensors directory by float Linears holding their
    dequantized weights (for a technique that works on float models); the edits without theirs, and a note."""
    names = [n for n, m in model.named_modules() if type(m) is WeightOnlyLinear]
    for name in names:
        m = model.get_submodule(name)
        linear = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(m.dequantized_weight())
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        replace_module(model, name, linear)
    kept = [e for e in edits if e.get("kind") != WeightOnlyEdit.kind]
    return kept, (f"the compressed-tensors input's {len(names)} quantized Linear(s) dequantized to float for this "
                  "float-only technique")


def only_weight_only(edits: list[dict]) -> bool:
    """Whether every edit is the weight-only quantization a compressed-tensors directory was read into."""
    return all(e.get("kind") == WeightOnlyEdit.kind for e in edits)
