"""Token labelling (LV-ViT) from a teacher's per-token scores: how the demo's PVTv2 twin leaves chance."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dynavit
from dynavit.assets import load_asset
from dynavit.checkpoint import load_checkpoint
from dynavit.cli import main
from dynavit.errors import ConfigError
from dynavit.losses import token_label_loss
from dynavit.models.pvt_v2 import TokenScores
from dynavit.train.criterion import ClassificationCriterion, TokenLabelCriterion


def test_token_label_loss_is_the_per_token_kl_mean():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    p = t.softmax(-1)
    manual = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    assert token_label_loss(s, t).item() == pytest.approx(manual.item(), rel=1e-5)
    assert token_label_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match=r"\(2, 4, 3\).*\(2, 5, 3\)"):
        token_label_loss(s[:, :4], t)


def test_pvt_token_head_trains_only_and_keeps_pvt_keys():
    torch.manual_seed(0)
    plain = dynavit.create_model("pvt_v2_tiny", img_size=112, global_pool="max").eval()
    headed = dynavit.create_model("pvt_v2_tiny", img_size=112, global_pool="max", token_head_scale=1)
    extra = set(headed.state_dict()) - set(plain.state_dict())
    assert extra == {"aux_head.weight", "aux_head.bias"} and set(plain.state_dict()) <= set(headed.state_dict())
    headed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 112, 112)
    out = headed.train()(x)
    assert isinstance(out, TokenScores) and out.token_scores.shape == (2, 14 * 14, 10)  # the 1/8 map at 112 px
    with torch.no_grad():
        assert torch.equal(headed.eval()(x), plain(x))  # inference is PVTv2's head alone
    with pytest.raises(ConfigError, match="token_head_scale.*got 4"):
        dynavit.create_model("pvt_v2_tiny", token_head_scale=4)
    with pytest.raises(ConfigError, match="DiT does not take"):
        dynavit.create_model("dit_tiny", token_head_scale=1)


def test_criterion_adds_the_teacher_token_kl_and_trains_the_token_head():
    torch.manual_seed(0)
    teacher = load_asset("demo_cnn")
    student = dynavit.create_model("pvt_v2_tiny", img_size=112, global_pool="max", token_head_scale=1).train()
    crit = TokenLabelCriterion(ClassificationCriterion(), teacher, weight=2.0).train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, y = torch.randn(2, 3, 112, 112), torch.tensor([3, 7])
    out = student(x)
    loss = crit(x, out, y)
    with torch.no_grad():
        ref = F.cross_entropy(out.logits, y) + 2.0 * token_label_loss(out.token_scores, teacher.token_scores(x))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert set(crit.last_parts) == {"cls", "token"}
    loss.backward()
    assert student.aux_head.weight.grad.abs().sum() > 0 and student.stages[0].blocks[0].attn.q.weight.grad is not None
    with pytest.raises(ConfigError, match="per-token scores"):
        crit(x, out.logits, y)
    with pytest.raises(ConfigError, match="teacher with per-token scores"):
        TokenLabelCriterion(ClassificationCriterion(), student)


def test_twin_trained_with_token_labels_starts_dit_on_its_route(tmp_path, capsys):
    """The demo's pipeline: `dynavit train --token-teacher demo_cnn` a PVTv2 twin, then DiT from it."""
    run = tmp_path / "pvt"
    rc = main(["train", "--model", "pvt_v2_tiny", "--img-size", "112", "--set", "global_pool=max", "--set",
               "token_head_scale=1", "--token-teacher", "demo_cnn", "--data", "demo", "--aug", "none", "--workers", "0",
               "--demo-size", "8", "4", "--epochs", "1", "--batch-size", "4", "--output", str(run)])
    assert rc == 0 and "token labels from demo_cnn" in capsys.readouterr().out
    steps = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert any(s.get("type") == "step" and s["token"] > 0 for s in steps)
    twin = dynavit.create_model("pvt_v2_tiny", img_size=112, global_pool="max", token_head_scale=1)
    load_checkpoint(twin, run / "model.safetensors")  # strict: the run saved the twin with its token head
    dit = dynavit.create_model("dit_tiny", img_size=112, global_pool="max")
    report = load_checkpoint(dit, run / "model.safetensors", strict=False)
    assert set(report.unexpected) == {"aux_head.weight", "aux_head.bias"}
    dit.force_gates("pvt_v2")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert (dit.eval()(x) - twin.eval()(x)).abs().max() <= 1e-4
    # `dynavit train --model dit_tiny --init TWIN_RUN` needs no --allow-partial: only the gates are new
    rc = main(["train", "--model", "dit_tiny", "--budget", "0.5", "--img-size", "112", "--set", "global_pool=max",
               "--init", str(run), "--data", "demo", "--aug", "none", "--workers", "0", "--demo-size", "4", "4",
               "--epochs", "1", "--batch-size", "4", "--output", str(tmp_path / "dit")])
    out = capsys.readouterr().out
    assert rc == 0 and "newly initialised method parameters" in out and "ignored (2 not in the model)" in out


def test_token_teacher_needs_a_named_model(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in load_asset("demo_cnn").state_dict().items()}, str(weights))
    rc = main(["train", "--model", "pvt_v2_tiny", "--img-size", "112", "--set", "token_head_scale=1", "--token-teacher",
               str(weights), "--data", "demo", "--demo-size", "4", "4", "--epochs", "1", "--batch-size", "4",
               "--output", str(tmp_path / "r")])
    assert rc != 0 and "does not say which model" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["pvt_v2_tiny", "demo_cnn"])
def test_info_prints_models_without_token_bookkeeping(capsys, model):
    assert main(["info", model]) == 0
    assert "GMACs:" in capsys.readouterr().out
