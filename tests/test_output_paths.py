"""The output-path policy (issue 26 items 1, 3, 4, 10, 12, 13; issue 25 items 4 and 6): every file a run
writes is checked against every input (files, and files inside input folders) before any work, a file
never chooses where modelzip writes, reports are named after their output, and conditions of the
machine (a full disk, a name too long) are one line and exit 2 with nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DIGITS_TEACHER, DIGITS_TEST, DIGITS_TRAIN, ROOT, one_line_error
from .mutate import snapshot


def refused(result, *words: str) -> str:
    """Exit 2, one line with the `modelzip: error:` prefix that names each of `words` (case-insensitive)."""
    assert result.code == 2, f"exit {result.code}: {result.stderr}"
    line = one_line_error(result)
    assert line.startswith("modelzip: error:"), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in: {line}"
    return line


def env_with_root() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------------------------------------------
# Item 1: a recipe's export step never chooses where modelzip writes


@pytest.fixture
def chain_dirs(tmp_path) -> tuple[Path, Path, Path]:
    """(recipes folder, the folder the user writes to, a folder outside both)."""
    folders = [tmp_path / name for name in ("recipes", "out", "outside")]
    for folder in folders:
        folder.mkdir()
    return tuple(folders)


def _export_recipe(folder: Path, output: str) -> Path:
    recipe = folder / "r.toml"
    recipe.write_text(f'[[steps]]\nop = "prune"\nratio = 0.3\n\n[[steps]]\nop = "export"\nformat = "pt2"\n'
                      f'output = {json.dumps(output)}\n')
    return recipe


@pytest.mark.parametrize("where", ["absolute", "dot-dot", "symlink out"])
@pytest.mark.parametrize("flags", [[], ["--force"], ["--dry-run"]], ids=["no-force", "force", "dry-run"])
def test_recipe_export_output_never_leaves_the_output_folder(cli, tmp_path, chain_dirs, where, flags):
    recipes, out, outside = chain_dirs
    victim = outside / "x.pt2"
    victim.write_bytes(b"precious")
    (out / "link").symlink_to(outside)
    name = {"absolute": str(victim), "dot-dot": "../outside/x.pt2", "symlink out": "link/x.pt2"}[where]
    recipe = _export_recipe(recipes, name)
    before = snapshot(tmp_path)
    r = cli("chain", DIGITS_TEACHER, "--recipe", recipe, "-o", out / "c.safetensors", "-q", *flags)
    refused(r, "step 2", "output folder")
    assert victim.read_bytes() == b"precious"
    assert snapshot(tmp_path) == before


def test_recipe_export_output_lands_in_the_output_folder(cli, chain_dirs):
    recipes, out, _ = chain_dirs
    r = cli("chain", DIGITS_TEACHER, "--recipe", _export_recipe(recipes, "x.pt2"), "-o", out / "c.safetensors", "-q")
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["c.safetensors", "c.safetensors.json", "x.pt2"]
    assert sorted(p.name for p in recipes.iterdir()) == ["r.toml"]


# ---------------------------------------------------------------------------------------------------
# Item 3: every file `analyze` writes (--report, --plan-out, --plot) is checked against its inputs


@pytest.fixture
def analyze_inputs(tmp_path) -> tuple[Path, Path]:
    return (shutil.copy(DIGITS_TEACHER, tmp_path / "teacher.safetensors"),
            shutil.copy(DIGITS_TEST, tmp_path / "test.safetensors"))


@pytest.mark.parametrize("flag,target", [("--report", "model"), ("--report", "data"), ("--plan-out", "existing"),
                                         ("--plot", "data"), ("--report", "existing"), ("--plot", "plan")])
def test_analyze_outputs_never_overwrite_an_input_or_each_other(cli, tmp_path, analyze_inputs, flag, target):
    model, data = analyze_inputs
    existing = tmp_path / {"--report": "old.json", "--plan-out": "old.toml"}.get(flag, "old.png")
    existing.write_text("{}")
    plan = tmp_path / "p.toml"
    victim = {"model": model, "data": data, "existing": existing, "plan": plan}[target]
    force = [] if target == "existing" else ["--force"]  # an input stays an input, even with --force
    args = ["--budget-fidelity", "0.9", *(["--plan-out", plan] if flag != "--plan-out" else [])]
    before = snapshot(tmp_path)
    r = cli("analyze", model, "--data", data, "--techniques", "int8", "--samples", "8", *args, flag, victim,
            "-q", *force)
    refused(r, "already exists" if target == "existing" else ("same file" if target == "plan" else "input"))
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# Item 12: a plan is valid TOML whatever the paths it names, and is never left on disk invalid


def test_plan_with_a_newline_in_the_model_path_and_an_emoji_data_name(cli, tmp_path):
    import tomllib

    folder = tmp_path / "a\n[[steps]]\nop = \"prune\"\nratio = 0.9\n#"
    folder.mkdir()
    model = shutil.copy(DIGITS_TEACHER, folder / "teacher.safetensors")
    data = shutil.copy(DIGITS_TEST, tmp_path / "digits 😀.safetensors")
    plan = tmp_path / "plan.toml"
    r = cli("analyze", model, "--data", data, "--techniques", "int8", "--samples", "8", "--budget-fidelity", "0.5",
            "--plan-out", plan, "-q")
    assert r.code == 0, r.stderr
    parsed = tomllib.loads(plan.read_text(encoding="utf-8"))
    assert [s["op"] for s in parsed["steps"]] == ["quantize"], parsed["steps"]  # nothing injected
    assert "😀" in parsed["plan"]["measured_on"]


# ---------------------------------------------------------------------------------------------------
# Item 4 (and issue 25 item 6): a Hugging Face folder is an input as a whole; its default output is
# DIR.COMMAND.safetensors in the current directory; `inspect DIR` works


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory) -> Path:
    """A tiny BERT saved as transformers saves it, in a folder of its own (`models/`) that nothing else uses."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                               intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    model = transformers.AutoModel.from_config(config)
    folder = tmp_path_factory.mktemp("models") / "tinybert"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["-o is the weights", "-o is a new file inside", "--report is config.json",
                                  "--report in a subfolder"])
def test_nothing_is_written_inside_an_input_model_folder(cli, tmp_path, hf_bert, case):
    (hf_bert / "sub").mkdir(exist_ok=True)
    argv = {"-o is the weights": ["-o", hf_bert / "model.safetensors"],
            "-o is a new file inside": ["-o", hf_bert / "new.safetensors"],
            "--report is config.json": ["-o", tmp_path / "q.safetensors", "--report", hf_bert / "config.json"],
            "--report in a subfolder": ["-o", tmp_path / "q.safetensors", "--report", hf_bert / "sub" / "r.json"]}[case]
    before, outside = snapshot(hf_bert), snapshot(tmp_path)
    refused(cli("quantize", hf_bert, "--method", "weight-only", *argv, "--force", "-q"), "input folder")
    assert snapshot(hf_bert) == before and snapshot(tmp_path) == outside


def test_a_model_folder_s_default_output_is_in_the_current_directory(cli, tmp_path, hf_bert, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    beside = snapshot(hf_bert.parent)
    r = cli("quantize", hf_bert, "--method", "weight-only", "-q")
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["tinybert.quantized.safetensors",
                                                      "tinybert.quantized.safetensors.json"]
    assert snapshot(hf_bert.parent) == beside  # nothing in or beside the input folder
    report = json.loads((work / "tinybert.quantized.safetensors.json").read_text())
    assert report["report_path"] == "tinybert.quantized.safetensors.json"


def test_inspect_a_model_folder(cli, hf_bert):
    import transformers

    r = cli("inspect", hf_bert, "--json", "-q")
    assert r.code == 0, r.stderr
    model = transformers.AutoModel.from_pretrained(hf_bert)
    assert r.json["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert r.json["model"]["arch"] == "hf:BertModel"
    assert any(row["name"].endswith("attention.self.query") for row in r.json["model"]["layers"])


def test_data_text_never_overwrites_its_corpus_or_writes_into_the_tokenizer(cli, tmp_path, hf_bert):
    corpus = tmp_path / "c.safetensors"  # a text file, whatever its name
    corpus.write_text("one sentence\nanother\n")
    before, inside = snapshot(tmp_path), snapshot(hf_bert)
    refused(cli("data", "text", corpus, "--tokenizer", hf_bert, "-o", corpus, "--force"), "input")
    refused(cli("data", "text", corpus, "--tokenizer", hf_bert, "-o", hf_bert / "d.safetensors"), "input folder")
    assert snapshot(tmp_path) == before and snapshot(hf_bert) == inside


# ---------------------------------------------------------------------------------------------------
# Issue 25 item 4: the default report is the output's path + .json, and the summary's last line names it


def test_default_report_is_named_after_the_output_and_named_last(cli, tmp_path):
    model = shutil.copy(DIGITS_TEACHER, tmp_path / "mynet.chain.safetensors")
    existing = tmp_path / "mynet.chain.json"  # the report that made the input: never the default target
    existing.write_text('{"made": "mynet.chain.safetensors"}')
    r = cli("export", model, "--format", "pt2")
    assert r.code == 0, r.stderr
    report = tmp_path / "mynet.chain.pt2.json"
    assert json.loads(report.read_text())["output"]["path"] == str(tmp_path / "mynet.chain.pt2")
    assert existing.read_text() == '{"made": "mynet.chain.safetensors"}'
    assert [ln for ln in r.stderr.splitlines() if ln.strip()][-1] == f"report: {report}"
    r = cli("prune", model, "--ratio", "0.3")
    assert r.code == 0, r.stderr
    assert r.stderr.splitlines()[-1] == f"report: {tmp_path / 'mynet.chain.pruned.safetensors.json'}"


# ---------------------------------------------------------------------------------------------------
# Item 10: names, disks and numbers the machine cannot take are one line and exit 2, before the work


def test_a_long_output_name_is_written_and_a_too_long_one_refused_first(cli, tmp_path):
    out = tmp_path / ("n" * 240 + ".safetensors")  # 252 bytes: fits, its temporary must too
    r = cli("prune", DIGITS_TEACHER, "--ratio", "0.3", "-o", out, "--report", tmp_path / "r.json", "-q")
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "r.json"])
    before = snapshot(tmp_path)
    refused(cli("prune", DIGITS_TEACHER, "--ratio", "0.3", "-o", tmp_path / ("m" * 240 + ".safetensors"), "-q"),
            "report", "shorter name")  # its default report would be 257 bytes
    assert snapshot(tmp_path) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB file system (tmpfs), where a 778 KB checkpoint does not fit. Needs root and mount."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(cli, small_disk, suffix):
    r = cli("prune", DIGITS_TEACHER, "--ratio", "0.3", "-o", small_disk / f"o{suffix}", "-q")
    refused(r, "no space left on device", "nothing was written")
    assert list(small_disk.iterdir()) == []


def test_os_conditions_map_to_exit_2_in_the_one_table():
    import errno

    from modelzip_cli.errors import exit_code_for, os_condition

    assert exit_code_for(OSError(errno.ENOSPC, "No space left on device", "/x/o.pt")) == 2
    assert exit_code_for(OSError(errno.ENAMETOOLONG, "File name too long")) == 2
    assert exit_code_for(OSError(errno.EROFS, "Read-only file system")) == 2
    assert exit_code_for(RuntimeError("Error while serializing: I/O error: No space left (os error 28)")) == 2
    assert exit_code_for(RuntimeError("unexpected pos 576 vs 534")) == 3  # a bug stays a bug
    assert "no space left on device: /x/o.pt" in os_condition(OSError(errno.ENOSPC, "x", "/x/o.pt")).line()


@pytest.mark.parametrize("argv,flag", [
    (["eval", DIGITS_TEACHER, "--data", DIGITS_TEST, "--threads", "100000"], "--threads"),
    (["eval", DIGITS_TEACHER, "--data", DIGITS_TEST, "--batch-size", "100000000"], "--batch-size"),
    (["prune", DIGITS_TEACHER, "--ratio", "0.3", "--input-shape", "1,100000,100000"], "--input-shape"),
    (["data", "text", DIGITS_TEST, "--tokenizer", ROOT, "--max-length", "2000000000"], "--max-length"),
    (["data", "images", ROOT, "--size", "1000000"], "--size"),
    (["prune", DIGITS_TEACHER, "--ratio", "0.3", "--seed", str(10**23)], "--seed"),
    (["prune", DIGITS_TEACHER, "--method", "gradual", "--ratio", "0.5", "--steps", str(10**9)], "--steps"),
])
def test_huge_numeric_options_are_refused_before_any_work(cli, tmp_path, argv, flag):
    before = snapshot(tmp_path)
    refused(cli(*argv, "-o", tmp_path / "o.safetensors") if argv[0] in ("prune", "data") else cli(*argv), flag)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# Item 13: signals in quick succession, a writer's own temporaries, ONNX Runtime's logs


@pytest.mark.parametrize("gap", [0.0, 0.05], ids=["together", "50ms"])
def test_sigint_then_sigterm_is_one_line_and_exit_130(tmp_path, gap):
    import signal

    from .test_hostile import signalled_during_fine_tuning

    code, err, unchanged = signalled_during_fine_tuning(tmp_path, [(signal.SIGINT, 0.0), (signal.SIGTERM, gap)])
    assert code == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["modelzip: interrupted"], err
    assert unchanged


KILLED_IN_SAFETENSORS = r"""
import os, signal, sys, tempfile
import safetensors.torch

def save_file(tensors, filename, metadata=None):
    # what safetensors 0.8 does (strace): its own .tmpXXXXXX in the folder of `filename`, renamed at the end
    fd, _ = tempfile.mkstemp(prefix=".tmp", dir=os.path.dirname(filename))
    os.write(fd, b"\0" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of that write

safetensors.torch.save_file = save_file
sys.argv = ["modelzip", *sys.argv[1:]]
from modelzip_cli.cli.app import main
main()
"""


def test_a_writer_s_own_temporary_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    import signal

    work = tmp_path / "work"
    work.mkdir()
    argv = ["prune", DIGITS_TEACHER, "--ratio", "0.3", "-o", work / "result.safetensors", "-q"]
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_SAFETENSORS, *map(str, argv)], env=env_with_root(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert snapshot(work), "the killed run left nothing: the test did not kill it mid-write"
    done = subprocess.run([sys.executable, "-m", "modelzip_cli", *map(str, argv), "--force"], env=env_with_root(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(snapshot(work)) == ["result.safetensors", "result.safetensors.json"]


def test_onnx_runtime_errors_are_one_line(cli, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    shape = helper.make_tensor("s", TensorProto.INT64, [2], [7, 3])  # no batch of 64 features reshapes to 7×3
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "bad.onnx")
    done = subprocess.run([sys.executable, "-m", "modelzip_cli", "eval", str(tmp_path / "bad.onnx"), "--data",
                           str(DIGITS_TEST), "-q"], env=env_with_root(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelzip: error:"), done.stderr


@pytest.mark.parametrize("target", ["data", "report"])
def test_distill_plot_never_overwrites_an_input_or_the_report(cli, tmp_path, target):
    pytest.importorskip("matplotlib")
    data = shutil.copy(DIGITS_TRAIN, tmp_path / "train.safetensors")
    out = tmp_path / "s.safetensors"
    plot = {"data": data, "report": tmp_path / "s.safetensors.json"}[target]
    before = snapshot(tmp_path)
    r = cli("distill", DIGITS_TEACHER, "--student", "zoo:mlp", "--student-kwargs", '{"hidden_sizes": [8]}',
            "--data", data, "--epochs", "1", "-o", out, "--plot", plot, "--force", "-q")
    refused(r, "input" if target == "data" else "same file")
    assert snapshot(tmp_path) == before


def test_an_interrupt_raised_inside_a_destructor_still_stops_the_run(capsys):
    """Python cannot raise from a destructor (it prints "Exception ignored in …" and goes on): the interrupt
    is sent again, and the run stops with no traceback."""
    import signal
    import time

    from modelzip_cli.cli.app import _signals_interrupt
    from modelzip_cli.errors import Interrupted

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10_000))  # the handler runs here, inside the destructor

    with pytest.raises(Interrupted) as stopped, _signals_interrupt():
        obj = SignalledWhileCollected()
        del obj
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            sum(range(1000))
    assert stopped.value.exit_code == 130
    assert "Traceback" not in capsys.readouterr().err


def test_a_link_planted_where_the_temporary_goes_is_never_written_through(tmp_path):
    from modelzip_cli.files import atomic_write_text

    (tmp_path / "out").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out" / "o.json"
    (tmp_path / "out" / f".o.json.{os.getpid()}.tmp").symlink_to(victim)  # where this process stages o.json
    atomic_write_text(target, "{}")
    assert victim.read_text() == "precious"
    assert target.read_text() == "{}" and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["o.json"]
