"""Bad input gets a clear dynavit error naming the value; unsafe checkpoints are refused without running code."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

import dynavit
from dynavit.errors import CheckpointError, CheckpointNotFoundError, ConfigError, UnknownNameError


class _Marker:
    """Unpickling this object would create a marker file (what a malicious checkpoint would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"model": _Marker(str(marker))}, f)
    model = dynavit.create_model("tiny_vit")
    with pytest.raises(CheckpointError, match="weights_only"):
        dynavit.load_checkpoint(model, bad)
    assert not marker.exists()
    # the same through torch.save's zip format
    bad_zip = tmp_path / "evil_zip.pth"
    torch.save({"model": _Marker(str(marker))}, bad_zip)
    with pytest.raises(CheckpointError, match="refused"):
        dynavit.load_checkpoint(model, bad_zip)
    assert not marker.exists()
    # the crafted file is real: plain unpickling would have created the marker
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Marker(str(control))))
    assert control.exists()


def test_truncated_and_corrupt_files(tmp_path):
    model = dynavit.create_model("tiny_vit")
    good = dynavit.save_checkpoint(model, tmp_path / "m.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        dynavit.load_checkpoint(model, tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a file")
    with pytest.raises(CheckpointError):
        dynavit.load_checkpoint(model, tmp_path / "garbage.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pth")
    raw = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        dynavit.load_checkpoint(model, tmp_path / "trunc.pth")
    with pytest.raises(CheckpointNotFoundError, match="nope.safetensors"):
        dynavit.load_checkpoint(model, tmp_path / "nope.safetensors")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_failed_load_leaves_model_untouched(tmp_path):
    model = dynavit.create_model("tiny_vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = dynavit.create_model("tiny_vit", num_classes=7)
    path = dynavit.save_checkpoint(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="head.weight"):
        dynavit.load_checkpoint(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UnknownNameError, match="Did you mean 'lvvit_s'"):
        dynavit.create_model("lvit_s")
    assert issubclass(UnknownNameError, ValueError) and issubclass(ConfigError, ValueError)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dynavit", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_one_line_error_without_traceback():
    res = _cli("info", "deit_smal_patch16_224")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown model 'deit_smal_patch16_224'" in lines[0]
    debug = _cli("--debug", "info", "deit_smal_patch16_224")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cli_models_and_info():
    res = _cli("models")
    assert res.returncode == 0 and "deit_small_patch16_224" in res.stdout and "lvvit_s" in res.stdout
    res = _cli("info", "tiny_vit")
    assert res.returncode == 0 and "GMACs" in res.stdout and "196 patches" in res.stdout
