"""DynamicViT against the authors' reference outputs (../shared/fixtures/reference-v1), plus its properties."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dynavit
from dynavit.errors import ConfigError
from dynavit.losses import classification_loss
from dynavit.methods.dynamicvit import (DynamicViTLoss, ScorePredictor, default_locations, dynamicvit_loss,
                                        make_teacher, masked_token_kl, masked_token_mse, policy_attention,
                                        softmax_with_policy)

from conftest import DEIT_CFG, LVVIT_CFG, fixture_path


def load(kind: str = "deit", **kw):
    name, cfg, weights = (("vit", DEIT_CFG, "dynamicvit.safetensors") if kind == "deit" else
                          ("lvvit", LVVIT_CFG, "dynamicvit_lvvit.safetensors"))
    model = dynavit.create_model(name, method="dynamicvit", **{**cfg, **kw}).eval()
    dynavit.load_checkpoint(model, fixture_path(weights))  # strict: the authors' keys
    return model


def kept_sets(p2t):
    return [set((row >= 0).nonzero().flatten().tolist()) for row in p2t]


# ---------------------------------------------------------------------------------------------- fixtures
def test_eval_matches_reference(ref, ref_images):
    model = load()
    with torch.no_grad():
        logits, info = model(ref_images, return_info=True)
    torch.testing.assert_close(logits, ref["dynamicvit_eval_logits"], atol=2e-3, rtol=0)
    assert info.token_counts == [137, 96, 67]
    for s in range(3):
        expected = [set(row.tolist()) for row in ref[f"dynamicvit_eval_kept_s{s}"]]
        assert kept_sets(info.patch_to_token[s]) == expected


def test_lvvit_eval_matches_reference(ref, ref_images):
    model = load("lvvit")
    assert model.reducer.locations == [4, 8, 12]
    with torch.no_grad():
        logits = model(ref_images)
    torch.testing.assert_close(logits, ref["dynamicvit_lvvit_eval_logits"], atol=2e-3, rtol=0)


def test_training_forward_matches_reference(ref, ref_images, noiseless):
    out = load().train()(ref_images)
    torch.testing.assert_close(out.logits, ref["dynamicvit_train_logits"], atol=2e-3, rtol=0)
    torch.testing.assert_close(out.tokens, ref["dynamicvit_train_tokens"], atol=2e-3, rtol=0)
    assert torch.equal(out.mask, ref["dynamicvit_train_mask"])
    for s, d in enumerate(out.decisions):
        assert torch.equal(d.detach(), ref[f"dynamicvit_train_decision_s{s}"])


def test_loss_matches_reference(ref, ref_images, noiseless):
    model = load().train()
    out = model(ref_images)
    total, parts = dynamicvit_loss(out, ref["loss_soft_targets"], ref["deit_logits"], ref["deit_tokens"][:, 1:],
                                   model.reducer.keep_ratios)
    got = torch.stack([parts[k] for k in ("cls", "ratio", "kl", "token")]).detach()
    torch.testing.assert_close(got, ref["loss_parts_cls_ratio_kl_token"], atol=1e-4, rtol=0)
    torch.testing.assert_close(total.detach().reshape(1), ref["loss_total"], atol=1e-4, rtol=0)
    # the module with its own teacher (the dense copy of the same backbone) gives the same loss
    criterion = DynamicViTLoss.for_model(model)
    assert criterion.token_loss == "mse" and criterion.ratio_weight == 2.0
    loss = criterion(ref_images, out, ref["loss_soft_targets"])
    torch.testing.assert_close(loss.detach().reshape(1), ref["loss_total"], atol=2e-3, rtol=0)
    assert not criterion.teacher.training and not any(p.requires_grad for p in criterion.teacher.parameters())


# ---------------------------------------------------------------------------------------------- properties
def explicit_policy_attention(q, k, v, policy, scale, eps=1e-6):
    """The authors' formula through autograd, in the inputs' dtype (float64 here)."""
    B, T = policy.shape
    attn = (q @ k.transpose(-2, -1)) * scale
    g = policy.reshape(B, 1, 1, T)
    g = g + (1 - g) * torch.eye(T, dtype=q.dtype, device=q.device)
    attn = (attn - attn.max(dim=-1, keepdim=True)[0]).exp() * g
    return (attn + eps / T) / (attn.sum(dim=-1, keepdim=True) + eps) @ v


@pytest.mark.parametrize("case", ["hard", "peaked", "soft", "all_dropped"])
def test_policy_attention_equals_the_explicit_formula(case):
    """Values and every gradient (q, k, v and the policy) of the fused path equal autograd through the formula
    (docs/methods.md 3.3)."""
    torch.manual_seed(0)
    B, H, T, d = 3, 2, 13, 8
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    policy = (torch.rand(B, T, dtype=torch.float64) > 0.4).double()
    if case == "peaked":  # the max sits on dropped keys and the kept exp-sum nears eps: the eps term matters
        q, k = q * 6, k * 6
    if case == "soft":
        policy = torch.rand(B, T, dtype=torch.float64)
    if case == "all_dropped":
        policy[0] = 0
    policy[1:, 0] = 1
    a = [t.clone().requires_grad_() for t in (q, k, v, policy)]
    b = [t.clone().requires_grad_() for t in (q, k, v, policy)]
    out, ref = policy_attention(*a, 0.35), explicit_policy_attention(*b, 0.35)
    grad = torch.randn_like(ref)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-11)


def test_policy_attention_gradcheck_and_float32():
    torch.manual_seed(1)
    args = [torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    args.append(torch.rand(2, 6, dtype=torch.float64, requires_grad=True))
    # eps 1e-2 makes the eps term (and the gradient through the row max) large enough to check
    assert torch.autograd.gradcheck(lambda *t: policy_attention(*t, 0.5, 1e-2), args)
    q, k, v = (torch.randn(4, 3, 20, 16) for _ in range(3))
    policy = (torch.rand(4, 20) > 0.3).float()
    expected = softmax_with_policy((q @ k.transpose(-2, -1)) * 0.25, policy) @ v
    torch.testing.assert_close(policy_attention(q, k, v, policy, 0.25), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["deit", "lvvit"])
def test_fixed_decisions_training_equals_pruned_inference(ref_images, monkeypatch, kind):
    """Masked attention with the inference keep sets reproduces the pruned network (docs/methods.md 3.3).

    The fixture's qkv weights are 2.5x the usual scale; there the authors' softmax (shifted by the max over *all*
    keys, dropped ones included, then + eps) departs from pruning by up to 9e-3 because the kept keys' exp-sum
    can fall near eps. At the usual scale the two agree to ~1e-6 (docs/methods.md: 1.2e-6), which is what we check.
    """
    model = load(kind)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.div_(2.5)
        eval_logits, info = model(ref_images, return_info=True)
    masks = iter([(p2t >= 0).float() for p2t in info.patch_to_token])

    def fixed(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        keep = next(masks).to(logits.dtype)
        return torch.stack([keep, 1 - keep], dim=-1)

    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", fixed)
    model.train()
    model.patch_embed.eval()  # LV-ViT's stem BatchNorm: keep running statistics
    with torch.no_grad():
        out = model(ref_images)
    logits = out.logits
    if kind == "lvvit":  # the training output is the class head alone; add the aux max over kept tokens
        aux = out.aux_logits.masked_fill(out.mask.unsqueeze(-1) == 0, float("-inf")).amax(dim=1)
        logits = logits + model.aux_weight * aux
    assert (logits - eval_logits).abs().max() <= 1e-4


def test_gradients_reach_every_predictor(ref_images, noiseless):
    model = load().train()
    out = model(ref_images[:2])
    loss, _ = dynamicvit_loss(out, torch.tensor([1, 2]), None, None, model.reducer.keep_ratios)
    loss.backward()
    for s, pred in enumerate(model.score_predictor):
        grads = [p.grad for p in pred.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"stage {s}"
        assert sum(g.abs().sum() for g in grads) > 0, f"stage {s} predictor gets no gradient"


def test_real_gumbel_sampling_is_hard_and_nested(ref_images):
    model = load().train()
    out = model(ref_images[:2])
    for prev, d in zip(out.decisions, out.decisions[1:]):
        assert set(d.unique().tolist()) <= {0.0, 1.0} and bool((d <= prev).all())


@pytest.mark.parametrize("kind", ["deit", "lvvit"])
def test_keep_rate_one_equals_dense(ref_images, kind):
    model = load(kind, keep_rate=1.0)
    dense = make_teacher(model)
    with torch.no_grad():
        logits, info = model(ref_images, return_info=True)
        dense_logits = dense(ref_images)
    assert info.token_counts == [196] * 3
    assert (logits - dense_logits).abs().max() <= 1e-5


def test_checkpoint_keys_are_the_authors(tmp_path):
    model = dynavit.create_model("vit", method="dynamicvit", checkpoint=fixture_path("dynamicvit.safetensors"),
                                 **DEIT_CFG)
    keys = [k for k in model.state_dict() if k.startswith("score_predictor.")]
    assert "score_predictor.2.out_conv.4.weight" in keys and "score_predictor.0.in_conv.1.bias" in keys
    # released checkpoints come as {'model': state_dict}
    path = tmp_path / "released.pth"
    torch.save({"model": model.state_dict()}, path)
    dynavit.load_checkpoint(dynavit.create_model("vit", method="dynamicvit", **DEIT_CFG), path)


def test_predictor_size_matches_paper():
    assert sum(p.numel() for p in ScorePredictor(384).parameters()) == 241_250


def test_any_resolution_counts_from_patch_grid():
    model = dynavit.create_model("vit", method="dynamicvit", **{**DEIT_CFG, "img_size": 384}).eval()
    with torch.no_grad():
        _, info = model(torch.randn(2, 3, 384, 384), return_info=True)
    assert info.token_counts == [int(576 * 0.7 ** s) for s in (1, 2, 3)] == [403, 282, 197]
    assert all(p.shape == (2, 576) for p in info.patch_to_token)


def test_patch_map_is_consistent(ref_images):
    with torch.no_grad():
        _, info = load()(ref_images, return_info=True)
    prev = None
    for count, p2t in zip(info.token_counts, info.patch_to_token):
        kept = p2t[p2t >= 0].reshape(p2t.shape[0], -1)  # every image holds exactly `count` patches
        assert kept.shape[1] == count and bool((kept.sort(dim=1).values == torch.arange(count)).all())
        if prev is not None:
            assert all(a <= b for a, b in zip(kept_sets(p2t), kept_sets(prev)))  # once dropped, always dropped
        prev = p2t


# ---------------------------------------------------------------------------------------------- threshold mode
@pytest.mark.parametrize("kind", ["deit", "lvvit"])
def test_threshold_mode_equals_per_image_runs(ref_images, kind):
    """Per-image counts (p_keep > 0.5), padded per batch: the batch gives each image's own result."""
    model = load(kind, keep_mode="threshold")
    with torch.no_grad():
        logits, info = model(ref_images, return_info=True)
        singles = [model(ref_images[b:b + 1], return_info=True) for b in range(ref_images.shape[0])]
    counts = torch.stack(info.extra["kept_per_image"])  # (S, B)
    assert len(set(counts[0].tolist())) > 1, "fixture images should keep different counts"
    for b, (single_logits, single_info) in enumerate(singles):
        assert (logits[b] - single_logits[0]).abs().max() <= 1e-4
        for s in range(len(info.patch_to_token)):
            assert single_info.token_counts[s] == counts[s, b]
            assert kept_sets(info.patch_to_token[s][b:b + 1]) == kept_sets(single_info.patch_to_token[s])
    # the kept tokens are exactly those with keep probability > 0.5 at the first stage (at least one)
    first = info.extra["keep_logp"][0].exp() > 0.5
    assert torch.equal(first.sum(dim=1).clamp_min(1), counts[0])


def test_threshold_mode_keeps_at_least_one_token():
    model = dynavit.create_model("lvvit", method="dynamicvit", keep_mode="threshold", **LVVIT_CFG).eval()
    with torch.no_grad():
        for pred in model.score_predictor:  # every token says "drop"
            pred.out_conv[4].bias.copy_(torch.tensor([-50.0, 50.0]))
        logits, info = model(torch.randn(3, 3, 224, 224), return_info=True)
    assert info.token_counts == [1, 1, 1] and torch.isfinite(logits).all()
    assert all(bool(((p >= 0).sum(dim=1) == 1).all()) for p in info.patch_to_token)


def test_set_keep_rate_and_explicit_ratios():
    model = dynavit.create_model("vit", method="dynamicvit", **DEIT_CFG)
    model.reducer.set_keep_rate(0.5)
    assert model.reducer.keep_counts == [98, 49, 24]
    model.reducer.set_keep_rate([0.9, 0.6, 0.3])
    assert model.reducer.keep_counts == [176, 117, 58]
    two = dynavit.create_model("vit", method="dynamicvit", keep_rate=[0.8, 0.5], **DEIT_CFG)
    assert two.reducer.locations == [4, 8] and len(two.score_predictor) == 2


def test_default_locations():
    assert default_locations(12) == [3, 6, 9]
    assert default_locations(16) == [4, 8, 12]
    assert default_locations(20) == [5, 10, 15]
    assert default_locations(24) == [6, 12, 18]
    with pytest.raises(ConfigError, match="depth 2"):
        default_locations(2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_rate=0.0), "0.0"), (dict(keep_rate=1.5), "1.5"), (dict(keep_rate="x"), "'x'"),
    (dict(keep_rate=[0.5, 0.7, 0.3]), r"\[0.5, 0.7, 0.3\]"),
    (dict(keep_rate=[0.7, 0.5], prune_locations=[3, 6, 9]), "3 prune_locations"),
    (dict(prune_locations=[3, 3, 9]), r"\[3, 3, 9\]"), (dict(prune_locations=[3, 6, 12]), r"\[3, 6, 12\]"),
    (dict(prune_locations=[]), r"\[\]"), (dict(keep_mode="random"), "'random'"), (dict(keep_rate=0.001), "0.001"),
])
def test_bad_config_names_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dynavit.create_model("vit", method="dynamicvit", **{**DEIT_CFG, **kwargs})


# ---------------------------------------------------------------------------------------------- NaN guards, losses
def test_predictor_with_everything_dropped_is_finite():
    pred = ScorePredictor(48)
    x = torch.randn(2, 10, 48)
    policy = torch.ones(2, 10, 1)
    policy[0] = 0  # image 0 has no token left: the authors' 0/0
    assert torch.isfinite(pred(x, policy)).all()


def test_token_losses_with_empty_kept_set():
    tokens = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.zeros(2, 5)
    for fn in (masked_token_mse, masked_token_kl):
        loss = fn(tokens, torch.randn(2, 5, 8), mask)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(tokens.grad).all()


def test_token_losses_equal_the_authors_row_selection():
    s, t = torch.randn(3, 7, 10), torch.randn(3, 7, 10)
    mask = (torch.rand(3, 7) > 0.4).float()
    rows = mask.reshape(-1) > 0.5
    s_k, t_k = s.reshape(-1, 10)[rows], t.reshape(-1, 10)[rows]
    torch.testing.assert_close(masked_token_mse(s, t, mask), ((s_k - t_k) ** 2).mean())
    kl = F.kl_div(F.log_softmax(s_k, -1), F.log_softmax(t_k, -1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(masked_token_kl(s, t, mask), kl)


def test_label_smoothing_and_soft_targets():
    logits, labels = torch.randn(4, 10), torch.tensor([0, 3, 9, 2])
    logp = logits.log_softmax(-1)
    manual = (0.9 * -logp.gather(1, labels[:, None])[:, 0] + 0.1 * -logp.mean(-1)).mean()
    torch.testing.assert_close(classification_loss(logits, labels, smoothing=0.1), manual)
    soft = F.one_hot(labels, 10).float()
    torch.testing.assert_close(classification_loss(logits, soft), F.cross_entropy(logits, labels))


def test_lvvit_training_output_and_kl_token_loss(ref_images, noiseless):
    model = load("lvvit").train()
    out = model(ref_images[:2])
    assert out.aux_logits.shape == (2, 196, 10) and out.tokens.shape == (2, 196, 48)
    criterion = DynamicViTLoss.for_model(model)
    assert criterion.token_loss == "kl"
    loss = criterion(ref_images[:2], out, torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and criterion.last_parts["token"] > 0
    assert model.score_predictor[0].out_conv[4].weight.grad is not None


def test_info_command_prints_paper_numbers(capsys):
    from dynavit.cli import main

    assert main(["info", "deit_small_patch16_224", "--method", "dynamicvit", "--keep-rate", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "137 / 96 / 67" in out
    gmacs = float(out.split("GMACs:")[1].split()[0])
    assert 2.85 <= gmacs <= 3.0  # paper 2.9, fvcore 2.99


def test_training_step_under_bf16_autocast():
    """Mixed precision (the engine's --amp bf16): the masked attention computes in float32 inside autocast, and its
    backward (run outside autocast) meets float32 tensors; gradients reach the predictors."""
    torch.manual_seed(0)
    model = dynavit.create_model("vit", method="dynamicvit", keep_rate=0.7, img_size=64, patch_size=16, embed_dim=48,
                                 depth=12, num_heads=3, num_classes=10).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
        loss = out.logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "predictor" in n or "score" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------- short-run options
def test_keep_ratio_bias_starts_every_stage_on_its_target():
    """predictor_bias='keep_ratio': a fresh predictor keeps a token with its stage's ratio given the previous stage
    (rho^s / rho^(s-1)), so a training run starts on target; 'zero' (the authors' init) starts at 0.5."""
    from dynavit.methods.dynamicvit import stage_keep_ratios

    torch.manual_seed(0)
    tokens = torch.randn(4, 196, DEIT_CFG["embed_dim"])
    for keep_rate, ratios in ((0.7, [0.7, 0.7, 0.7]), ([0.9, 0.6, 0.3], [0.9, 2 / 3, 0.5])):
        model = dynavit.create_model("vit", method="dynamicvit", keep_rate=keep_rate, predictor_bias="keep_ratio",
                                     **DEIT_CFG)
        assert stage_keep_ratios(model.reducer.keep_ratios) == pytest.approx(ratios)
        for predictor, r in zip(model.score_predictor, ratios):
            assert predictor(tokens)[..., 0].exp().mean().item() == pytest.approx(r, abs=0.01)
    authors = dynavit.create_model("vit", method="dynamicvit", keep_rate=0.7, **DEIT_CFG)
    assert authors.score_predictor[0](tokens)[..., 0].exp().mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ConfigError, match="predictor_bias.*'keep'"):
        dynavit.create_model("vit", method="dynamicvit", predictor_bias="keep", **DEIT_CFG)


def test_ratio_weight_option_reaches_the_criterion(tmp_path, monkeypatch, capsys):
    """`dynavit train --ratio-weight W` trains with DynamicViT's criterion at that weight (default: the authors' 2);
    other methods refuse the flag by name."""
    from dynavit.cli import main
    from dynavit.train import criterion as criterion_module

    built = []

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = criterion_module.build_criterion
    monkeypatch.setattr(criterion_module, "build_criterion", recording)
    tiny = ["--model", "vit", "--set", "embed_dim=32", "--set", "depth=4", "--set", "num_heads=2", "--set",
            "patch_size=8", "--img-size", "32", "--method", "dynamicvit", "--data", "demo", "--demo-size", "8", "2",
            "--batch-size", "4", "--max-steps", "1", "--aug", "none", "--workers", "0", "--device", "cpu", "--no-eval"]
    for extra, weight in (([], 2.0), (["--ratio-weight", "1000"], 1000.0)):
        assert main(["train", *tiny, *extra, "--output", str(tmp_path / str(weight))]) == 0
        assert built[-1].ratio_weight == weight
    rc = main(["train", "--model", "deit_tiny", "--method", "evit", "--ratio-weight", "5", "--data", "demo",
               "--output", "unused"])
    assert rc != 0 and "--ratio-weight is DynamicViT's keep-ratio loss weight; --method is 'evit'" in \
        capsys.readouterr().err
