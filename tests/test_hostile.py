"""Hostile and broken input (issue 11): one test per finding, each asserting the contracted behaviour.

Either exit 2 with exactly one line starting `modelzip: error:` and nothing written (no output, no
report, no temporary file, no intermediate), or exit 0 with a correct output. Code named by a file
(recipe, plan, manifest) never runs unless trusted, dry runs included.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from modelzip_cli import load_model, save_model

from .cli_worker import Worker
from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, ROOT, one_line_error
from .mutate import first_encoded, forge, read_checkpoint, snapshot


def refused(result, *words: str) -> str:
    """Exit 2, one line with the `modelzip: error:` prefix that names each of `words` (case-insensitive)."""
    assert result.code == 2, f"exit {result.code}: {result.stderr}"
    line = one_line_error(result)
    assert line.startswith("modelzip: error:"), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in: {line}"
    return line


def write_recipe(path: Path, steps: list[dict]) -> Path:
    """A recipe as JSON (a plan is one) or TOML, by suffix."""
    if path.suffix == ".json":
        path.write_text(json.dumps({"steps": steps}))
        return path

    def toml(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)  # strings, numbers, booleans and arrays read the same in TOML

    path.write_text("".join("[[steps]]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in s.items()) + "\n"
                            for s in steps))
    return path


def accuracy(path: Path, data: Path = DIGITS_TEST) -> float:
    """Accuracy of a checkpoint through the public API, inputs cast to the model's float dtype."""
    from modelzip_cli.pipeline.data import load_data

    model = load_model(path)
    floats = [t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    d = load_data(data)
    with torch.inference_mode():
        logits = model(d.inputs.to(floats[0] if floats else torch.float32))
    return float((logits.argmax(1) == d.targets).float().mean())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """Real outputs of the techniques, made once for the forged-manifest tests."""
    import contextlib
    import io

    from modelzip_cli.cli.app import run

    d = tmp_path_factory.mktemp("outputs")
    made = {
        "pruned": ["prune", DIGITS_TEACHER, "--ratio", "0.7"],
        "structured": ["prune", DIGITS_TEACHER, "--method", "structured", "--ratio", "0.3"],
        "dynamic": ["quantize", DIGITS_TEACHER, "--method", "dynamic"],
        "weight-only": ["quantize", DIGITS_TEACHER, "--method", "weight-only", "--bits", "4", "--group-size", "16"],
        "lowrank": ["lowrank", DIGITS_TEACHER, "--rank-ratio", "0.25"],
    }
    paths = {"v1-dynamic": ROOT / "tests" / "fixtures" / "v1" / "digits_dynamic.safetensors"}  # format 1
    for name, argv in made.items():
        paths[name] = d / f"{name}.safetensors"
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert run([str(a) for a in argv] + ["-o", str(paths[name]), "-q"]) == 0, err.getvalue()
    return paths


# ---------------------------------------------------------------------------------------------------
# A recipe runs arbitrary code: recipes, plans and manifests naming code are refused before any import.

EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("imported")  # the side effect of importing this module
import torch.nn as nn
def Net(**kwargs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
"""


@pytest.fixture
def work(tmp_path) -> Path:
    """The folder a command may write to; code and markers live beside it, not in it."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture(params=["os:system", "subprocess:Popen", "import side effect"])
def code_ref(request, tmp_path, monkeypatch):
    """(reference, kwargs, marker): calling or importing the reference creates the marker."""
    marker = tmp_path / "marker"
    if request.param == "os:system":
        yield "os:system", {"command": f"touch {marker}"}, marker
    elif request.param == "subprocess:Popen":
        yield "subprocess:Popen", {"args": ["touch", str(marker)]}, marker
    else:
        name = f"evil_{uuid.uuid4().hex[:10]}"  # a fresh name: nothing cached from another test
        (tmp_path / "code").mkdir()
        (tmp_path / "code" / f"{name}.py").write_text(EVIL_MODULE.format(marker=str(marker)))
        monkeypatch.syspath_prepend(str(tmp_path / "code"))
        yield f"{name}:Net", {}, marker
        sys.modules.pop(name, None)


def never_created(marker: Path) -> bool:
    deadline = time.monotonic() + 1.0  # Popen's child runs on its own time
    while time.monotonic() < deadline:
        if marker.exists():
            return False
        time.sleep(0.05)
    return not marker.exists()


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("fmt", [".toml", ".json"], ids=["recipe", "plan"])
def test_recipe_naming_code_is_refused_before_import(cli, work, code_ref, fmt, dry_run):
    ref, kwargs, marker = code_ref
    recipe = write_recipe(work / f"r{fmt}", [{"op": "distill", "student": ref, "student-kwargs": kwargs,
                                              "epochs": 1}])
    before = snapshot(work)
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--data", DIGITS_TRAIN, "-o", work / "o.safetensors",
            "-q", *(["--dry-run"] if dry_run else []))
    refused(r, ref.split(":")[0], "MODELZIP_TRUSTED_MODULES")
    assert never_created(marker), f"{ref} ran"
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["eval", "prune", "chain --dry-run"])
def test_manifest_naming_code_is_refused_before_import(cli, work, code_ref, command):
    ref, kwargs, marker = code_ref

    def name_code(m):
        m["arch"], m["arch_kwargs"] = ref, kwargs

    model = forge(DIGITS_TEACHER, work / "m.safetensors", manifest=name_code)
    recipe = write_recipe(work / "r.json", [{"op": "prune", "ratio": 0.1}])
    argv = {"eval": ["eval", model, "--data", DIGITS_TEST],
            "prune": ["prune", model, "--ratio", "0.1", "-o", work / "o.safetensors"],
            "chain --dry-run": ["chain", model, "--recipe", recipe, "--dry-run"]}[command]
    before = snapshot(work)
    refused(cli(*argv, "-q"), "--arch", "MODELZIP_TRUSTED_MODULES")
    assert never_created(marker), f"{ref} ran"
    assert snapshot(work) == before


def test_recipe_student_checkpoint_naming_code_is_refused(cli, work, code_ref):
    ref, kwargs, marker = code_ref

    def name_code(m):
        m["arch"], m["arch_kwargs"] = ref, kwargs

    student = forge(DIGITS_TEACHER, work / "student.safetensors", manifest=name_code)
    recipe = write_recipe(work / "r.json", [{"op": "distill", "student": str(student), "epochs": 1}])
    before = snapshot(work)
    for dry in ([], ["--dry-run"]):
        r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--data", DIGITS_TRAIN, "-o", work / "o.safetensors",
                "-q", *dry)
        refused(r, "MODELZIP_TRUSTED_MODULES")
    assert never_created(marker), f"{ref} ran"
    assert snapshot(work) == before


def test_trusted_module_in_a_recipe_is_imported(cli, work, tmp_path, monkeypatch):
    """The control for the refusals above: once trusted, the same kind of recipe does import the module."""
    name = f"userarch_{uuid.uuid4().hex[:10]}"
    marker = tmp_path / "marker"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{name}.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.setenv("MODELZIP_TRUSTED_MODULES", name)
    recipe = write_recipe(work / "r.json", [{"op": "distill", "student": f"{name}:Net", "epochs": 1}])
    try:
        r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--data", DIGITS_TRAIN, "--dry-run", "-q")
        assert r.code == 0, r.stderr
        assert marker.exists()
    finally:
        sys.modules.pop(name, None)


IMPORTS_MODULE = """
from subprocess import Popen  # an import: trusting this module does not make Popen an architecture
import torch.nn as nn
def Net(**kwargs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
"""


@pytest.mark.parametrize("where", ["recipe", "recipe --dry-run", "manifest", "--arch"])
def test_a_trusted_modules_imports_are_never_called(cli, work, tmp_path, monkeypatch, where):
    """Issue 26 item 2: MODELZIP_TRUSTED_MODULES=m trusts what m defines as an architecture, not every name m
    imported; `m:Popen` is refused before it is called, from a recipe, a manifest or the command line."""
    name = f"trusted_{uuid.uuid4().hex[:10]}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{name}.py").write_text(IMPORTS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.setenv("MODELZIP_TRUSTED_MODULES", name)
    marker = tmp_path / "marker"
    ref, kwargs = f"{name}:Popen", {"args": ["touch", str(marker)]}
    out = ["-o", work / "o.safetensors", "-q"]
    if where.startswith("recipe"):
        recipe = write_recipe(work / "r.toml", [{"op": "distill", "student": ref, "student-kwargs": kwargs,
                                                 "epochs": 1}])
        argv = ["chain", DIGITS_TEACHER, "--recipe", recipe, "--data", DIGITS_TRAIN, *out, *where.split()[1:]]
    elif where == "manifest":
        def name_it(m):
            m["arch"], m["arch_kwargs"] = ref, kwargs
        argv = ["prune", forge(DIGITS_TEACHER, work / "m.safetensors", manifest=name_it), "--ratio", "0.1", *out]
    else:
        torch.save(load_model(DIGITS_TEACHER).state_dict(), work / "sd.pt")
        argv = ["prune", work / "sd.pt", "--ratio", "0.1", "--arch", ref, "--arch-kwargs", json.dumps(kwargs), *out]
    before = snapshot(work)
    try:
        refused(cli(*argv), ref, "subprocess")
    finally:
        sys.modules.pop(name, None)
    assert never_created(marker), f"{ref} ran"
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------------
# --keep-intermediate


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_keep_intermediate_never_overwrites_the_input(cli, tmp_path, force):
    keep = tmp_path / "steps"
    keep.mkdir()
    model = keep / "step1_prune.safetensors"  # where step 1's intermediate would go
    shutil.copy(DIGITS_TEACHER, model)
    recipe = write_recipe(tmp_path / "r.toml", [{"op": "prune", "ratio": 0.5}])
    before = snapshot(tmp_path)
    r = cli("chain", model, "--recipe", recipe, "--keep-intermediate", keep, "-o", tmp_path / "o.safetensors",
            "-q", *(["--force"] if force else []))
    refused(r)
    assert model.read_bytes() == DIGITS_TEACHER.read_bytes()
    assert snapshot(tmp_path) == before


def test_keep_intermediate_obeys_force(cli, tmp_path):
    keep = tmp_path / "steps"
    keep.mkdir()
    (keep / "step1_prune.safetensors").write_bytes(b"precious")
    recipe = write_recipe(tmp_path / "r.toml", [{"op": "prune", "ratio": 0.5}])
    before = snapshot(tmp_path)
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--keep-intermediate", keep,
            "-o", tmp_path / "o.safetensors", "-q")
    refused(r, "--force")
    assert snapshot(tmp_path) == before
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--keep-intermediate", keep,
            "-o", tmp_path / "o.safetensors", "-q", "--force")
    assert r.code == 0, r.stderr
    assert sum(1 for p in load_model(keep / "step1_prune.safetensors").parameters()) > 0


def test_failed_chain_leaves_no_intermediates(cli, tmp_path):
    keep = tmp_path / "steps"
    # step 2 fails at run time (the budget leaves less than rank 1 per layer), after step 1 has run
    recipe = write_recipe(tmp_path / "r.toml", [{"op": "prune", "ratio": 0.5}, {"op": "lowrank", "params-ratio": 0.01}])
    before = snapshot(tmp_path)
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "--keep-intermediate", keep,
            "-o", tmp_path / "o.safetensors", "-q")
    refused(r, "step 2")
    assert snapshot(tmp_path) == before
    assert not keep.exists(), "the intermediate folder was left behind"


# ---------------------------------------------------------------------------------------------------
# Outputs and reports never equal an input of the run


def _overwrite_cases(tmp_path: Path) -> dict[str, tuple[list, Path]]:
    data = shutil.copy(DIGITS_TRAIN, tmp_path / "d.safetensors")
    test = shutil.copy(DIGITS_TEST, tmp_path / "t.safetensors")
    recipe = write_recipe(tmp_path / "r.json", [{"op": "prune", "ratio": 0.3}])
    step_data = write_recipe(tmp_path / "rs.json", [{"op": "prune", "ratio": 0.3, "data": "d.safetensors",
                                                     "finetune-epochs": 1}])
    link = tmp_path / "link.safetensors"
    link.symlink_to(data)
    student = tmp_path / "mlp.safetensors"
    model = load_model(DIGITS_TEACHER)
    save_model(model, student)
    t = [DIGITS_TEACHER]
    return {
        "-o is --data": (["prune", *t, "--ratio", "0.3", "--data", data, "--finetune-epochs", "1", "-o", data], data),
        "-o is --eval-data": (["prune", *t, "--ratio", "0.3", "--eval-data", test, "-o", test], test),
        "-o is --calib-data": (["quantize", *t, "--method", "static", "--calib-data", data, "--calib-batches", "2",
                                "-o", data], data),
        "-o is --val-data": (["distill", *t, "--student", "zoo:mlp", "--student-kwargs", '{"hidden_sizes": [16]}',
                              "--data", DIGITS_TRAIN, "--val-data", test, "--epochs", "1", "-o", test], test),
        "-o links to --data": (["prune", *t, "--ratio", "0.3", "--data", data, "--finetune-epochs", "1", "-o", link],
                               data),
        "--report is the recipe": (["chain", *t, "--recipe", recipe, "-o", tmp_path / "o.safetensors",
                                    "--report", recipe], recipe),
        "-o is a step's data": (["chain", *t, "--recipe", step_data, "-o", data], data),
        "-o is the student": (["distill", *t, "--student", student, "--data", DIGITS_TRAIN, "--epochs", "1",
                               "-o", student], student),
    }


@pytest.mark.parametrize("case", ["-o is --data", "-o is --eval-data", "-o is --calib-data", "-o is --val-data",
                                  "-o links to --data", "--report is the recipe", "-o is a step's data",
                                  "-o is the student"])
def test_output_never_overwrites_an_input_even_with_force(cli, tmp_path, case):
    argv, victim = _overwrite_cases(tmp_path)[case]
    before, content = snapshot(tmp_path), victim.read_bytes()
    refused(cli(*argv, "--force", "-q"), "input")
    assert victim.read_bytes() == content
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# fp16, bf16 and fp64 checkpoints

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@pytest.fixture(scope="module")
def float_teachers(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dtypes")
    paths = {}
    for name, dtype in DTYPES.items():
        paths[name] = d / f"teacher-{name}.safetensors"
        save_model(load_model(DIGITS_TEACHER).to(dtype), paths[name])
    raw = d / "teacher-bf16-raw.pt"  # a raw state dict, as published checkpoints come
    torch.save({k: v.to(torch.bfloat16) for k, v in load_model(DIGITS_TEACHER).state_dict().items()}, raw)
    paths["bf16-raw"] = raw
    return paths


def test_eval_reads_every_float_dtype(cli, float_teachers):
    for name, path in float_teachers.items():
        arch = ["--arch", "zoo:mlp"] if name.endswith("raw") else []
        r = cli("eval", path, "--data", DIGITS_TEST, *arch, "--json", "-q")
        assert r.code == 0, f"{name}: {r.stderr}"
        assert r.json["metrics"][str(path)]["accuracy"] >= 0.95, name


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("command", [["prune", "--ratio", "0.5"], ["prune", "--method", "structured", "--ratio", "0.3"],
                                     ["quantize", "--method", "dynamic"], ["lowrank", "--rank-ratio", "0.5"]],
                         ids=["magnitude", "structured", "dynamic", "lowrank"])
def test_float_dtypes_work_in_every_command_and_keep_their_dtype(cli, tmp_path, float_teachers, dtype, command):
    out = tmp_path / "o.safetensors"
    r = cli(command[0], float_teachers[dtype], *command[1:], "-o", out, "-q")
    assert r.code == 0, r.stderr
    e = cli("eval", out, "--data", DIGITS_TEST, "--json", "-q")
    assert e.code == 0, e.stderr
    assert e.json["metrics"][str(out)]["accuracy"] >= 0.9
    assert {p.dtype for p in load_model(out).parameters()} == {DTYPES[dtype]}


def test_raw_bf16_state_dict_prunes(cli, tmp_path, float_teachers):
    out = tmp_path / "o.safetensors"
    r = cli("prune", float_teachers["bf16-raw"], "--arch", "zoo:mlp", "--ratio", "0.5", "-o", out, "-q")
    assert r.code == 0, r.stderr
    assert {p.dtype for p in load_model(out).parameters()} == {torch.bfloat16}
    assert accuracy(out) >= 0.9


# ---------------------------------------------------------------------------------------------------
# A pickled module with --trust-code


def _pickled_mlp(path: Path, **kwargs) -> Path:
    """A full nn.Module pickle, as other tools write them (no modelzip record of its architecture)."""
    from modelzip_cli.zoo import MLP

    model = MLP(**kwargs)
    model.load_state_dict(load_model(DIGITS_TEACHER).state_dict())
    torch.save(model, path)
    return path


def test_pickled_module_with_wrong_arch_kwargs_is_refused(cli, tmp_path):
    kwargs = {"hidden_sizes": [512, 256, 128]}
    full = _pickled_mlp(tmp_path / "full.pt", **kwargs)
    out = tmp_path / "o.safetensors"
    before = snapshot(tmp_path)
    r = cli("prune", full, "--trust-code", "--arch", "zoo:mlp", "--arch-kwargs", '{"hidden_sizes": [32]}',
            "--ratio", "0.1", "-o", out, "-q")
    assert r.code == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("modelzip: warning:") and full.name in lines[0]  # its code did run
    assert len(lines) == 2 and lines[1].startswith("modelzip: error:") and "zoo:mlp" in lines[1], r.stderr
    assert snapshot(tmp_path) == before
    r = cli("prune", full, "--trust-code", "--arch", "zoo:mlp", "--arch-kwargs", json.dumps(kwargs),
            "--ratio", "0.1", "-o", out, "-q")
    assert r.code == 0, r.stderr
    assert accuracy(out) >= 0.95  # the output reloads


def test_trust_code_says_which_file_ran(cli, tmp_path):
    full = _pickled_mlp(tmp_path / "full.pt", hidden_sizes=[512, 256, 128])
    r = cli("eval", full, "--trust-code", "--arch", "zoo:mlp", "--data", DIGITS_TEST)
    assert r.code == 0, r.stderr
    assert any("warning" in ln.lower() and full.name in ln and "code" in ln.lower() for ln in r.stderr.splitlines()), \
        r.stderr


def test_distill_from_a_pickled_student_with_trust_code(cli, tmp_path):
    student = tmp_path / "student.pt"
    torch.save(load_model(DIGITS_TEACHER), student)  # built by modelzip: it knows its architecture
    out = tmp_path / "o.safetensors"
    r = cli("distill", DIGITS_TEACHER, "--student", student, "--trust-code", "--data", DIGITS_TRAIN, "--epochs", "1",
            "-o", out, "-q")
    assert r.code == 0, r.stderr
    assert accuracy(out) >= 0.9


# ---------------------------------------------------------------------------------------------------
# Non-finite values and bad labels


def _data(path: Path, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({"inputs": inputs, **({"targets": targets} if targets is not None else {})}, str(path))
    return path


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("command", ["prune --data", "eval", "quantize --calib-data"])
def test_non_finite_data_is_refused_naming_file_and_count(cli, tmp_path, value, command):
    from modelzip_cli.pipeline.data import load_data

    clean = load_data(DIGITS_TRAIN)
    inputs = clean.inputs.clone()
    inputs[[3, 70, 400], [5, 9, 60]] = value  # three bad values
    bad = _data(tmp_path / "bad.safetensors", inputs, clean.targets)
    out = tmp_path / "o.safetensors"
    argv = {"prune --data": ["prune", DIGITS_TEACHER, "--ratio", "0.3", "--data", bad, "--finetune-epochs", "1",
                             "-o", out],
            "eval": ["eval", DIGITS_TEACHER, "--data", bad],
            "quantize --calib-data": ["quantize", DIGITS_TEACHER, "--method", "static", "--calib-data", bad,
                                      "-o", out]}[command]
    before = snapshot(tmp_path)
    line = refused(cli(*argv, "-q"), "bad.safetensors")
    assert re.search(r"\b3\b", line), f"the count of bad values is not in: {line}"
    assert snapshot(tmp_path) == before


def test_negative_label_is_refused(cli, tmp_path):
    from modelzip_cli.pipeline.data import load_data

    clean = load_data(DIGITS_TEST)
    targets = clean.targets.clone()
    targets[7] = -1
    bad = _data(tmp_path / "neg.safetensors", clean.inputs, targets)
    refused(cli("eval", DIGITS_TEACHER, "--data", bad, "-q"), "neg.safetensors", "-1")
    before = snapshot(tmp_path)
    refused(cli("prune", DIGITS_TEACHER, "--ratio", "0.3", "--data", bad, "-o", tmp_path / "o.safetensors", "-q"),
            "neg.safetensors")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [["prune", "--ratio", "0.3"], ["quantize", "--method", "dynamic"],
                                     ["lowrank", "--rank-ratio", "0.5"]], ids=["prune", "quantize", "lowrank"])
def test_non_finite_weights_are_refused_naming_the_tensor(cli, tmp_path, command):
    def poison(t, m):
        t["layers.3.weight"] = t["layers.3.weight"].clone()
        t["layers.3.weight"][0, 0] = math.nan
        t["layers.6.bias"] = t["layers.6.bias"].clone()
        t["layers.6.bias"][1] = math.inf

    model = forge(DIGITS_TEACHER, tmp_path / "nan.safetensors", tensors=poison)
    before = snapshot(tmp_path)
    refused(cli(command[0], model, *command[1:], "-o", tmp_path / "o.safetensors", "-q"),
            "layers.3.weight", "layers.6.bias")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["prune", "distill"])
def test_non_finite_training_loss_stops_with_nothing_written(cli, tmp_path, command):
    out = tmp_path / "o.safetensors"
    argv = {"prune": ["prune", DIGITS_TEACHER, "--ratio", "0.3", "--data", DIGITS_TRAIN, "--finetune-epochs", "2",
                      "--lr", "1e30"],
            "distill": ["distill", DIGITS_TEACHER, "--student", "zoo:mlp", "--student-kwargs",
                        '{"hidden_sizes": [16]}', "--data", DIGITS_TRAIN, "--epochs", "2", "--lr", "1e30"]}[command]
    before = snapshot(tmp_path)
    refused(cli(*argv, "-o", out, "-q"), "loss")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# Forged and corrupt manifests: exit 2 naming the field, never exit 3


def _edit(source: str, fn) -> tuple[str, dict]:
    return source, {"manifest": fn}


def _set(key, value):
    def fn(m):
        m[key] = value
    return fn


def _first_edit(fn):
    def wrap(m):
        fn(m["edits"][0])
    return wrap


def _encoding(codec: str, key: str, value):
    def fn(m):
        m["encodings"][first_encoded(m, codec)][key] = value
    return fn


def _values(change):
    def fn(t, m):
        name = first_encoded(m, "bitmask") + "::values"
        if change is None:
            del t[name]
        else:
            t[name] = change(t[name])
    return fn


FORGED = {
    "not JSON": ("pruned", {"text": lambda s: "{not json"}, "manifest"),
    "a list": ("pruned", {"text": lambda s: "[]"}, "manifest"),
    "deep nesting": ("pruned", {"text": lambda s: "[" * 100_000 + "]" * 100_000}, "manifest"),
    "string format version": ("pruned", {"manifest": _set("format_version", "1")}, "format_version"),
    "null arch": ("pruned", {"manifest": _set("arch", None)}, "arch"),
    "integer arch": ("pruned", {"manifest": _set("arch", 3)}, "arch"),
    "arch kwargs a list": ("pruned", {"manifest": _set("arch_kwargs", [1])}, "arch_kwargs"),
    "edits a table": ("lowrank", {"manifest": _set("edits", {"kind": "lowrank"})}, "edits"),
    "edit a string": ("lowrank", {"manifest": _set("edits", ["lowrank"])}, "edit"),
    "missing rank": ("lowrank", {"manifest": _first_edit(lambda e: e.pop("ranks"))}, "ranks"),
    "negative rank": ("lowrank", {"manifest": _first_edit(lambda e: e["ranks"].update({"layers.0": -3}))}, "rank"),
    "zero rank": ("lowrank", {"manifest": _first_edit(lambda e: e["ranks"].update({"layers.0": 0}))}, "rank"),
    "float rank": ("lowrank", {"manifest": _first_edit(lambda e: e["ranks"].update({"layers.0": 2.5}))}, "rank"),
    "unknown layer": ("lowrank", {"manifest": _first_edit(lambda e: e["ranks"].update({"nope": 4}))}, "nope"),
    "unknown dynamic layer": ("dynamic", {"manifest": _first_edit(lambda e: e.update(modules=["nope"]))}, "nope"),
    "history a string": ("structured", {"manifest": _first_edit(lambda e: e.update(history="x"))}, "history"),
    "weight-only bits 3": ("weight-only", {"manifest": _first_edit(lambda e: e.update(bits=3))}, "bits"),
    "negative bitmask shape": ("pruned", {"manifest": _encoding("bitmask", "shape", [-1, 512])}, "shape"),
    "unknown dtype": ("pruned", {"manifest": _encoding("bitmask", "dtype", "float7")}, "dtype"),
    "missing values tensor": ("pruned", {"tensors": _values(None)}, "values"),
    "short values tensor": ("pruned", {"tensors": _values(lambda v: v[:-5])}, "values"),
    "string scale": ("v1-dynamic", {"manifest": _encoding("qtensor", "scale", "big")}, "scale"),
    "unknown activations": ("dynamic", {"manifest": _first_edit(lambda e: e.update(activations="per-row"))},
                            "activations"),
    "encodings a list": ("pruned", {"manifest": _set("encodings", [])}, "encodings"),
    "constants a string": ("dynamic", {"manifest": _set("constants", "x")}, "constants"),
    "input shape a string": ("structured", {"manifest": _set("input_shape", "1,64")}, "input_shape"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_manifest_is_exit_2_naming_the_field(cli, tmp_path, outputs, case):
    source, change, field = FORGED[case]
    forged = forge(outputs[source], tmp_path / "forged.safetensors", **change)
    before = snapshot(tmp_path)
    refused(cli("eval", forged, "--data", DIGITS_TEST, "-q"), field)
    refused(cli("prune", forged, "--ratio", "0.1", "-o", tmp_path / "o.safetensors", "-q"), field)
    r = cli("inspect", forged, "-q")  # reads the header only: may describe the file, never crash
    assert r.code in (0, 2), r.stderr
    assert snapshot(tmp_path) == before


def test_zero_byte_pt_is_refused(cli, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.touch()
    for argv in (["inspect", empty], ["eval", empty, "--data", DIGITS_TEST]):
        refused(cli(*argv, "-q"), "empty.pt")


# ---------------------------------------------------------------------------------------------------
# Size fields never allocate what they declare (run under a 4 GB address-space limit)


@pytest.fixture(scope="module")
def limited():
    worker = Worker()
    yield worker
    worker.close()


HUGE = {
    "bitmask shape": ("pruned", _encoding("bitmask", "shape", [100_000, 100_000]), "shape"),
    "arch kwargs of a replayed model": ("dynamic", _set("arch_kwargs", {"hidden_sizes": [1_000_000] * 3}),
                                        "arch_kwargs"),
    "arch kwargs of a traced model": ("structured", _set("arch_kwargs", {"hidden_sizes": [1_000_000] * 3}),
                                      "arch_kwargs"),
    "rank before a replay": ("dynamic", lambda m: m.update(edits=[{"kind": "lowrank", "ranks": {"layers.0": 10**9}},
                                                                  *m["edits"]]), "rank"),
    "input shape": ("pruned", _set("input_shape", [1, 10**11]), "input_shape"),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_declared_sizes_are_checked_before_allocation(limited, tmp_path, outputs, case):
    source, change, field = HUGE[case]
    work = tmp_path / "work"
    work.mkdir()
    forged = forge(outputs[source], work / "forged.safetensors", manifest=change)
    for argv in (["eval", forged, "--data", DIGITS_TEST, "-q"],
                 ["prune", forged, "--method", "structured", "--ratio", "0.3", "-o", work / "o.safetensors", "-q"]):
        res = limited.call(argv, watch=work)
        assert res["code"] == 2, f"{argv[0]}: exit {res['code']}: {res['stderr']}"
        lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("modelzip: error:") and field in lines[0], res["stderr"]
        assert res["changed"] == []


# ---------------------------------------------------------------------------------------------------
# Signals: `modelzip: interrupted`, 130 / 143, temporaries removed; stale temporaries cleaned

HOOKED = r"""
import json, os, signal, sys
plan = json.loads(sys.argv[1])
fired = []
def hook(event, args):
    if fired or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
    if plan["when"] == "reading" and os.path.basename(path) == plan["name"] and not writing:
        fired.append(path)
        open(plan["marker"], "w").close()  # the run is under way: the test sends the signal
    elif plan["when"] == "writing" and writing and path.startswith(plan["folder"] + os.sep) \
            and plan["name"] in os.path.basename(path):
        fired.append(path)
        os.kill(os.getpid(), plan["signal"])  # arrives in the middle of writing an output
sys.addaudithook(hook)
sys.argv = ["modelzip", *sys.argv[2:]]
from modelzip_cli.cli.app import main
main()
"""


def _hooked(plan: dict, *argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", HOOKED, json.dumps(plan), *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pt_data(folder: Path) -> Path:
    """The training data as a .pt file: read through Python's open(), which the audit hook sees."""
    from modelzip_cli.pipeline.data import load_data

    d = load_data(DIGITS_TRAIN)
    path = folder / "train.pt"
    torch.save({"inputs": d.inputs, "targets": d.targets}, path)
    return path


EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def signalled_during_fine_tuning(tmp_path: Path, signals: list[tuple[int, float]]) -> tuple[int, str, bool]:
    """A prune run fine-tuning for ever, sent `signals` (each after a pause in seconds) once it has read its
    data: (exit code, stderr, whether its folder is as before)."""
    work = tmp_path / "work"
    work.mkdir()
    data = _pt_data(work)
    marker = tmp_path / "started"
    before = snapshot(work)
    proc = _hooked({"when": "reading", "name": data.name, "marker": str(marker)},
                   "prune", DIGITS_TEACHER, "--ratio", "0.3", "--data", data, "--finetune-epochs", "100000",
                   "-o", work / "result.safetensors", "-q")
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the run never read its data"
        time.sleep(0.5)  # into the fine-tuning
        for sig, pause in signals:
            time.sleep(pause)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, snapshot(work) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_run(tmp_path, sig):
    code, err, unchanged = signalled_during_fine_tuning(tmp_path, [(sig, 0.0)])
    assert code == EXIT[sig], err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["modelzip: interrupted"], err
    assert unchanged


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_write_leaves_no_temporary(tmp_path, sig):
    work = tmp_path / "work"
    work.mkdir()
    proc = _hooked({"when": "writing", "folder": str(work), "name": "result", "signal": int(sig)},
                   "prune", DIGITS_TEACHER, "--ratio", "0.3", "-o", work / "result.safetensors", "-q")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT[sig], err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["modelzip: interrupted"], err
    left = set(snapshot(work))
    assert left <= {"result.safetensors", "result.safetensors.json"}, f"left behind: {left}"
    if "result.safetensors.json" in left:
        json.loads((work / "result.safetensors.json").read_text())  # never half-written
    if "result.safetensors" in left:
        load_model(work / "result.safetensors")


def test_stale_temporary_of_a_killed_run_is_removed_by_the_next_write(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    argv = ["prune", DIGITS_TEACHER, "--ratio", "0.3", "-o", work / "result.safetensors", "-q"]
    proc = _hooked({"when": "writing", "folder": str(work), "name": "result", "signal": int(signal.SIGKILL)}, *argv)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    stale = set(snapshot(work)) - {"result.safetensors", "result.safetensors.json"}
    assert stale, "the killed run left no temporary: the test did not kill it mid-write"
    done = subprocess.run([sys.executable, "-m", "modelzip_cli", *map(str, argv), "--force"], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                       "")])})
    assert done.returncode == 0, done.stderr
    assert set(snapshot(work)) == {"result.safetensors", "result.safetensors.json"}


# ---------------------------------------------------------------------------------------------------
# Options


def test_nan_accuracy_gate_is_refused_before_any_work(cli, tmp_path):
    before = snapshot(tmp_path)
    refused(cli("prune", DIGITS_TEACHER, "--ratio", "0.3", "--eval-data", DIGITS_TEST, "--max-accuracy-drop", "nan",
                "-o", tmp_path / "o.safetensors", "-q"), "--max-accuracy-drop")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_default_output_of_a_pth_or_bin_input(cli, tmp_path, suffix):
    raw = tmp_path / f"teacher{suffix}"
    torch.save(load_model(DIGITS_TEACHER).state_dict(), raw)
    r = cli("prune", raw, "--arch", "zoo:mlp", "--ratio", "0.3", "-q")
    assert r.code == 0, r.stderr
    out = tmp_path / f"teacher.pruned{suffix}"
    assert out.exists() and (tmp_path / f"teacher.pruned{suffix}.json").exists()
    torch.load(out, weights_only=True)  # a plain torch archive
    assert accuracy(out) >= 0.9


@pytest.mark.parametrize("argv", [
    ["prune", DIGITS_TEACHER, "--ratio", "abc"],
    ["prune", DIGITS_TEACHER, "--ratio", "0.3", "--no-such-option"],
    ["prune", DIGITS_TEACHER],
    ["prune"],
    ["squash", DIGITS_TEACHER],
    ["eval", DIGITS_TEACHER, "--data"],
], ids=["bad number", "unknown option", "missing option", "missing argument", "unknown command", "missing value"])
def test_parse_errors_are_one_line(cli, argv):
    refused(cli(*argv))


def test_baseline_without_targets_is_refused_before_training(cli, tmp_path):
    from modelzip_cli.pipeline.data import load_data

    unlabelled = _data(tmp_path / "u.safetensors", load_data(DIGITS_TRAIN).inputs)
    before = snapshot(tmp_path)
    refused(cli("distill", DIGITS_TEACHER, "--student", "zoo:mlp", "--student-kwargs", '{"hidden_sizes": [16]}',
                "--data", unlabelled, "--alpha", "1", "--baseline", "--epochs", "1", "-o", tmp_path / "o.safetensors",
                "-q"), "targets")
    assert snapshot(tmp_path) == before


def test_recipe_include_of_wrong_type_is_refused(cli, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", [{"op": "prune", "ratio": 0.3, "include": [1]}])
    refused(cli("chain", DIGITS_TEACHER, "--recipe", recipe, "-o", tmp_path / "o.safetensors", "-q"),
            "step 1", "include")


# ---------------------------------------------------------------------------------------------------
# Found in review


def test_params_ratio_never_gives_a_layer_rank_zero(cli, tmp_path):
    def zero_layer(t, m):
        t["layers.3.weight"] = torch.zeros_like(t["layers.3.weight"])  # no energy at all: the budget skips it

    model = forge(DIGITS_TEACHER, tmp_path / "m.safetensors", tensors=zero_layer)
    out = tmp_path / "o.safetensors"
    r = cli("lowrank", model, "--params-ratio", "0.3", "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    edits = [e for e in json.loads(read_checkpoint(out)[1])["edits"] if e["kind"] == "lowrank"]
    ranks = {n: k for e in edits for n, k in e["ranks"].items()}
    assert ranks and all(k >= 1 for k in ranks.values()), ranks
    assert all(0 not in p.shape for p in load_model(out).parameters())


TOKEN_MODULE = """
import torch
from torch import nn
class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8 * 6, 10)
    def forward(self, x):
        return self.head(self.embed(x).flatten(1))  # (B, 6) token ids → (B, 10)
def make():
    return Tokens()
def dense():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"usermod_{uuid.uuid4().hex[:10]}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{name}.py").write_text(TOKEN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    module = __import__(name)
    yield name, module
    sys.modules.pop(name, None)


def test_quantize_probe_never_perturbs_token_ids(cli, tmp_path, user_module):
    name, module = user_module
    raw = tmp_path / "tokens.pt"
    torch.save(module.make().state_dict(), raw)
    out = tmp_path / "o.safetensors"
    r = cli("quantize", raw, "--arch", f"{name}:make", "--input-shape", "1,6", "--input-dtype", "long",
            "--method", "dynamic", "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    assert math.isfinite(r.json["steps"][0]["after"]["sqnr_db"])


def test_quantize_without_an_example_input_skips_the_probe(cli, tmp_path, user_module):
    name, module = user_module
    raw = tmp_path / "dense.pt"
    torch.save(module.dense().state_dict(), raw)
    out = tmp_path / "o.safetensors"
    r = cli("quantize", raw, "--arch", f"{name}:dense", "--method", "dynamic", "-o", out, "--json", "-q")
    assert r.code == 0, r.stderr
    notes = [n for s in r.json["steps"] for n in s["notes"]] + r.json["warnings"]
    assert any("SQNR" in n and ("skipped" in n or "not measured" in n) for n in notes), notes
    assert load_model(out, arch=f"{name}:dense") is not None


@pytest.mark.parametrize("command", [["quantize", "--method", "weight-only", "--bits", "4"],
                                     ["quantize", "--method", "weight-only"], ["lowrank", "--rank-ratio", "0.5"]],
                         ids=["weight-only-4", "weight-only-8", "lowrank"])
def test_zero_width_layer_is_left_alone(cli, tmp_path, command):
    from modelzip_cli.zoo import MLP

    model = MLP(hidden_sizes=[32, 0, 16])  # a zero-width hidden layer: Linear(32, 0), then Linear(0, 16)
    path = tmp_path / "m.safetensors"
    save_model(model, path, arch="zoo:mlp", arch_kwargs={"hidden_sizes": [32, 0, 16]})
    out = tmp_path / "o.safetensors"
    r = cli(command[0], path, *command[1:], "-o", out, "-q")
    assert r.code == 0, r.stderr
    x = torch.rand(4, 64)
    with torch.inference_mode():
        assert load_model(out)(x).shape == (4, 10)

