"""Rebuild the sample data and models deterministically: `make samples`.

Data: the UCI optical digits that scikit-learn ships, and MNIST-1D generated offline by the `mnist1d`
package. Models: trained here with modelzip's own training loop and saved as modelzip checkpoints; and
`mobilenet_v2_digits/`, a transformers MobileNetV2 (depthwise convolutions, BatchNorm, ReLU6) trained on the
digits as 32×32 RGB images (digit_images.py) and saved as a Hugging Face directory, as users have them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from modelzip_cli.checkpoint.io import build_arch, save_model
from modelzip_cli.checkpoint.layers import count_parameters
from modelzip_cli.pipeline.context import Context
from modelzip_cli.pipeline.data import load_data
from modelzip_cli.pipeline.run import evaluate
from modelzip_cli.pipeline.train import TrainConfig, train
from sample_models import decoder

HERE = Path(__file__).parent
SEED = 0


def save_data(name: str, x: np.ndarray, y: np.ndarray) -> None:
    save_file({"inputs": torch.tensor(x, dtype=torch.float32).contiguous(),
               "targets": torch.tensor(y, dtype=torch.int64).contiguous()}, str(HERE / name))


def make_digits() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data / 16.0, d.target  # pixel counts 0..16 → [0, 1]
    order = np.random.default_rng(SEED).permutation(len(y))
    cut = int(0.8 * len(y))
    save_data("digits_train.safetensors", x[order[:cut]], y[order[:cut]])
    save_data("digits_test.safetensors", x[order[cut:]], y[order[cut:]])


def make_mnist1d() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # default arguments: 5000 samples, 4000/1000 split, seed 42
    save_data("mnist1d_train.safetensors", d["x"], d["y"])
    save_data("mnist1d_test.safetensors", d["x_test"], d["y_test"])


MODELS = {
    # name: (arch, kwargs, data prefix, training config)
    "digits_teacher": ("zoo:mlp", {"input_size": 64, "hidden_sizes": [512, 256, 128], "num_classes": 10,
                                   "dropout": 0.2}, "digits", TrainConfig(epochs=40, lr=1e-3, batch_size=64)),
    "mnist1d_teacher": ("zoo:cnn1d", {"length": 40, "channels": [32, 32, 32], "kernel_size": 5,
                                      "num_classes": 10}, "mnist1d",
                        TrainConfig(epochs=150, lr=1e-2, batch_size=64)),
    "mnist1d_transformer": ("zoo:transformer1d", {"length": 40, "patch_size": 4, "dim": 64, "depth": 2,
                                                  "heads": 4, "mlp_ratio": 2, "num_classes": 10}, "mnist1d",
                            TrainConfig(epochs=60, lr=2e-3, batch_size=64, weight_decay=1e-2)),
}


HF_MODELS = {
    # name: (transformers config class, config, training config)
    "mobilenet_v2_digits": ("MobileNetV2Config", {"depth_multiplier": 0.7, "min_depth": 8, "image_size": 32,
                                                  "num_labels": 10}, TrainConfig(epochs=10, lr=3e-3, batch_size=64)),
}


def train_hf_model(name: str) -> dict:
    import tempfile

    import transformers

    from modelzip_cli.hf import HFModel
    from sample_models import digit_images

    config_class, config, cfg = HF_MODELS[name]
    torch.manual_seed(SEED)
    net = transformers.MobileNetV2ForImageClassification(getattr(transformers, config_class)(**config))
    model = HFModel(net, task="image-classification")
    with tempfile.TemporaryDirectory() as tmp:
        train_data = load_data(digit_images.write("train", Path(tmp) / "train.safetensors"))
        test_data = load_data(digit_images.write("test", Path(tmp) / "test.safetensors"))
        train(model, train_data, cfg, ctx=Context(seed=SEED), description=name)
        acc = evaluate(model, test_data)["accuracy"]
    net.save_pretrained(HERE / name)
    return {"arch": f"transformers {config_class}", "kwargs": config, "parameters": count_parameters(model),
            "test_accuracy": round(acc, 4), "train": dataclasses.asdict(cfg)}


def train_model(name: str) -> dict:
    arch, kwargs, prefix, cfg = MODELS[name]
    torch.manual_seed(SEED)
    model = build_arch(arch, kwargs)
    train_data = load_data(HERE / f"{prefix}_train.safetensors")
    test_data = load_data(HERE / f"{prefix}_test.safetensors")
    train(model, train_data, cfg, ctx=Context(seed=SEED), description=name)
    save_model(model, HERE / f"{name}.safetensors")
    acc = evaluate(model, test_data)["accuracy"]
    return {"arch": arch, "kwargs": kwargs, "parameters": count_parameters(model),
            "test_accuracy": round(acc, 4), "train": dataclasses.asdict(cfg)}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)  # one thread: bit-for-bit the same weights on any machine of this kind
    if not names or any(name in MODELS for name in names):  # the HF models read the committed digits
        make_digits()
        make_mnist1d()
    record = HERE / "accuracies.json"
    results = json.loads(record.read_text()) if record.exists() else {}
    results.update({name: train_model(name) for name in (names or MODELS) if name in MODELS})
    results.update({name: train_hf_model(name) for name in (names or HF_MODELS) if name in HF_MODELS})
    if not names or decoder.NAME in names:
        results[decoder.NAME] = decoder.build()
    for name, r in results.items():
        figure = f"test accuracy {r['test_accuracy']:.4f}" if "test_accuracy" in r else \
            f"held-out perplexity {r['heldout_perplexity']:.2f}"
        print(f"{name}: {r['arch']} {r['parameters']:,} params, {figure}")
    record.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
