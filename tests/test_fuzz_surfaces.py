"""Property-based fuzzing of the surfaces the last wave added (issue 26, "Must show"): Hugging Face folders,
tokenizers, image folders, ONNX files and plans, mutated and fed to the commands that read them.

The property is test_fuzz.py's: never exit 3 (nor a crash, nor a hang: the worker answers within 60 s), and on
exit 2 exactly one `modelzip: error:` line and nothing written. Cases run in one worker process under a 4 GB
address-space limit; the memory limit modelzip checks sizes against is the room left under it. Hypothesis is
derandomized: CI sees the examples checked here. 510 cases here and 510 in test_fuzz.py: 1,020 in `make test`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from .cli_worker import Worker
from .conftest import DIGITS_TEACHER
from .test_fuzz import HUGE, SETTINGS, WRONG, check, edit_path, json_paths, mutate_bytes

# A file put where a regular file is expected: each must be refused, never read until it ends.
SPECIAL = ["fifo", "/dev/zero", "dangling link", "directory", "empty"]


def special(path: Path, kind: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "dangling link":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"")


@pytest.fixture(scope="module")
def worker():
    w = Worker(timeout=60)
    yield w
    w.close()


class Surfaces:
    """The originals every case mutates a copy of, made once per module."""

    def __init__(self, folder: Path):
        transformers = pytest.importorskip("transformers")
        from safetensors.torch import save_file

        self.folder = folder
        self.n = 0
        # a Hugging Face folder: a 1-layer BERT of width 16, and token data to run it on
        config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=64, max_position_embeddings=32)
        torch.manual_seed(0)
        self.bert = folder / "bert"
        transformers.BertModel(config).save_pretrained(self.bert)
        self.bert_config = json.loads((self.bert / "config.json").read_text())
        self.tokens = folder / "tokens.safetensors"
        save_file({"inputs": torch.randint(1, 64, (4, 8))}, str(self.tokens))
        # a tokenizer: a WordPiece vocabulary transformers builds a fast tokenizer from
        self.tokenizer = folder / "tokenizer"
        self.tokenizer.mkdir()
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "line"]
        (self.tokenizer / "vocab.txt").write_text("\n".join(vocab) + "\n")
        (self.tokenizer / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 32}))
        transformers.AutoTokenizer.from_pretrained(str(self.tokenizer)).save_pretrained(self.tokenizer)
        self.text = folder / "c.txt"
        self.text.write_text("the line\nabc def\n\nthe last line\n")
        # an image folder: two classes of two PNGs each
        self.images = folder / "images"
        from PIL import Image

        for c in range(2):
            (self.images / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (6 + i, 6), (60 * c + i, 30, 200)).save(self.images / f"c{c}" / f"{i}.png")
        # an ONNX graph: (N, 4) → (N, 3) through MatMul, Add, Relu; and data for it
        onnx = pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
        from onnx import TensorProto, helper, numpy_helper

        w = numpy_helper.from_array(torch.randn(4, 3).numpy(), "w")
        b = numpy_helper.from_array(torch.randn(3).numpy(), "b")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=[w, b])
        self.onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        self.onnx = folder / "m.onnx"
        onnx.save(self.onnx_model, self.onnx)
        self.onnx_data = folder / "d4.safetensors"
        save_file({"inputs": torch.rand(8, 4), "targets": torch.randint(0, 3, (8,))}, str(self.onnx_data))
        # a plan, as `analyze --plan-out` writes one: a [plan] record and per-layer steps
        self.plan = {
            "plan": {"budget_fidelity": 0.99, "measured_loss": 0.004, "unit": "1 - cosine",
                     "measured_on": "digits_test.safetensors", "bytes_saved_estimate": 120000, "layers": 4},
            "steps": [{"op": "quantize", "method": "weight-only", "bits": 4, "group-size": 16,
                       "include": ["layers.0", "layers.3"]},
                      {"op": "quantize", "method": "weight-only", "bits": 8, "include": ["layers.6"]},
                      {"op": "prune", "ratio": 0.3, "include": ["layers.9"]}]}
        self.plan_paths = json_paths(self.plan)

    def case(self) -> Path:
        self.n += 1
        d = self.folder / "cases" / str(self.n)
        d.mkdir(parents=True)
        return d


@pytest.fixture(scope="module")
def surfaces(tmp_path_factory) -> Surfaces:
    pytest.importorskip("PIL")
    return Surfaces(tmp_path_factory.mktemp("surfaces"))


def run(worker: Worker, case: Path, argv: list, what: str, out: Path | None = None) -> None:
    """One case through the worker, checked; `out`, where the case's files are written, is watched."""
    try:
        check(worker.call(argv, watch=out or case), what)
    finally:
        shutil.rmtree(case, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders: config fields, sizes, bytes, weight files, special files


@settings(max_examples=110, **SETTINGS)
@given(data=st.data())
def test_fuzz_hugging_face_folders(worker, surfaces, data):
    case = surfaces.case()
    folder = case / "bert"
    shutil.copytree(surfaces.bert, folder)
    kind = data.draw(st.sampled_from(["field", "size", "config bytes", "weights bytes", "weights", "special"]),
                     label="kind")
    if kind in {"field", "size"}:
        config = json.loads(json.dumps(surfaces.bert_config))
        if kind == "size":
            key = data.draw(st.sampled_from(["num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                                             "max_position_embeddings", "num_attention_heads", "type_vocab_size",
                                             "image_size", "num_channels"]), label="key")
            value = data.draw(HUGE, label="value")
            config[key] = value
            what = f"config {key} = {value!r}"
        else:
            path = data.draw(st.sampled_from(json_paths(config)), label="path")
            action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
            value = data.draw(WRONG, label="value")
            config = edit_path(config, path, action, value)
            what = f"config {action} {path} = {value!r}"
        (folder / "config.json").write_text(json.dumps(config))
    elif kind in {"config bytes", "weights bytes"}:
        name = "config.json" if kind == "config bytes" else "model.safetensors"
        raw = (folder / name).read_bytes()
        header = len(raw) - 1 if name == "config.json" else 8 + int.from_bytes(raw[:8], "little")
        mutated, what = mutate_bytes(data, raw, header)
        (folder / name).write_bytes(mutated)
        what = f"{name}: {what}"
    elif kind == "weights":
        action = data.draw(st.sampled_from(["no weights", "0-byte bin", "garbage bin", "index to nowhere",
                                            "index outside", "both"]), label="action")
        if action != "both":
            (folder / "model.safetensors").unlink()
        if action in {"0-byte bin", "garbage bin", "both"}:
            (folder / "pytorch_model.bin").write_bytes(b"" if action == "0-byte bin" else os.urandom(512))
        if action.startswith("index"):
            shard = "missing.safetensors" if action == "index to nowhere" else "../../etc/passwd"
            (folder / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": shard}}))
        what = action
    else:
        name = data.draw(st.sampled_from(["config.json", "model.safetensors", "generation_config.json"]), label="file")
        how = data.draw(st.sampled_from(SPECIAL), label="how")
        special(folder / name, how)
        what = f"{name} is {how}"
    command = data.draw(st.sampled_from(["dry-run", "quantize"]), label="command")
    recipe = case / "r.json"
    recipe.write_text(json.dumps({"steps": [{"op": "prune", "ratio": 0.1}]}))
    out = case / "out"
    out.mkdir()
    if command == "dry-run":
        argv = ["chain", folder, "--recipe", recipe, "--dry-run", "-q"]
    else:
        argv = ["quantize", folder, "--method", "dynamic", "-o", out / "q.safetensors", "-q"]
    run(worker, case, argv, f"HF folder, {what}: {command}", out)


# ---------------------------------------------------------------------------------------------------
# Tokenizers


@settings(max_examples=90, **SETTINGS)
@given(data=st.data())
def test_fuzz_tokenizers(worker, surfaces, data):
    case = surfaces.case()
    folder = case / "tok"
    shutil.copytree(surfaces.tokenizer, folder)
    files = sorted(p.name for p in folder.iterdir())
    name = data.draw(st.sampled_from(files), label="file")
    kind = data.draw(st.sampled_from(["field", "bytes", "delete", "special", "nested"]), label="kind")
    path = folder / name
    if kind == "field" and path.suffix == ".json":
        doc = json.loads(path.read_text())
        key = data.draw(st.sampled_from(json_paths(doc)), label="path")
        action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
        value = data.draw(st.one_of(WRONG, HUGE), label="value")
        path.write_text(json.dumps(edit_path(doc, key, action, value)))
        what = f"{name}: {action} {key} = {value!r}"
    elif kind in {"bytes", "field"}:
        mutated, what = mutate_bytes(data, path.read_bytes(), min(path.stat().st_size - 1, 256))
        path.write_bytes(mutated)
        what = f"{name}: {what}"
    elif kind == "delete":
        path.unlink()
        what = f"{name} deleted"
    elif kind == "special":
        how = data.draw(st.sampled_from(SPECIAL), label="how")
        special(path, how)
        what = f"{name} is {how}"
    else:
        depth = data.draw(st.sampled_from([70, 5000, 200_000]), label="depth")
        path.write_text('{"model": ' + "[" * depth + "]" * depth + "}")
        what = f"{name} nested {depth} deep"
    out = case / "out"
    out.mkdir()
    length = data.draw(st.sampled_from(["16", "2", "1", "100000000"]), label="max-length")
    argv = ["data", "text", surfaces.text, "--tokenizer", folder, "--max-length", length, "-o", out / "t.safetensors"]
    run(worker, case, argv, f"tokenizer, {what}, --max-length {length}", out)


# ---------------------------------------------------------------------------------------------------
# Image folders


def _image_bytes(fmt: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 40, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@settings(max_examples=110, **SETTINGS)
@given(data=st.data())
def test_fuzz_image_folders(worker, surfaces, data):
    case = surfaces.case()
    folder = case / "images"
    shutil.copytree(surfaces.images, folder)
    kind = data.draw(st.sampled_from(["bytes", "format", "declared size", "special", "link", "options"]),
                     label="kind")
    target = folder / "c0" / "0.png"
    options = ["--size", "4"]
    if kind == "bytes":
        mutated, what = mutate_bytes(data, target.read_bytes(), 64)
        target.write_bytes(mutated)
    elif kind == "format":
        fmt = data.draw(st.sampled_from(["GIF", "BMP", "TIFF", "JPEG", "WEBP", "PNG"]), label="format")
        raw, what = mutate_bytes(data, _image_bytes(fmt, (8, 8)), 48)
        suffix = {"JPEG": ".jpg", "TIFF": ".tif"}.get(fmt, "." + fmt.lower())
        (folder / "c0" / f"x{suffix}").write_bytes(raw if data.draw(st.booleans(), label="mutate") else
                                                   _image_bytes(fmt, (8, 8)))
        what = f"{fmt}: {what}"
    elif kind == "declared size":
        w, h = data.draw(st.sampled_from([(0, 5), (60_000, 60_000), (2**31 - 1, 1), (1, 2**31 - 1), (9000, 9000)]),
                         label="size")
        target.write_bytes(_png_declaring(w, h))
        what = f"PNG declaring {w}×{h}"
    elif kind == "special":
        how = data.draw(st.sampled_from(SPECIAL), label="how")
        special(target, how)
        what = f"an image is {how}"
    elif kind == "link":
        to = data.draw(st.sampled_from(["/", "..", ".", "c1"]), label="to")
        (folder / "linked").symlink_to(to if to != ".." else folder.parent)
        what = f"class folder linked to {to}"
    else:
        options = [data.draw(st.sampled_from(["--size", "--mean", "--std", "--split"]), label="option"),
                   data.draw(st.sampled_from(["0", "-1", "nan", "1e-45", "inf", "1,2", "0.5,0.5,0.5", "1e30,0,0",
                                              "3", "100000", "0.5"]), label="value")]
        if options[0] != "--size":
            options += ["--size", "4"]
        what = " ".join(options)
    out = case / "out"
    out.mkdir()
    run(worker, case, ["data", "images", folder, *options, "-o", out / "d.safetensors"], f"images, {what}", out)


# ---------------------------------------------------------------------------------------------------
# ONNX files


def _mutate_graph(data, model) -> str:
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    kind = data.draw(st.sampled_from(["input dims", "output dims", "initializer", "op", "attribute", "loop",
                                      "opset", "input type"]), label="graph kind")
    if kind in {"input dims", "output dims"}:
        value = (graph.input if kind == "input dims" else graph.output)[0]
        dims = value.type.tensor_type.shape.dim
        i = data.draw(st.integers(0, len(dims) - 1), label="dim")
        size = data.draw(st.sampled_from([0, 1, 3, 7, 2**31, 2**62, -1]), label="size")
        dims[i].ClearField("dim_param")
        dims[i].dim_value = size
        return f"{kind}[{i}] = {size}"
    if kind == "initializer":
        t = graph.initializer[data.draw(st.integers(0, len(graph.initializer) - 1), label="init")]
        action = data.draw(st.sampled_from(["dims", "data", "nan", "dtype"]), label="act")
        if action == "dims":
            t.dims[0] = data.draw(st.sampled_from([0, 1, 2**31, 2**40]), label="d")
        elif action == "data":
            t.raw_data = t.raw_data[: len(t.raw_data) // 2]
        elif action == "nan":
            arr = numpy_helper.to_array(t).copy()
            arr.flat[0] = float("nan")
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
        else:
            t.data_type = data.draw(st.sampled_from([TensorProto.INT64, TensorProto.STRING, TensorProto.BOOL]))
        return f"initializer {t.name} {action}"
    if kind == "op":
        node = graph.node[data.draw(st.integers(0, len(graph.node) - 1), label="node")]
        node.op_type = data.draw(st.sampled_from(["Nonexistent", "Loop", "Reshape", "Softmax", "If"]), label="op")
        return f"node op → {node.op_type}"
    if kind == "attribute":
        node = graph.node[-1]
        node.attribute.append(helper.make_attribute("axis", data.draw(st.sampled_from([0, -5, 2**40]))))
        return "attribute added"
    if kind == "loop":
        trips = data.draw(st.sampled_from([0, 1, 2**24 + 1, 2**62, -1]), label="trips")
        body = helper.make_graph(
            [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
        graph.initializer.append(numpy_helper.from_array(torch.tensor(trips).numpy(), "trips"))
        graph.initializer.append(helper.make_tensor("cond", TensorProto.BOOL, [], [True]))
        y = graph.output[0].name
        graph.node[-1].output[0] = "pre"
        graph.node.append(helper.make_node("Loop", ["trips", "cond", "pre"], [y], body=body))
        return f"Loop of {trips}"
    if kind == "opset":
        model.opset_import[0].version = data.draw(st.sampled_from([1, 7, 99, 10**6]), label="opset")
        return f"opset {model.opset_import[0].version}"
    graph.input[0].type.tensor_type.elem_type = data.draw(st.sampled_from(
        [TensorProto.INT64, TensorProto.STRING, TensorProto.BOOL, TensorProto.FLOAT16]), label="type")
    return "input type changed"


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_fuzz_onnx_files(worker, surfaces, data):
    case = surfaces.case()
    path = case / "m.onnx"
    kind = data.draw(st.sampled_from(["bytes", "graph", "graph", "special"]), label="kind")
    if kind == "bytes":
        raw = surfaces.onnx.read_bytes()
        mutated, what = mutate_bytes(data, raw, len(raw) - 1)
        path.write_bytes(mutated)
    elif kind == "graph":
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(surfaces.onnx_model)
        what = _mutate_graph(data, model)
        path.write_bytes(model.SerializeToString())
    else:
        how = data.draw(st.sampled_from(SPECIAL), label="how")
        special(path, how)
        what = f"the .onnx is {how}"
    command = data.draw(st.sampled_from(["eval", "compare"]), label="command")
    if command == "eval":
        argv = ["eval", path, "--data", surfaces.onnx_data, "-q"]
    else:
        argv = ["compare", surfaces.onnx, path, "--data", surfaces.onnx_data, "-q"]
    run(worker, case, argv, f"ONNX, {what}: {command}")


# ---------------------------------------------------------------------------------------------------
# Plans (recipes with a [plan] record, run by chain and by `prune/quantize --plan`)


def _toml(plan: dict) -> str:
    def value(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return json.dumps(v)

    out = []
    if isinstance(plan.get("plan"), dict):
        out.append("[plan]\n" + "".join(f"{json.dumps(str(k))} = {value(v)}\n" for k, v in plan["plan"].items()))
    for step in plan.get("steps", []) if isinstance(plan.get("steps"), list) else []:
        if isinstance(step, dict):
            out.append("[[steps]]\n" + "".join(f"{json.dumps(str(k))} = {value(v)}\n" for k, v in step.items()))
    return "\n".join(out)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_fuzz_plans(worker, surfaces, data):
    case = surfaces.case()
    plan = json.loads(json.dumps(surfaces.plan))
    kind = data.draw(st.sampled_from(["field", "size", "name"]), label="kind")
    if kind == "name":  # a layer name or file name that would break the text it is written into
        name = data.draw(st.sampled_from(['layers.0"\n[[steps]]\nop = "prune', "😀", "layers.*", "", "\x00",
                                          "../../x", "a" * 5000]), label="name")
        plan["steps"][0]["include"] = [name]
        what = f"include {name[:20]!r}"
    else:
        path = data.draw(st.sampled_from(surfaces.plan_paths), label="path")
        action = "replace" if kind == "size" else data.draw(st.sampled_from(["replace", "delete", "add"]))
        value = data.draw(HUGE if kind == "size" else WRONG, label="value")
        plan = edit_path(plan, path, action, value)
        what = f"{action} {path} = {value!r}"
    fmt = data.draw(st.sampled_from([".json", ".toml"]), label="format")
    path = case / f"plan{fmt}"
    try:
        path.write_text(json.dumps(plan) if fmt == ".json" else _toml(plan))
        if fmt == ".toml":
            tomllib.loads(path.read_text())
    except (ValueError, TypeError, tomllib.TOMLDecodeError):
        path.write_text(json.dumps(plan, default=str))  # a value TOML cannot hold: the JSON form of the plan
        path = path.rename(case / "plan.json")
    out = case / "out"
    out.mkdir()
    command = data.draw(st.sampled_from(["chain --dry-run", "quantize --plan"]), label="command")
    if command == "chain --dry-run":
        argv = ["chain", DIGITS_TEACHER, "--recipe", path, "--dry-run", "-q"]
    else:
        argv = ["quantize", DIGITS_TEACHER, "--plan", path, "-o", out / "q.safetensors", "-q"]
    run(worker, case, argv, f"plan {fmt}, {what}: {command}", out)
