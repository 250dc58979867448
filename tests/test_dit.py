"""PVTv2 (the dense twin) and DiT routing: equivalence, gradients, skipped work, GMACs, feature maps, info."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dynavit
from dynavit.errors import ConfigError
from dynavit.flops import count_flops
from dynavit.losses_dit import DiTBudgetLoss
from dynavit.models.dit import dwconv_at


def twins(img_size: int = 64):
    """A dense pvt_v2_tiny and a dit_tiny holding the same weights (DiT adds only its gates)."""
    dense = dynavit.create_model("pvt_v2_tiny", img_size=img_size).eval()
    dit = dynavit.create_model("dit_tiny", img_size=img_size, budget=0.5).eval()
    report = dit.load_state_dict(dense.state_dict(), strict=False)
    assert report.unexpected_keys == [] and all(k.startswith("gates.") for k in report.missing_keys)
    return dense, dit


def randomise_gates(dit, seed: int = 1):
    """Gate weights that open some tokens and close others at every node."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in dit.gates:
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.6)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * 0.5 + 0.3)


def test_pvt_v2_variants_match_published_size():
    """PVTv2-B0 / B1: params and GMACs at 224 as in docs/methods.md 7 (3.7M / 0.57, 14.0M / 2.11)."""
    for name, params, gmacs in [("pvt_v2_b0", 3.7, 0.57), ("pvt_v2_b1", 14.0, 2.11)]:
        model = dynavit.create_model(name)
        assert model.family == "pvt_v2"
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.05)
        assert dynavit.count_gmacs(model) == pytest.approx(gmacs, abs=0.005)
    names = dynavit.list_models()
    for v in ["b0", "b1", "b2", "b3", "b4", "b5"]:
        assert f"pvt_v2_{v}" in names and f"dit_{v}" in names


def test_create_dit_with_budget_and_full_cost_is_the_twin():
    model = dynavit.create_model("dit_b2", budget=0.5)
    assert model.family == "dit" and model.budget == 0.5 and len(model.gates) == 3 + 4 + 6 + 3
    assert model.full_gmacs() == pytest.approx(4.027, abs=0.001)  # PVTv2-B2, docs/methods.md 7: 4.03
    with pytest.raises(ConfigError, match="budget"):
        dynavit.create_model("dit_tiny", budget=1.5)
    with pytest.raises(ConfigError, match="unknown node"):
        model.force_gates("closed", nodes=["s9.b0"])
    with pytest.raises(ConfigError, match="gate mode"):
        model.force_gates("half")


@pytest.mark.parametrize("name", ["pvt_v2_tiny", "dit_tiny"])
@pytest.mark.parametrize("hw", [(224, 224), (100, 72)])
def test_four_feature_maps_have_documented_shapes(name, hw):
    model = dynavit.create_model(name).eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, *hw))
    expect = [(2, c, -(-hw[0] // 2 ** (s + 2)), -(-hw[1] // 2 ** (s + 2))) for s, c in enumerate(model.embed_dims)]
    assert [tuple(m.shape) for m in maps] == expect


def test_all_gates_forced_open_equals_dense_twin():
    dense, dit = twins()
    randomise_gates(dit)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = dense(x)
        routed = dit(x)
        dit.force_gates("open")
        opened, info = dit(x, return_info=True)
        maps_dense, maps_dit = dense.forward_features(x), dit.forward_features(x)
    assert (routed - ref).abs().max() > 1e-3  # the random gates do change the output ...
    torch.testing.assert_close(opened, ref, atol=1e-5, rtol=0)  # ... forced open they do not
    for a, b in zip(maps_dit, maps_dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(info.extra["gmacs"], torch.full((2,), dit.full_gmacs((64, 64))))


def test_gates_receive_gradients_from_task_and_budget():
    _, dit = twins()
    randomise_gates(dit)
    dit.train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    logits, info = dit(x, return_info=True)
    loss = F.cross_entropy(logits, y) + DiTBudgetLoss(weight=1.0, warmup=0.0)(info)
    loss.backward()
    for name, gate in zip(dit.node_names, dit.gates):
        assert gate.weight.grad is not None and gate.weight.grad[0].abs().sum() > 0, name  # transform logit
    assert info.extra["gmacs"].requires_grad


def test_budget_loss_value_warmup_and_direction():
    _, dit = twins()
    dit.train()
    x = torch.randn(4, 3, 64, 64)
    _, info = dit(x, return_info=True)
    ratio = info.extra["gmacs"].mean().item() / info.extra["gmacs_full"]
    crit = DiTBudgetLoss(weight=3.0, warmup=0.4)
    assert crit(info, progress=0.1).item() == 0.0
    assert crit(info, progress=0.5).item() == pytest.approx(3.0 * (ratio - 0.5) ** 2, rel=1e-5)
    # a few steps on the budget loss alone lower the cost (all gates start open: ratio ~ 1 > 0.5)
    opt = torch.optim.SGD(dit.gates.parameters(), lr=20.0)
    for _ in range(5):
        opt.zero_grad()
        crit(dit(x, return_info=True)[1]).backward()
        opt.step()
    dit.eval()
    with torch.no_grad():
        after = dit(x, return_info=True)[1].extra["gmacs"].mean().item() / info.extra["gmacs_full"]
    assert after < ratio - 0.1


def test_inference_subset_equals_masked_training_forward():
    _, dit = twins()
    randomise_gates(dit)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        dit.eval()
        eval_logits, info = dit(x, return_info=True)
        dit.train()
        train_logits, train_info = dit(x, return_info=True)
    fractions = [a.float().mean().item() for a in info.extra["active"]]
    assert any(0.05 < f < 0.95 for f in fractions)  # the gathered path really ran on a subset
    torch.testing.assert_close(eval_logits, train_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(info.extra["gmacs"], train_info.extra["gmacs"])


def test_info_gmacs_match_flop_counter():
    """Per-image GMACs in info == FlopCounterMode on that single image; executed_gmacs == on the batch."""
    _, dit = twins()
    randomise_gates(dit, seed=3)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        _, info = dit(x, return_info=True)
    per_image = info.extra["gmacs"]
    assert per_image.std() > 0  # images differ
    for b in range(3):
        assert per_image[b].item() == pytest.approx(count_flops(dit, x[b:b + 1]) / 2e9, rel=1e-6)
    assert info.extra["executed_gmacs"] == pytest.approx(count_flops(dit, x) * 3 / 2e9, rel=1e-6)
    assert info.extra["executed_gmacs"] >= per_image.sum().item()


def block_flops(per_module: dict, s: int, j: int) -> float:
    """FLOPs FlopCounterMode attributes to block j of scale s (its modules are named 'DiT.stages.s.blocks.j.*')."""
    return sum(v for k, v in per_module.items() if k.startswith(f"DiT.stages.{s}.blocks.{j}."))


def test_closed_node_costs_nothing():
    _, dit = twins()
    x = torch.randn(1, 3, 64, 64)
    dit.force_gates("open")
    full = count_flops(dit, x, by_module=True)
    dit.force_gates("closed", nodes=["s1.b0"])
    total, per = count_flops(dit, x, by_module=True)
    with torch.no_grad():
        gmacs = dit(x, return_info=True)[1].extra["gmacs"].item()
    assert block_flops(full[1], 1, 0) > 0
    assert block_flops(per, 1, 0) == 0 and full[0] > total
    assert gmacs == pytest.approx(total / 2e9, rel=1e-6)
    # a learned gate that closes every token: the block is skipped, only the gate itself is spent
    dit.force_gates(None)
    node = dit.node_names.index("s2.b1")
    with torch.no_grad():
        dit.gates[node].bias.fill_(-50.0)
    _, per = count_flops(dit, x, by_module=True)
    assert block_flops(per, 2, 1) == 0 and per[f"DiT.gates.{node}"] > 0 and block_flops(per, 2, 0) > 0
    # every token leaves scale 0 after its first block: the rest of the scale (gates included) is skipped
    with torch.no_grad():
        dit.gates[0].bias.copy_(torch.tensor([5.0, -50.0]))
    dit.force_gates("closed", nodes=["s1.b0"])
    with torch.no_grad():
        info = dit(x, return_info=True)[1]
    assert info.extra["exit_depth"][0].max() == 1


def test_info_maps_follow_the_active_tokens():
    _, dit = twins()
    randomise_gates(dit)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, info = dit(x, return_info=True)
    n0 = 16 * 16
    assert len(info.patch_to_token) == len(dit.nodes) == len(info.extra["active"])
    for (s, _), p2t, active, count in zip(dit.nodes, info.patch_to_token, info.extra["active"],
                                          info.token_counts):
        assert p2t.shape == (2, n0) and active.shape == (2, n0 // 4 ** s)
        assert count == int(active.sum(1).max())
        held = p2t[p2t >= 0]
        assert held.max() < n0 // 4 ** s if held.numel() else True
        # a patch is held iff its scale-s token was active
        assert torch.equal((p2t >= 0).sum(1), (active.long() * 4 ** s).sum(1))
    for s, depth in enumerate(info.extra["exit_depth"]):
        assert depth.min() >= 1 and depth.max() <= dit.depths[s]  # every token enters its scale's first node


def test_dwconv_at_active_positions_sees_zeros_elsewhere():
    conv = torch.nn.Conv2d(6, 6, 3, 1, 1, groups=6)
    size, B = (5, 7), 2
    active = torch.rand(B, 35) > 0.5
    h = torch.randn(B, 35, 6)
    dense = conv((h * active.unsqueeze(-1)).transpose(1, 2).reshape(B, 6, *size)).flatten(2).transpose(1, 2)
    k = int(active.sum(1).max())
    index = torch.argsort((~active).int(), dim=1, stable=True)[:, :k]
    valid = (torch.arange(k) < active.sum(1, keepdim=True)).unsqueeze(-1)
    hq = torch.gather(h, 1, index.unsqueeze(-1).expand(-1, -1, 6)) * valid  # padding slots carry zeros
    out = dwconv_at(hq, index, size, conv)
    expect = torch.gather(dense, 1, index.unsqueeze(-1).expand(-1, -1, 6))
    torch.testing.assert_close(out[valid.expand_as(out)], expect[valid.expand_as(out)], atol=1e-5, rtol=0)
