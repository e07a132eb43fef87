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

    from modelzip_cli.cli import run

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
