"""Training engine: eval on known predictions, bit-for-bit resume after a kill, DDP == doubled batch, NaN stop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dynavit.checkpoint import read_checkpoint
from dynavit.cli import main
from dynavit.data import build_dataset, make_loader
from dynavit.errors import TrainingError
from dynavit.train import evaluate
from dynavit.train.optim import cosine_lr, keep_rate_at, param_groups
from dynavit.recipes import get_recipe
from dynavit.registry import list_methods
from dynavit.train.state import RunLock, checkpoint_dirs
from test_data import make_image_folder

TINY = ["--model", "vit", "--set", "embed_dim=32", "--set", "depth=2", "--set", "num_heads=2", "--set",
        "patch_size=8", "--img-size", "32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def train_args(data, out, *extra):
    return ["train", *TINY, "--data", str(data), "--output", str(out), "--device", "cpu", "--workers", "0",
            "--seed", "1", "--lr", "0.5", "--warmup-epochs", "0", "--no-eval", "--log-every", "1", *extra]


def weights(run_dir) -> dict:
    return read_checkpoint(Path(run_dir) / "model.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), n_train=8, n_val=3, corrupt=True, mislabel=True)


class ChannelArgmax(nn.Module):
    """Predicts the class of the brightest channel (a=red, b=green, c=blue): known predictions."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) * 10  # (B, 3)


def test_eval_reports_the_right_top1_for_known_predictions(folder):
    val = build_dataset(str(folder), "val", img_size=32)
    res = evaluate(ChannelArgmax(), make_loader(val, 4, train=False, workers=0), torch.device("cpu"), 32)
    # 9 correct images + 1 green image filed under 'a' (wrong) + 1 undecodable (skipped)
    assert res["images"] == 10 and res["skipped"] == 1
    assert res["top1"] == pytest.approx(90.0) and res["top5"] == pytest.approx(100.0)


def test_resume_after_kill_is_bit_for_bit(folder, tmp_path):
    """Run A: 9 steps. Run B: killed (os._exit) right after step 4's checkpoint, then --resume. Same weights."""
    common = ["--max-steps", "9", "--batch-size", "4", "--save-every", "2", "--aug", "deit", "--ema-decay", "0.9"]
    assert main(train_args(folder, tmp_path / "a", *common)) == 0
    killed = subprocess.run([sys.executable, "-m", "dynavit", *train_args(folder, tmp_path / "b", *common),
                             "--stop-after-step", "4"], env=ENV, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")][-1] == "step-00000004"
    # a second run in the same directory must not start from scratch: a one-line error, exit status 2
    assert main(train_args(folder, tmp_path / "b", *common)) == 2
    assert main(train_args(folder, tmp_path / "b", *common, "--resume")) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = read_checkpoint(tmp_path / "a" / "model_ema.safetensors")
    ema_b = read_checkpoint(tmp_path / "b" / "model_ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "step"] == list(range(1, 10))
    state = torch.load(checkpoint_dirs(tmp_path / "b")[-1] / "state.pt", weights_only=True)
    assert state["step"] == 9


def test_existing_run_dir_needs_resume(folder, tmp_path):
    assert main(train_args(folder, tmp_path / "r", "--max-steps", "1", "--batch-size", "8", "--aug", "none")) == 0
    assert main(train_args(folder, tmp_path / "r", "--max-steps", "1", "--batch-size", "8", "--aug", "none")) == 2


def test_two_process_gloo_equals_one_process_doubled_batch(folder, tmp_path):
    common = ["--max-steps", "3", "--aug", "none", "--lr", "0.05"]
    assert main(train_args(folder, tmp_path / "one", *common, "--batch-size", "8")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
           "-m", "dynavit", *train_args(folder, tmp_path / "two", *common, "--batch-size", "4")]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    moved = max((one[k] - read_checkpoint(tmp_path / "one" / "checkpoints" / "step-00000003" /
                                          "model.safetensors")[k]).abs().max() for k in one)
    assert moved == 0  # the final weights are the last checkpoint's
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=k)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8


def test_eval_cli_matches_library(folder, tmp_path, capsys):
    assert main(train_args(folder, tmp_path / "r", "--max-steps", "2", "--batch-size", "8", "--aug", "none")) == 0
    out = tmp_path / "res.json"
    assert main(["eval", *TINY, "--checkpoint", str(tmp_path / "r"), "--data", str(folder), "--device", "cpu",
                 "--workers", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 10 and res["skipped"] == 1 and res["gmacs"] > 0 and res["params"] > 0
    assert "top-1" in capsys.readouterr().out


class NaNAfter(nn.Module):
    """Cross-entropy that turns NaN at call `k` (a poisoned batch)."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, images, outputs, target):
        self.calls += 1
        loss = nn.functional.cross_entropy(outputs, target)
        return loss * float("nan") if self.calls >= self.k else loss


def test_nan_loss_stops_without_a_poisoned_checkpoint(folder, tmp_path):
    from dynavit import create_model
    from dynavit.data.transforms import AugmentConfig
    from dynavit.train import TrainConfig, Trainer

    model = create_model("vit", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=3)
    cfg = TrainConfig(output=str(tmp_path / "nan"), max_steps=6, batch_size=4, img_size=32, num_classes=3,
                      augment=AugmentConfig.none(), workers=0, save_every=1)
    trainer = Trainer(model, NaNAfter(3), build_dataset(str(folder), "train", 32, train=True), None, cfg)
    with pytest.raises(TrainingError, match="non-finite loss at step 3"):
        trainer.fit()
    assert [p.name for p in checkpoint_dirs(tmp_path / "nan")] == ["step-00000001", "step-00000002"]
    assert all(torch.isfinite(v).all() for v in read_checkpoint(
        tmp_path / "nan" / "checkpoints" / "step-00000002" / "model.safetensors").values())


def test_run_lock_refuses_a_second_run(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(TrainingError, match="in use"):
            RunLock(tmp_path).acquire()
    finally:
        lock.release()
    RunLock(tmp_path).acquire().release()  # free again once released


def test_schedules_and_recipes():
    assert cosine_lr(0, 100, 1e-3, warmup=10, warmup_start=0.0) == 0.0
    assert cosine_lr(10, 100, 1e-3, warmup=10) == pytest.approx(1e-3)
    assert cosine_lr(100, 100, 1e-3, warmup=10, minimum=1e-6) == pytest.approx(1e-6)
    assert keep_rate_at(5, 0.5, 10, 20) == 1.0
    assert keep_rate_at(20, 0.5, 10, 20) == pytest.approx(0.75)
    assert keep_rate_at(40, 0.5, 10, 20) == 0.5
    r = get_recipe(None, "dynamicvit")
    lr, rule = r.scaled_lr(256)
    assert lr == pytest.approx(2.5e-4) and "1024" in rule
    assert get_recipe(None, None).name == "dense" and get_recipe(None, None, "dit_b1").name == "dit"
    for name, spec in list_methods().items():  # every method trains with its own recipe or the generic fine-tune
        assert get_recipe(None, name).name == (spec.recipe.name if spec.recipe else "finetune")


def test_param_groups_decay_frozen_and_backbone_scale():
    from dynavit import create_model

    model = create_model("vit", embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=32, num_classes=3)
    groups = param_groups(model, 0.05, head_patterns=("head.*",), backbone_lr_scale=0.01,
                          frozen_patterns=("cls_token", "pos_embed"))
    names = {n: g for g in groups for n in g["names"]}
    assert "pos_embed" not in names and not model.pos_embed.requires_grad
    assert names["head.weight"]["lr_scale"] == 1.0 and names["blocks.0.attn.qkv.weight"]["lr_scale"] == 0.01
    assert names["blocks.0.norm1.weight"]["weight_decay"] == 0.0 and names["head.weight"]["weight_decay"] == 0.05


def test_dit_trains_with_its_budget_loss(tmp_path):
    """`dynavit train` on a DiT runs past the budget loss's start (the engine passes the routing info) and logs it."""
    out = tmp_path / "dit"
    rc = main(["train", "--model", "dit_tiny", "--budget", "0.5", "--img-size", "32", "--data", "demo",
               "--demo-size", "16", "4", "--output", str(out), "--device", "cpu", "--workers", "0", "--max-steps", "4",
               "--batch-size", "4", "--aug", "none", "--warmup-epochs", "0", "--log-every", "1"])
    assert rc == 0
    steps = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if '"step"' in ln]
    budget = [s.get("budget") for s in steps if s.get("type") == "step"]
    assert budget[0] is None and budget[-1] is not None and budget[-1] >= 0  # on after 40% of training
