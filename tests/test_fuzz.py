"""Property-based fuzzing of every file modelzip reads (issue 11, "Must show").

Real outputs of every technique, data files and recipes are mutated (bit flips, truncation, manifest
fields of the wrong type, huge and negative sizes, missing and extra tensors) and fed to commands that
read them. The property: never exit 3 (or a crash), and on exit 2 exactly one `modelzip: error:` line
and no file written. Cases run in one worker process under a 4 GB address-space limit, so a forged size
that would allocate shows up as a failure instead of exhausting the machine. Hypothesis is derandomized:
CI sees the examples checked here.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .cli_worker import Worker
from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, SAMPLES
from .mutate import read_checkpoint, write_checkpoint

SETTINGS = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck),
                print_blob=False)

# Manifest keys whose values are sizes: forged, they declare huge or negative allocations.
SIZE_KEYS = {"shape", "input_shape", "hidden_sizes", "input_size", "num_classes", "ranks", "group_size", "bits",
             "nnz", "axis", "zero_point", "length", "history", "format_version"}
WRONG = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-1, 0, 1, 3, 2**31, 2**62, -(2**62), 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(-3, 10**6), max_size=3), st.just({}), st.just({"x": [1]}), st.just([[1], {}]),
)
HUGE = st.sampled_from([-1, 0, -(2**40), 2**31, 2**40, 10**12, 2.5, [10**6, 10**6], [-1, 64], [2**40]])


@dataclass
class Source:
    path: Path
    data: bytes = b""
    manifest: dict | None = None  # a checkpoint's manifest
    tensors: list[str] = field(default_factory=list)  # names of stored tensors / data keys
    paths: list[tuple] = field(default_factory=list)  # JSON paths into the manifest or recipe


def json_paths(node, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):
            out += json_paths(v, (*prefix, i))
    return out


def edit_path(root, path: tuple, action: str, value):
    """Replace, delete or add beside the node at `path`; returns the (possibly new) root."""
    if not path:
        return value
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "replace":
        parent[key] = value
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent["unexpected_key"] = value
    else:
        parent.append(value)
    return root


class Corpus:
    """Real outputs of every technique, data files and recipes, made once per module."""

    def __init__(self, folder: Path, worker: Worker):
        from modelzip_cli.pipeline.data import load_data
        from modelzip_cli.zoo import MLP

        self.folder = folder
        t = str(DIGITS_TEACHER)
        made = {
            "teacher.safetensors": None,
            "pruned.safetensors": ["prune", t, "--ratio", "0.7"],
            "structured.safetensors": ["prune", t, "--method", "structured", "--ratio", "0.3"],
            "dynamic.safetensors": ["quantize", t, "--method", "dynamic"],
            "static.safetensors": ["quantize", t, "--method", "static", "--calib-data", str(DIGITS_TRAIN),
                                   "--calib-batches", "2"],
            "qat.pt": ["quantize", t, "--method", "qat", "--data", str(DIGITS_TEST), "--epochs", "1"],
            "wo8.safetensors": ["quantize", t, "--method", "weight-only"],
            "wo4.pt": ["quantize", t, "--method", "weight-only", "--bits", "4", "--group-size", "16"],
            "lowrank.safetensors": ["lowrank", t, "--rank-ratio", "0.25"],
            "distilled.safetensors": ["distill", t, "--student", "zoo:mlp", "--student-kwargs",
                                      '{"hidden_sizes": [32]}', "--data", str(DIGITS_TEST), "--epochs", "1"],
        }
        self.models: dict[str, Source] = {}
        for name, argv in made.items():
            path = folder / name
            if argv is None:
                shutil.copy(DIGITS_TEACHER, path)
            else:  # made by the worker, which has torch loaded already and runs single-threaded
                res = worker.call([*argv, "-o", str(path), "-q"])
                assert res["code"] == 0, res["stderr"]
            tensors, text = read_checkpoint(path)
            manifest = json.loads(text)
            self.models[name] = Source(path, path.read_bytes(), manifest, sorted(tensors), json_paths(manifest))
        # A small model for data and recipe cases: the command's own cost stays small.
        self.small = folder / "small.safetensors"
        from modelzip_cli import save_model

        save_model(MLP(hidden_sizes=[8]), self.small, arch="zoo:mlp", arch_kwargs={"hidden_sizes": [8]})
        test = load_data(DIGITS_TEST)
        arrays = {"inputs": test.inputs[:128].contiguous(), "targets": test.targets[:128].contiguous()}
        self.data: dict[str, Source] = {}
        for suffix in (".safetensors", ".pt", ".npz"):
            path = folder / f"data{suffix}"
            write_data(path, arrays)
            self.data[path.name] = Source(path, path.read_bytes(), tensors=sorted(arrays))
        self.arrays = arrays
        json_recipe = {"steps": [
            {"op": "distill", "student": "zoo:mlp", "student-kwargs": {"hidden_sizes": [16]}, "epochs": 1},
            {"op": "prune", "method": "gradual", "ratio": 0.3, "steps": 2, "finetune-epochs": 1,
             "include": ["layers.*"], "exclude": ["layers.9"]},
            {"op": "lowrank", "rank-ratio": 0.5, "finetune-epochs": 0},
            {"op": "quantize", "method": "weight-only", "bits": 4, "group-size": 16}]}
        (folder / "recipe.json").write_text(json.dumps(json_recipe))
        shutil.copy(SAMPLES / "recipe.toml", folder / "recipe.toml")
        self.recipes = {}
        for name in ("recipe.json", "recipe.toml"):
            path = folder / name
            text = path.read_text()
            parsed = json.loads(text) if name.endswith(".json") else tomllib.loads(text)
            self.recipes[name] = Source(path, path.read_bytes(), parsed, paths=json_paths(parsed))
        self.dry_recipe = folder / "dry.json"  # loads the model and runs it on the example input
        self.dry_recipe.write_text(json.dumps({"steps": [{"op": "lowrank", "rank-ratio": 0.5}]}))
        self.count = itertools.count()

    def case_dir(self) -> Path:
        d = self.folder / "cases" / str(next(self.count))
        d.mkdir(parents=True)
        return d


def write_data(path: Path, arrays: dict) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in arrays.items()}, str(path))
    elif path.suffix == ".pt":
        torch.save(arrays, path)
    else:
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})


@pytest.fixture(scope="module")
def worker():
    w = Worker(timeout=120)
    yield w
    w.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, worker) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("fuzz"), worker)


def check(res: dict, what: str) -> None:
    """The property every case must keep."""
    assert res["code"] in (0, 1, 2), f"{what}: exit {res['code']}\n{res['stderr']}"
    if res["code"] == 2:
        lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("modelzip: error:"), f"{what}: {res['stderr']}"
        assert res["changed"] == [], f"{what}: exit 2 but wrote {res['changed']}"


def run_case(worker: Worker, case: Path, argv: list, what: str) -> None:
    try:
        check(worker.call(argv, watch=case), what)
    finally:
        shutil.rmtree(case, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Byte-level mutations


def bit_flips(data, size: int, header: int):
    offsets = data.draw(st.lists(st.one_of(st.integers(0, max(0, header)), st.integers(0, size - 1)),
                                 min_size=1, max_size=4), label="offsets")
    bits = data.draw(st.integers(0, 7), label="bit")
    return offsets, bits


def mutate_bytes(data, raw: bytes, header: int) -> tuple[bytes, str]:
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, len(raw) - 1), label="cut at")
        return raw[:cut], f"truncated at {cut}"
    offsets, bit = bit_flips(data, len(raw), header)
    out = bytearray(raw)
    for o in offsets:
        out[o] ^= 1 << bit
    return bytes(out), f"bit {bit} flipped at {offsets}"


def header_size(raw: bytes, suffix: str) -> int:
    if suffix == ".safetensors":
        return 8 + int.from_bytes(raw[:8], "little")
    return min(len(raw) - 1, 4096)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: every technique's output


def mutate_checkpoint(data, src: Source, dst: Path) -> str:
    kind = data.draw(st.sampled_from(["bytes", "field", "size", "tensor"]), label="kind")
    if kind == "bytes":
        raw, what = mutate_bytes(data, src.data, header_size(src.data, src.path.suffix))
        dst.write_bytes(raw)
        return what
    tensors, text = read_checkpoint(src.path)
    manifest = json.loads(text)
    if kind in {"field", "size"}:
        candidates = src.paths if kind == "field" else [
            p for p in src.paths if any(isinstance(k, str) and k in SIZE_KEYS for k in p)]
        path = data.draw(st.sampled_from(candidates or src.paths), label="path")
        action = "replace" if kind == "size" else data.draw(st.sampled_from(["replace", "delete", "add"]))
        value = data.draw(HUGE if kind == "size" else WRONG, label="value")
        manifest = edit_path(manifest, path, action, value)
        write_checkpoint(dst, tensors, json.dumps(manifest))
        return f"manifest {action} {path} = {value!r}"
    name = data.draw(st.sampled_from(src.tensors), label="tensor")
    action = data.draw(st.sampled_from(["drop", "extra", "reshape", "retype", "empty", "non-finite"]), label="act")
    t = tensors[name]
    if action == "drop":
        del tensors[name]
    elif action == "extra":
        tensors[f"{name}.extra"] = torch.zeros(3, 5)
    elif action == "reshape":
        tensors[name] = t.flatten()[: max(1, t.numel() // 2)].clone()
    elif action == "retype":
        tensors[name] = t.to(data.draw(st.sampled_from([torch.float64, torch.float16, torch.int32, torch.uint8,
                                                        torch.bool]), label="dtype"))
    elif action == "empty":
        tensors[name] = t.flatten()[:0].clone()
    elif t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1), label="at")] = data.draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38]), label="v")
        tensors[name] = t
    write_checkpoint(dst, tensors, text)
    return f"tensor {name}: {action}"


@settings(max_examples=330, **SETTINGS)
@given(data=st.data())
def test_fuzz_checkpoints(worker, corpus, data):
    src = corpus.models[data.draw(st.sampled_from(sorted(corpus.models)), label="source")]
    case = corpus.case_dir()
    mutated = case / src.path.name
    what = mutate_checkpoint(data, src, mutated)
    command = data.draw(st.integers(0, 9), label="command")
    if command < 3:  # the header and manifest only
        argv = ["inspect", mutated, "-q"]
    elif command < 9:  # load: rebuild, replay, load strictly, run on the example input
        argv = ["chain", mutated, "--recipe", corpus.dry_recipe, "--dry-run", "-q"]
    else:  # a cheap transform end to end
        argv = ["prune", mutated, "--ratio", "0.1", "-o", case / "out.safetensors", "-q"]
    run_case(worker, case, argv, f"{src.path.name}, {what}: {argv[0]}")


# ---------------------------------------------------------------------------------------------------
# Data files


def mutate_data(data, corpus: Corpus, src: Source, dst: Path) -> str:
    kind = data.draw(st.sampled_from(["bytes", "keys", "inputs", "targets"]), label="kind")
    if kind == "bytes":
        raw, what = mutate_bytes(data, src.data, header_size(src.data, src.path.suffix))
        dst.write_bytes(raw)
        return what
    arrays = {k: v.clone() for k, v in corpus.arrays.items()}
    x, y = arrays["inputs"], arrays["targets"]
    if kind == "keys":
        action = data.draw(st.sampled_from(["drop inputs", "drop targets", "extra", "mask"]), label="act")
        if action.startswith("drop"):
            del arrays[action.split()[1]]
        elif action == "extra":
            arrays["unexpected"] = torch.zeros(2, 2)
        else:
            arrays["attention_mask"] = torch.ones(x.shape[0], data.draw(st.integers(0, 70)), dtype=torch.long)
        what = action
    elif kind == "inputs":
        action = data.draw(st.sampled_from(["value", "dtype", "shape"]), label="act")
        if action == "value":
            v = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38, -3e38]), label="v")
            x.view(-1)[data.draw(st.integers(0, x.numel() - 1), label="at")] = v
            what = f"inputs value {v}"
        elif action == "dtype":
            dtype = data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                               torch.uint8, torch.bool, torch.int64]), label="dtype")
            arrays["inputs"] = x.to(dtype)
            what = f"inputs {dtype}"
        else:
            shape = data.draw(st.sampled_from([(x.numel(),), (x.shape[0], 8, 8), (x.shape[0], 63), (0, 64),
                                               (x.shape[0] // 2, 128)]), label="shape")
            arrays["inputs"] = x.flatten()[: int(np.prod(shape))].reshape(shape).clone() if np.prod(shape) \
                else x[:0].clone()
            what = f"inputs shape {shape}"
    else:
        action = data.draw(st.sampled_from(["value", "dtype", "length", "2-D"]), label="act")
        if action == "value":
            v = data.draw(st.sampled_from([-1, -100, 10, 11, 2**31, 2**62]), label="v")
            y[data.draw(st.integers(0, y.numel() - 1), label="at")] = v
            what = f"target {v}"
        elif action == "dtype":
            dtype = data.draw(st.sampled_from([torch.float32, torch.int32, torch.uint8, torch.int8, torch.bool]))
            arrays["targets"] = y.to(dtype)
            what = f"targets {dtype}"
        elif action == "length":
            arrays["targets"] = y[: data.draw(st.integers(0, y.numel() - 1), label="n")].clone()
            what = "targets length"
        else:
            arrays["targets"] = y[: y.numel() // 2 * 2].reshape(-1, 2).clone()
            what = "targets 2-D"
    if dst.suffix == ".npz" and any(v.dtype == torch.bfloat16 for v in arrays.values()):
        dst = dst.with_suffix(".pt")  # numpy has no bfloat16
    write_data(dst, arrays)
    return what


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_fuzz_data_files(worker, corpus, data):
    src = corpus.data[data.draw(st.sampled_from(sorted(corpus.data)), label="source")]
    case = corpus.case_dir()
    what = mutate_data(data, corpus, src, case / src.path.name)
    mutated = next(case.iterdir())
    argv = ["prune", corpus.small, "--ratio", "0.1", "--data", mutated, "--finetune-epochs", "1",
            "-o", case / "out.safetensors", "-q"]
    run_case(worker, case, argv, f"{src.path.name}, {what}")


# ---------------------------------------------------------------------------------------------------
# Recipes


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_fuzz_recipes(worker, corpus, data):
    src = corpus.recipes[data.draw(st.sampled_from(sorted(corpus.recipes)), label="source")]
    case = corpus.case_dir()
    kind = data.draw(st.sampled_from(["bytes", "field", "size"]), label="kind")
    if kind == "bytes":
        raw, what = mutate_bytes(data, src.data, len(src.data) - 1)
        mutated = case / src.path.name
        mutated.write_bytes(raw)
    else:
        recipe = json.loads(json.dumps(src.manifest))
        candidates = src.paths if kind == "field" else [
            p for p in src.paths if any(isinstance(k, str) and (k in SIZE_KEYS or k.replace("-", "_") in
                                                                {"epochs", "steps", "student_kwargs", "ratio"})
                                        for k in p)]
        path = data.draw(st.sampled_from(candidates or src.paths), label="path")
        action = "replace" if kind == "size" else data.draw(st.sampled_from(["replace", "delete", "add"]))
        value = data.draw(HUGE if kind == "size" else WRONG, label="value")
        recipe = edit_path(recipe, path, action, value)
        mutated = case / "recipe.json"
        mutated.write_text(json.dumps(recipe))
        what = f"{action} {path} = {value!r}"
    argv = ["chain", corpus.small, "--recipe", mutated, "--data", DIGITS_TEST, "--dry-run", "-q"]
    run_case(worker, case, argv, f"{src.path.name}, {what}")
