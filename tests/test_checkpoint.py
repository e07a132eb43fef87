"""Checkpoints: round trips in a fresh process, raw state dicts, pickles, trust, corrupt files."""

from __future__ import annotations

import pickle
import textwrap

import pytest
import torch

from modelzip_cli.checkpoint.format import decode_state, encode_state
from modelzip_cli.checkpoint.io import Manifest, build_arch, load_checkpoint, save_model
from modelzip_cli.errors import InputError, UntrustedCodeError, UsageError
from modelzip_cli.zoo import ZOO

from .conftest import DIGITS_TEACHER, DIGITS_TEST, run_fresh, run_modelzip

ZOO_KWARGS = {
    "mlp": {"input_size": 64, "hidden_sizes": [32, 16], "num_classes": 10},
    "cnn1d": {"length": 40, "channels": [8, 8, 8]},
    "cnn2d": {"image_size": 8, "channels": [4, 8], "hidden": 16},
    "transformer1d": {"length": 40, "dim": 32, "depth": 2, "heads": 4},
}

FRESH = """
import sys, torch
from modelzip_cli import load_model
model = load_model(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    torch.save(model(x), sys.argv[3])
"""


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_round_trip_in_fresh_process_is_identical(name, suffix, tmp_path):
    torch.manual_seed(0)
    model = build_arch(f"zoo:{name}", ZOO_KWARGS[name]).eval()
    if name == "cnn2d":  # give BatchNorm non-trivial statistics
        model.train()
        model(torch.rand(32, 64))
        model.eval()
    path = tmp_path / f"model{suffix}"
    save_model(model, path)
    x = torch.rand(5, ZOO[name].input_shape(ZOO_KWARGS[name])[1])
    torch.save(x, tmp_path / "x.pt")
    proc = run_fresh(FRESH, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    assert proc.returncode == 0, proc.stderr
    with torch.inference_mode():
        expected = model(x)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected)
    if suffix == ".pt":  # the contract: a plain weights-only torch archive
        archive = torch.load(path, weights_only=True)
        assert set(archive) == {"modelzip", "tensors"}


def test_raw_state_dict_needs_arch_and_loads_with_it(tmp_path, cli):
    kwargs = ZOO_KWARGS["mlp"]
    model = build_arch("zoo:mlp", kwargs).eval()
    raw = tmp_path / "raw.pth"
    torch.save(model.state_dict(), raw)
    r = cli("inspect", raw, "--json")
    assert r.code == 0 and r.json["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(UsageError, match="arch=") as err:  # Python's arguments, not the CLI's flags
        load_checkpoint(raw)
    assert "--" not in str(err.value)
    r = cli("eval", raw, "--data", DIGITS_TEST, "-q")
    assert r.code == 2 and "--arch zoo:NAME" in r.stderr
    loaded = load_checkpoint(raw, arch="zoo:mlp", arch_kwargs=kwargs)
    x = torch.rand(3, 64)
    assert torch.equal(loaded.model(x), model(x))
    with pytest.raises(InputError, match="do not fit"):
        load_checkpoint(raw, arch="zoo:mlp", arch_kwargs={**kwargs, "hidden_sizes": [8]})


def test_pickled_module_is_refused_without_trust_and_runs_no_code(tmp_path, cli):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    r = cli("inspect", bad)
    assert r.code == 2 and "--trust-code" in r.stderr
    assert not marker.exists()
    torch.save({"weight": Evil()}, tmp_path / "evil2.pt")
    marker.unlink(missing_ok=True)
    assert cli("eval", tmp_path / "evil2.pt", "--data", "x.safetensors").code == 2
    assert not marker.exists()


def test_pickled_full_module_loads_only_with_trust_code(tmp_path):
    model = build_arch("zoo:mlp", ZOO_KWARGS["mlp"]).eval()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(UntrustedCodeError):
        load_checkpoint(path)
    loaded = load_checkpoint(path, trust_code=True)
    assert loaded.source == "pickled-module"
    x = torch.rand(2, 64)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.manifest.arch == "zoo:mlp"  # so the output can be rebuilt without pickles


USER_ARCH = textwrap.dedent("""
    from pathlib import Path
    import os
    Path(os.environ["MARKER"]).write_text("imported")
    import torch.nn as nn
    def build(width=4):
        return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
""")


def test_untrusted_architecture_in_manifest_is_refused(tmp_path):
    (tmp_path / "userarch.py").write_text(USER_ARCH)
    marker = tmp_path / "imported.txt"
    env = {"PYTHONPATH": str(tmp_path), "MARKER": str(marker)}
    make = ("import sys; sys.path.insert(0, sys.argv[2]); import userarch; from modelzip_cli import save_model;"
            "save_model(userarch.build(), sys.argv[1], arch='userarch:build', arch_kwargs={'width': 4},"
            " input_shape=[1, 64])")
    assert run_fresh(make, str(tmp_path / "u.safetensors"), str(tmp_path), env=env).returncode == 0
    marker.unlink()
    r = run_modelzip("eval", tmp_path / "u.safetensors", "--data", DIGITS_TEACHER.parent / "digits_test.safetensors",
                     env=env)
    assert r.returncode == 2
    assert "--arch" in r.stderr and "MODELZIP_TRUSTED_MODULES" in r.stderr
    assert not marker.exists(), "the untrusted module was imported"
    ok = run_modelzip("eval", tmp_path / "u.safetensors", "--data",
                      DIGITS_TEACHER.parent / "digits_test.safetensors", "--json",
                      env={**env, "MODELZIP_TRUSTED_MODULES": "userarch"})
    assert ok.returncode == 0, ok.stderr
    ok2 = run_modelzip("eval", tmp_path / "u.safetensors", "--arch", "userarch:build", "--data",
                       DIGITS_TEACHER.parent / "digits_test.safetensors", env=env)
    assert ok2.returncode == 0, ok2.stderr


OWN_ARCH = textwrap.dedent("""
    import torch.nn as nn
    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
        def forward(self, x):
            return self.body(x)
""")


def test_a_user_architecture_is_remembered_and_needs_only_trust(cli, tmp_path, monkeypatch):
    """Issue 25 item 5: `--arch` once; later commands need the module importable from the current directory
    (no PYTHONPATH) and trust (--trust-arch or MODELZIP_TRUSTED_MODULES); load_model speaks Python."""
    import json
    import sys
    import uuid

    from modelzip_cli import load_model

    name = f"ownarch_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(OWN_ARCH)
    monkeypatch.chdir(tmp_path)  # the module is in the current directory, not on sys.path
    assert str(tmp_path) not in sys.path and "" not in sys.path
    monkeypatch.delenv("MODELZIP_TRUSTED_MODULES", raising=False)
    torch.manual_seed(0)
    sd = {"body.1.weight": torch.randn(8, 64), "body.1.bias": torch.zeros(8), "body.3.weight": torch.randn(10, 8),
          "body.3.bias": torch.zeros(10)}
    torch.save(sd, tmp_path / "sd.pt")
    try:
        r = cli("prune", tmp_path / "sd.pt", "--arch", f"{name}:Net", "--ratio", "0.5",
                "-o", tmp_path / "p.safetensors", "-q")
        assert r.code == 0, r.stderr
        from safetensors import safe_open

        with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
            manifest = json.loads(f.metadata()["modelzip"])
        assert manifest["arch"] == f"{name}:Net" and "--trust-arch" in manifest["arch_trust"]
        sys.modules.pop(name)
        r = cli("eval", tmp_path / "p.safetensors", "--data", DIGITS_TEST, "-q")
        assert r.code == 2 and "--trust-arch" in r.stderr and f"MODELZIP_TRUSTED_MODULES={name}" in r.stderr
        assert name not in sys.modules, "imported without trust"
        r = cli("quantize", tmp_path / "p.safetensors", "--method", "dynamic", "--trust-arch",
                "-o", tmp_path / "q.safetensors", "-q")
        assert r.code == 0, r.stderr
        with pytest.raises(UntrustedCodeError) as err:
            load_model(tmp_path / "q.safetensors")
        assert f"trusted_modules=[{name!r}]" in str(err.value) and "--" not in str(err.value)
        x = torch.rand(4, 64)
        model = load_model(tmp_path / "q.safetensors", trusted_modules=[name])
        monkeypatch.setenv("MODELZIP_TRUSTED_MODULES", name)
        assert torch.equal(load_model(tmp_path / "q.safetensors")(x), model(x))
        assert cli("eval", tmp_path / "q.safetensors", "--data", DIGITS_TEST, "-q").code == 0
    finally:
        sys.modules.pop(name, None)


def test_codecs_round_trip_sparse_and_read_first_wave_quantized_tensors_as_plain_integers():
    from modelzip_cli.checkpoint.format import SEP, QInts

    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[torch.rand_like(w) < 0.7] = 0
    ints = torch.randint(-128, 128, (8, 16), dtype=torch.int8)
    state = {"w": w, "ints": ints, "pair": (w, None), "dt": torch.qint8, "n": 3}
    tensors, enc, const = encode_state(state)
    assert enc["w"]["codec"] == "bitmask"
    assert sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("w::")) < 0.45 * w.numel() * 4
    back = decode_state(tensors, enc, const)
    assert torch.equal(back["w"], w) and torch.equal(back["ints"], ints)
    assert back["dt"] is torch.qint8 and back["n"] == 3
    assert back["pair"][1] is None and torch.equal(back["pair"][0], w)
    # format 1's "qtensor" codec reads as plain integers, scales and zero points (no quantized dtype)
    scales, zps = torch.rand(8) + 0.01, torch.zeros(8, dtype=torch.int32)
    old = {f"q{SEP}int": ints, f"q{SEP}scale": scales, f"q{SEP}zero_point": zps, f"qt{SEP}int": ints}
    old_enc = {"q": {"codec": "qtensor", "dtype": "qint8", "qscheme": "per_channel", "axis": 0},
               "qt": {"codec": "qtensor", "dtype": "qint8", "qscheme": "per_tensor", "scale": 0.05, "zero_point": 3}}
    back = decode_state(old, old_enc, {})
    assert isinstance(back["q"], QInts) and torch.equal(back["q"].dequantize(), ints.float() * scales[:, None])
    assert torch.equal(back["qt"].dequantize(), (ints.float() - 3) * 0.05)


def test_manifest_records_architecture_and_input(tmp_path):
    loaded = load_checkpoint(DIGITS_TEACHER)
    assert loaded.manifest.arch == "zoo:mlp"
    assert loaded.manifest.input_shape == [1, 64]
    assert Manifest.from_dict(loaded.manifest.to_dict()) == loaded.manifest


def test_changing_a_loaded_model_never_touches_its_file(tmp_path):
    import hashlib

    path = tmp_path / "m.safetensors"
    path.write_bytes(DIGITS_TEACHER.read_bytes())
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_checkpoint(path).model  # tensors may be memory-mapped from the file
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
