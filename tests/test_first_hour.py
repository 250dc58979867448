"""A new user's first hour (issue 20): nothing trains from scratch by mistake, shipped assets load whole, every
bad argument is one line with exit status 2, and the run folder carries what later commands need."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import dynavit
from dynavit.checkpoint import read_checkpoint, save_checkpoint
from dynavit.cli import main
from dynavit.errors import CheckpointError, ConfigError
from dynavit.train.optim import cosine_lr
from test_data import make_image_folder
from test_train import TINY, train_args

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), n_train=8, n_val=3, corrupt=True)


@pytest.fixture(scope="module")
def run_dir(folder, tmp_path_factory):
    """A finished 2-step TINY run on the 3-class folder."""
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(train_args(folder, out, "--max-steps", "2", "--batch-size", "8", "--aug", "none")) == 0
    return out


def cli(capsys, *argv) -> tuple:
    """(exit status, stdout, stderr) of an in-process `dynavit ...` (argparse's exit included)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("note:", "warning:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dynavit: error:"), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------- 2. --init that does not fit
def test_init_that_does_not_fit_is_an_error_unless_partial_is_asked(folder, tmp_path, capsys):
    wide = dynavit.create_model("vit", embed_dim=48, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=3)
    ckpt = save_checkpoint(wide, tmp_path / "wide.safetensors")
    rc, out, err = cli(capsys, *train_args(folder, tmp_path / "a", "--max-steps", "1", "--batch-size", "8",
                                           "--aug", "none", "--init", ckpt))
    line = one_error_line(err)
    assert rc == 2 and "does not fit" in line and "--allow-partial" in line and "blocks.0.attn.qkv.weight" in line
    assert not (tmp_path / "a" / "model.safetensors").exists()
    rc, out, err = cli(capsys, *train_args(folder, tmp_path / "b", "--max-steps", "1", "--batch-size", "8",
                                           "--aug", "none", "--init", ckpt, "--allow-partial"))
    assert rc == 0 and "--allow-partial:" in out and "left at their initial values" in out
    # the shipped CNN asset into the ViT: the same rule (it fits only the stem)
    rc, out, err = cli(capsys, "train", "--model", "demo_vit", "--init", "demo_cnn", "--data", folder, "--output",
                       tmp_path / "c", "--max-steps", "1", "--device", "cpu", "--workers", "0")
    assert rc == 2 and "does not fit model 'demo_vit'" in one_error_line(err)


def test_dense_checkpoint_into_a_methods_model_loads_what_fits(folder, run_dir, tmp_path, capsys):
    rc, out, err = cli(capsys, *train_args(folder, tmp_path / "d", "--method", "dynamicvit", "--keep-rate", "0.7",
                                           "--set", "prune_locations=[1]", "--no-distill", "--max-steps", "1",
                                           "--batch-size", "8", "--aug", "none", "--init", run_dir))
    assert rc == 0, err
    assert "newly initialised method parameters" in out and "score_predictor.0" in out
    # a classifier of another size is a fine-tune to new classes: re-initialised, said
    other = dynavit.create_model("vit", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=7)
    ckpt = save_checkpoint(other, tmp_path / "seven.safetensors")
    rc, out, err = cli(capsys, *train_args(folder, tmp_path / "e", "--max-steps", "1", "--batch-size", "8",
                                           "--aug", "none", "--init", ckpt))
    assert rc == 0 and "new classifier" in out and "re-initialised" in out


# ------------------------------------------------------------------------------------- 3. viz with shipped assets
def test_viz_with_shipped_method_assets_loads_backbone_and_predictors(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (240, 200), (200, 30, 30)).save(img)
    rc, out, err = cli(capsys, "viz", "--checkpoint", "demo_vit_dynamicvit_0.7", "--image", img, "--output",
                       tmp_path / "a.png")
    assert rc == 0, err
    assert "(208 of 208 tensors)" in out and "warning" not in out + err  # a whole fine-tuned model
    assert "red.png: predicted '" in out  # the digit's class name, not an index
    rc, out, err = cli(capsys, "viz", "--checkpoint", "demo_vit", "--method", "dynamicvit", "--image", img,
                       "--output", tmp_path / "b.png")
    assert rc == 0 and "warning: the method's 30 parameters" in out and "demo_vit_dynamicvit_0.7" in out
    rc, out, err = cli(capsys, "viz", "--model", "deit_tiny_patch16_224", "--checkpoint", "demo_vit", "--image", img)
    assert rc == 2 and "for model 'demo_vit', not 'deit_tiny_patch16_224'" in one_error_line(err)
    model = dynavit.assets.load_asset("demo_vit_dynamicvit_0.5")  # a method asset names its backbone
    assert model.reducer.name == "dynamicvit" and not model.asset_missing


# ------------------------------------------------------------------------------------- 4. permissions
def test_weights_follow_the_umask(tmp_path):
    model = dynavit.create_model("vit", embed_dim=16, depth=1, num_heads=1, patch_size=8, img_size=16)
    old = os.umask(0o022)
    try:
        p = save_checkpoint(model, tmp_path / "a.safetensors")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        p = save_checkpoint(model, tmp_path / "b.safetensors")
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_permission_errors_are_reported_as_such(tmp_path, capsys, monkeypatch):
    """A 0600 checkpoint of another user, a read-only --output folder: one line that says 'permission denied'.
    Root may read and write anything, so as root the OS's answer is simulated (os.access says no)."""
    model = dynavit.create_model("vit", embed_dim=16, depth=1, num_heads=1, patch_size=8, img_size=16)
    ckpt = save_checkpoint(model, tmp_path / "private.safetensors")
    os.chmod(ckpt, 0o000)
    ro = tmp_path / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path).startswith(str(tmp_path))
                            else real(path, mode, **kw))
    args = ["--model", "vit", "--set", "embed_dim=16", "--set", "depth=1", "--set", "num_heads=1", "--set",
            "patch_size=8", "--img-size", "16"]
    try:
        for argv, expected in (
                (["eval", *args, "--checkpoint", ckpt, "--data", "demo", "--demo-size", "2"],
                 "permission denied reading checkpoint"),
                (["train", *args, "--data", "demo", "--output", ro / "run", "--max-steps", "1"], "run"),
                (["viz", *args, "--image", "x.png", "--output", ro / "x.png"], "x.png")):
            rc, out, err = cli(capsys, *argv)
            line = one_error_line(err)
            assert rc == 2 and "permission denied" in line.lower() and expected in line, line
        assert "mode ----------" in cli(capsys, "eval", *args, "--checkpoint", ckpt, "--data", "demo")[2]
    finally:
        os.chmod(ro, 0o755)


# ------------------------------------------------------------------------------------- 5, 6. counts and bad images
def test_trainer_validates_counts(folder, tmp_path):
    from dynavit.data import build_dataset
    from dynavit.train import TrainConfig, Trainer
    from dynavit.train.criterion import build_criterion

    model = dynavit.create_model("vit", embed_dim=16, depth=1, num_heads=1, patch_size=8, img_size=32, num_classes=3)
    data = build_dataset(str(folder), "train", 32, train=True)
    for bad in (dict(max_steps=0), dict(max_steps=-5), dict(epochs=0), dict(epochs=-1), dict(accum_steps=0),
                dict(lr=-1.0), dict(batch_size=-4)):
        cfg = TrainConfig(output=str(tmp_path / "x"), img_size=32, num_classes=3, workers=0, **bad)
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Trainer(model, build_criterion(model, "classification"), data, None, cfg)


def test_skipped_training_images_are_counted_and_all_bad_batches_skipped(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_train=2, n_val=1)
    for i in range(3):  # three unreadable training images: with batch 1, three all-bad batches
        (data / "train" / "a" / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (data / "val" / "b" / "bad.jpg").write_bytes(b"\x00")
    rc, out, err = cli(capsys, "train", *TINY, "--data", data, "--output", tmp_path / "r", "--device", "cpu",
                       "--workers", "0", "--batch-size", "1", "--epochs", "1", "--aug", "deit", "--lr", "0.01")
    assert rc == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["skipped_train_images"] == 3 and summary["skipped_val_images"] == 1
    assert summary["skipped_images"] == 4 and summary["skipped_steps"] == 3 and summary["steps"] == 9
    assert out.count("every image of the batch was undecodable") == 3


def test_ddp_rank_with_an_all_bad_batch_still_takes_part(tmp_path):
    """Two gloo processes, batch 1 each: a rank whose image is undecodable feeds a zero-loss stand-in, so the
    gradient all-reduce never waits on it; skipped images are summed over the ranks."""
    import subprocess
    import sys

    from test_train import ENV

    data = make_image_folder(tmp_path / "data", n_train=2, n_val=1)
    for i in range(2):
        (data / "train" / "b" / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
           "-m", "dynavit", *train_args(data, tmp_path / "r", "--batch-size", "1", "--epochs", "1", "--aug", "none")]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2 and summary["skipped_train_images"] == 2


# ------------------------------------------------------------------------------------- one line for every bad argument
BAD_ARGS = [  # (argv after the command, text the one line must contain)
    (["train", "--batch-size", "-4"], "--batch-size: must be >= 1"),
    (["train", "--lr", "-1"], "--lr: must be > 0"),
    (["train", "--accum-steps", "0"], "--accum-steps: must be >= 1"),
    (["train", "--workers", "-1"], "--workers: must be >= 0"),
    (["train", "--max-steps", "0"], "--max-steps: must be >= 1"),
    (["train", "--max-steps", "-5"], "--max-steps: must be >= 1"),
    (["train", "--epochs", "0"], "--epochs: must be > 0"),
    (["train", "--epochs", "-1"], "--epochs: must be > 0"),
    (["train", "--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["train", "--extend"], "--extend continues an existing run"),
    (["train", "--output", "{file}"], "is a file, not a run directory"),
    (["train", "--method", "evit", "--r", "5"], "method 'evit' does not take 'r': it is a parameter of method(s) tome"),
    (["train", "--method", "dense", "--keep-rate", "0.7"], "does not take 'keep_rate'"),
    (["train", "--method", "dynamicvit", "--set", "prune_location=[1]"], "did you mean 'prune_locations'"),
    (["train", "--method", "EViT"], "Did you mean 'evit'"),
    (["train", "--img-size", "36"], "img_size 36 is not a multiple of patch_size 8"),
    (["train", "--data", "{train_only}"], "has train/ but no val/"),
    (["train", "--data", "{no_split}"], "no train/ and val/ split"),
    (["train", "--init", "nope_asset"], "not found"),
    (["eval", "--checkpoint", "demo_vitt"], "did you mean 'demo_vit'"),
    (["eval", "--batch-size", "0"], "--batch-size: must be > 0"),
    (["eval", "--checkpoint", "{run}", "--num-classes", "5"], "pass --num-classes 3"),
    (["eval", "--data", "{train_only}"], "no 'val' folder"),
    (["viz", "--checkpoint", "{run}", "--image", "missing.png"], "does not exist"),
    (["viz", "--image", "x.png", "--output", "{dir}"], "is a folder"),
    (["export", "--checkpoint", "nope.safetensors", "--onnx", "{tmp}/m.onnx"], "not found"),
    (["viz", "--image", "x.png", "--output", "{file}/x.png"], "is a file"),
    (["export", "--batch-size", "0", "--onnx", "m.onnx"], "--batch-size: must be > 0"),
    (["info", "deit_small_patch16_224", "--img-size", "200"], "img_size 200 is not a multiple of patch_size 16"),
    (["info", "deit_small_patch16_224", "--method", "EViT"], "Did you mean 'evit'"),
    (["info", "deit_small_patch16_224", "--method", "tome", "--keep-rate", "0.7"], "parameter of method(s)"),
    (["flops", "--model", "deit_small_patch16_224", "--keep-rate", "-1"], "--keep-rate: must be > 0"),
    (["bench", "--batch-size", "-1"], "--batch-size: must be >= 1"),
    (["models", "--bogus"], "unrecognized arguments"),
    (["demo", "--keep-rates", "1.5"], "--keep-rates must be in (0, 1]"),
]
NEEDS = {"train": ["*TINY", "--data", "{data}", "--output", "{out}", "--device", "cpu", "--workers", "0"],
         "eval": ["*TINY", "--data", "{data}", "--device", "cpu", "--workers", "0"],
         "viz": ["*TINY"], "export": ["*TINY"]}


@pytest.mark.parametrize("argv,expected", BAD_ARGS, ids=[" ".join(a[:3]) for a, _ in BAD_ARGS])
def test_every_bad_argument_is_one_line_and_status_2(argv, expected, folder, run_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    train_only = tmp_path / "train_only"
    shutil.copytree(folder / "train", train_only / "train")
    no_split = tmp_path / "no_split"
    shutil.copytree(folder / "train", no_split)
    values = {"{file}": tmp_path / "file", "{train_only}": train_only, "{no_split}": no_split, "{run}": run_dir,
              "{dir}": tmp_path, "{tmp}": tmp_path, "{data}": folder, "{out}": tmp_path / "out"}
    cmd, rest = argv[0], argv[1:]
    base = []
    for a in NEEDS.get(cmd, []):
        base += TINY if a == "*TINY" else [a]
    full = [cmd, *base, *rest]
    for flag in ("--data", "--output", "--model"):  # the row's own value replaces the default one
        idx = [i for i, a in enumerate(full) if a == flag]
        if len(idx) > 1:
            del full[idx[0]:idx[0] + 2]
    for key, value in values.items():  # placeholders inside an argument too ("{tmp}/m.onnx")
        full = [a.replace(key, str(value)) if isinstance(a, str) else a for a in full]
    full = [str(a) for a in full]
    rc, out, err = cli(capsys, *full)
    line = one_error_line(err)
    assert rc == 2, (rc, err)
    assert expected in line, line


def test_tome_has_no_keep_rate():
    model = dynavit.create_model("tiny_vit", method="tome", r=2)
    with pytest.raises(ConfigError, match="set_r"):
        model.reducer.set_keep_rate(0.5)


# ------------------------------------------------------------------------------------- consistency
def test_checkpoint_and_init_take_file_run_dir_and_asset_everywhere(folder, run_dir, tmp_path, capsys):
    rc, out, err = cli(capsys, "eval", "--checkpoint", "demo_vit", "--data", "demo", "--demo-size", "8",
                       "--device", "cpu", "--workers", "0", "--batch-size", "8")
    assert rc == 0 and "top-1" in out, err
    # a run directory alone: model, its arguments and the class count come from the run
    rc, out, err = cli(capsys, "eval", "--checkpoint", run_dir, "--data", folder, "--device", "cpu",
                       "--workers", "0", "--json", tmp_path / "res.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["model"] == "vit" and res["num_classes"] == 3 and res["images"] == 9
    assert res["top5"] is None and "top-5 n/a (3 classes)" in out  # top-5 is always 100% with 3 classes
    for spec in (run_dir, run_dir / "model.safetensors"):
        rc, out, err = cli(capsys, *train_args(folder, tmp_path / f"init{len(str(spec))}", "--max-steps", "1",
                                               "--batch-size", "8", "--aug", "none", "--init", spec))
        assert rc == 0 and "(" in out and "tensors" in out, err
    pytest.importorskip("onnxruntime")
    rc, out, err = cli(capsys, "export", "--checkpoint", run_dir, "--onnx", tmp_path / "m.onnx", "--no-verify",
                       "--legacy")
    assert rc == 0 and (tmp_path / "m.onnx").exists(), err


def test_runs_save_class_names_and_viz_prints_them(folder, run_dir, tmp_path, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["classes"] == ["a", "b", "c"] and summary["top5"] is None
    from safetensors import safe_open

    with safe_open(str(run_dir / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["a", "b", "c"]
    img = folder / "val" / "a" / "0.png"
    rc, out, err = cli(capsys, "viz", "--checkpoint", run_dir, "--image", img, "--output", tmp_path / "v.png")
    assert rc == 0, err
    assert any(f"predicted '{c}'" in out for c in "abc")


def test_class_count_is_read_from_the_checkpoint(run_dir, capsys, tmp_path):
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (0, 200, 0)).save(img)
    # --model given, no --num-classes: the 3 classes come from the weights (vit defaults to 1000)
    rc, out, err = cli(capsys, "viz", *TINY, "--checkpoint", run_dir / "model.safetensors", "--image", img,
                       "--output", tmp_path / "v.png")
    assert rc == 0, err
    model = dynavit.create_model("vit", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)
    with pytest.raises(CheckpointError, match="--num-classes 3"):
        dynavit.load_checkpoint(model, run_dir / "model.safetensors")


def test_data_folder_without_val_needs_no_eval(folder, tmp_path, capsys, caplog):
    train_only = tmp_path / "t"
    shutil.copytree(folder / "train", train_only / "train")
    (train_only / "train" / "empty").mkdir()
    rc, out, err = cli(capsys, *train_args(train_only, tmp_path / "r", "--max-steps", "1", "--batch-size", "8",
                                           "--aug", "none"))  # train_args has --no-eval
    assert rc == 0, err
    assert "'empty'" in caplog.text and "hold no images" in caplog.text
    no_split = tmp_path / "n"
    shutil.copytree(folder / "train", no_split)
    rc, out, err = cli(capsys, *train_args(no_split, tmp_path / "r2", "--max-steps", "1", "--batch-size", "8",
                                           "--aug", "none"))
    assert rc == 0 and "no train/ split: training on its class folders" in out


def test_a_method_is_not_applied_twice():
    model = dynavit.create_model("tiny_vit", method="dynamicvit", keep_rate=0.7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="already has method 'dynamicvit'"):
        dynavit.apply_method(model, "dynamicvit", keep_rate=0.5)
    with pytest.raises(ConfigError, match="already has method"):
        dynavit.apply_method(model, "evit", keep_rate=0.5)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.reducer.keep_ratios[0] == 0.7


def test_tiny_scaled_lr_is_said_once_and_no_lr_scale(folder, tmp_path, capsys):
    base = ["--max-steps", "1", "--batch-size", "8", "--aug", "none"]
    rc, out, err = cli(capsys, *train_args(folder, tmp_path / "a", *base))
    assert rc == 0 and out.count("--no-lr-scale") == 1 and "64x smaller" in out
    assert "lr = 0.5 x global batch 8 / 512 = 0.00781" in out
    rc, out, err = cli(capsys, *train_args(folder, tmp_path / "b", *base, "--no-lr-scale"))
    assert rc == 0 and "lr = 0.5 (--no-lr-scale" in out and "smaller" not in out
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == pytest.approx(0.5)


def test_pth_from_deit_scripts_loads_safely(tmp_path):
    model = dynavit.create_model("tiny_vit")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 299,
                "args": argparse.Namespace(model="deit_small_patch16_224", lr=5e-4, drop=0.0)}, path)
    fresh = dynavit.create_model("tiny_vit")
    assert dynavit.load_checkpoint(fresh, path).ok
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    bad = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(x=Evil())}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(bad)


def test_finished_run_is_extended_with_a_recomputed_schedule(folder, tmp_path, capsys):
    common = ["--batch-size", "4", "--aug", "none", "--lr", "0.05"]
    rc, _, err = cli(capsys, *train_args(folder, tmp_path / "r", "--max-steps", "4", *common))
    assert rc == 0, err
    rc, _, err = cli(capsys, *train_args(folder, tmp_path / "r", "--max-steps", "6", *common, "--resume"))
    assert rc == 2 and "--extend" in one_error_line(err)
    rc, out, err = cli(capsys, *train_args(folder, tmp_path / "r", "--max-steps", "6", *common, "--resume",
                                           "--extend"))
    assert rc == 0, err
    assert "--extend: 4 -> 6 steps" in out
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    steps = [r for r in log if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    lr = 0.05 * 4 / 512
    assert steps[4]["lr"] == pytest.approx(cosine_lr(4, 6, lr, 0, min(1e-5, lr)))  # the new 6-step cosine
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 6
    rc, _, err = cli(capsys, *train_args(folder, tmp_path / "r", "--max-steps", "5", *common, "--resume",
                                         "--extend"))
    assert rc == 2 and "already at step 6" in one_error_line(err)


def test_a_failed_command_leaves_no_output_folder(tmp_path, capsys):
    """The output's folder is made by the writer, not by the argument check (a bad checkpoint writes nothing)."""
    out = tmp_path / "new" / "deeper" / "m.onnx"
    rc, _, err = cli(capsys, "export", *TINY, "--checkpoint", str(tmp_path / "nope.safetensors"), "--onnx", str(out))
    assert rc == 2 and "not found" in one_error_line(err)
    assert not (tmp_path / "new").exists()
