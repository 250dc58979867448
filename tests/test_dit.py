"""PVTv2 (the dense twin) and the DiT routing grid: PVTv2 as one route, gradients, skipped work, GMACs, info."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynavit
from dynavit.errors import ConfigError
from dynavit.flops import count_flops
from dynavit.losses_dit import BudgetCriterion, DiTBudgetLoss
from dynavit.models.dit import down_subset, down_tokens_subset, stage_activity
from dynavit.train.criterion import build_criterion


def twins(tmp_path=None, img_size: int = 64, **kwargs):
    """A dense pvt_v2_tiny and a dit_tiny loaded from its checkpoint (a file when tmp_path is given)."""
    torch.manual_seed(0)
    dense = dynavit.create_model("pvt_v2_tiny", img_size=img_size).eval()
    dit = dynavit.create_model("dit_tiny", img_size=img_size, budget=0.5, **kwargs).eval()
    if tmp_path is not None:
        dynavit.save_checkpoint(dense, tmp_path / "pvt.safetensors")
        report = dynavit.load_checkpoint(dit, tmp_path / "pvt.safetensors", strict=False)
    else:
        report = dynavit.load_state_dict(dit, dense.state_dict(), strict=False)
    assert report.unexpected == [] and all(k.startswith("gates.") for k in report.missing)
    return dense, dit


def randomise_gates(dit, seed: int = 1):
    """Gate weights that transform some tokens, send some down and stop others at every node."""
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


def test_grid_layout_budget_and_costs():
    model = dynavit.create_model("dit_b2", budget=0.5)
    assert model.family == "dit" and model.budget == 0.5 and model.columns == 3 + 4 + 6 + 3
    assert model.twin_gmacs() == pytest.approx(4.027, abs=0.001)  # PVTv2-B2, docs/methods.md 7: 4.03
    assert model.twin_gmacs() == pytest.approx(dynavit.count_gmacs(dynavit.create_model("pvt_v2_b2")), rel=1e-9)
    assert model.space_gmacs() > 2 * model.twin_gmacs()
    # window (1, 1): stage k holds scales k-1..k+1; the paper's visualisation (stage 3: strides 8, 16, 32)
    held = lambda j: [i for i in range(4) if model.has_block(i, j)]  # noqa: E731
    assert held(0) == [0, 1] and held(3) == [0, 1, 2] and held(7) == [1, 2, 3] and held(15) == [2, 3]
    assert not model.has_block(0, 7) and model.has_down(0, 7)  # 1/4 tokens may still move down after stage 2
    full = dynavit.create_model("dit_tiny", window=(3, 3))
    assert all(full.has_block(i, j) for i in range(4) for j in range(full.columns))
    b5 = dynavit.create_model("dit_b5")
    assert b5.budget_gmacs() == pytest.approx(10.3, abs=0.1)  # the abstract's DiT-B5: 10.3 GFLOPs
    with pytest.raises(ConfigError, match="budget"):
        dynavit.create_model("dit_tiny", budget=1.5)
    with pytest.raises(ConfigError, match="window"):
        dynavit.create_model("dit_tiny", window=(1, 5))
    with pytest.raises(ConfigError, match="unknown node"):
        model.force_gates("closed", nodes=["s9.c0"])
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


def test_pvt_v2_route_equals_twin_from_one_checkpoint(tmp_path):
    dense, dit = twins(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    # every off-route block starts as a copy of PVTv2's block of the same scale
    sd = dit.state_dict()
    assert torch.equal(sd["grid.s1c0.mlp.fc1.weight"], sd["stages.1.blocks.0.mlp.fc1.weight"])  # before stage 1
    assert torch.equal(sd["grid.s0c2.attn.q.weight"], sd["stages.0.blocks.1.attn.q.weight"])  # after stage 0
    with torch.no_grad():
        ref, maps_ref = dense(x), dense.forward_features(x)
        init_logits, init_info = dit(x, return_info=True)  # the initial gates are PVTv2's route
        dit.force_gates("pvt_v2")
        logits, info = dit(x, return_info=True)
        maps = dit.forward_features(x)
        randomise_gates(dit)
        forced_again = dit(x)  # forced gates ignore the learned ones
        dit.force_gates(None)
        routed = dit(x)
    assert (logits - ref).abs().max() <= 1e-4 and (init_logits - ref).abs().max() <= 1e-4
    assert torch.equal(forced_again, logits) and (routed - ref).abs().max() > 1e-3
    for a, b in zip(maps, maps_ref):
        assert (a - b).abs().max() <= 1e-4
    # plain torch loading fills the off-route blocks the same way
    other = dynavit.create_model("dit_tiny", img_size=64).eval()
    missing = other.load_state_dict(dense.state_dict(), strict=False).missing_keys
    assert all(k.startswith("gates.") for k in missing)
    assert torch.equal(other.state_dict()["grid.s1c0.mlp.fc1.weight"], sd["grid.s1c0.mlp.fc1.weight"])
    assert torch.allclose(info.extra["gmacs"], torch.full((2,), dit.twin_gmacs((64, 64))))
    assert info.extra["gmacs_twin"] == pytest.approx(dynavit.count_gmacs(dense, x[:1]), rel=1e-9)
    # each column uses one scale, PVTv2's, with every token
    st = info.extra["scale_tokens"]  # (B, columns, 4)
    for j in range(dit.columns):
        s = dit.stage_of[j]
        assert st[0, j, s] == 4 ** (4 - s) and st[0, j].sum() == st[0, j, s]
    # the learned initial gates add only their own cost (a Linear(C, 2) per token they read)
    assert (init_info.extra["gmacs"] > info.extra["gmacs"]).all()
    assert (init_info.extra["gmacs"] - info.extra["gmacs"]).max() < 0.01 * dit.twin_gmacs((64, 64))


def test_open_space_uses_several_scales_per_column():
    _, dit = twins()
    dit.force_gates("open")
    with torch.no_grad():
        _, info = dit(torch.randn(1, 3, 64, 64), return_info=True)
    st = info.extra["scale_tokens"][0]
    assert (st > 0).sum(1).tolist() == [2, 2, 3, 3, 3, 3, 2, 2]  # tiny: depths 2, 2, 2, 2, window (1, 1)
    assert info.extra["gmacs"].item() == pytest.approx(dit.space_gmacs((64, 64)), rel=1e-6)
    assert info.extra["gmacs"].item() == pytest.approx(count_flops(dit, torch.randn(1, 3, 64, 64)) / 2e9, rel=1e-6)


def test_gates_receive_gradients_from_task_and_budget():
    _, dit = twins()
    randomise_gates(dit)
    dit.train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    logits, info = dit(x, return_info=True)
    loss = F.cross_entropy(logits, y) + DiTBudgetLoss(weight=1.0, warmup=0.0)(info)
    loss.backward()
    assert info.extra["gmacs"].requires_grad
    for name, gate, (i, j) in zip(dit.node_names, dit.gates, dit.nodes):
        if not info.extra["alive"][dit.node_names.index(name)].any():
            continue  # a node no token reached this time
        grad = gate.weight.grad
        if dit.has_block(i, j):
            assert grad is not None and grad[0].abs().sum() > 0, name  # transform logit
        if dit.has_down(i, j):
            assert grad is not None and grad[1].abs().sum() > 0, name  # scale logit
    # the task alone reaches the gates too (through the straight-through masks)
    dit.zero_grad()
    F.cross_entropy(dit(x), y).backward()
    assert sum(float(g.weight.grad.abs().sum()) for g in dit.gates if g.weight.grad is not None) > 0


def test_inference_subset_equals_masked_training_forward():
    _, dit = twins()
    randomise_gates(dit)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        dit.eval()
        eval_logits, info = dit(x, return_info=True)
        dit.train()
        train_logits, train_info = dit(x, return_info=True)
    fractions = [a.float().mean().item() for a in info.extra["ran"]]
    assert any(0.05 < f < 0.95 for f in fractions)  # the gathered path really ran on a subset
    assert any(0.05 < s.float().mean().item() < 0.95 for s in info.extra["sent"])  # and sent a subset down
    torch.testing.assert_close(eval_logits, train_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(info.extra["gmacs"], train_info.extra["gmacs"])


def test_a_batch_computes_what_each_image_alone_does(monkeypatch):
    """Batch execution choices (whole-map gates and patch embeddings, blocks on the images that run there only)
    change nothing: each image's logits and GMACs are those of its own one-image forward."""
    from dynavit.models.dit import DiT

    _, dit = twins()
    x = torch.randn(6, 3, 64, 64)  # drawn after twins()' seed: late nodes run in 2-3 of the 6 images
    randomise_gates(dit, seed=3)
    batches = []
    run_block = DiT._run_block
    monkeypatch.setattr(DiT, "_run_block", lambda self, blk, x, *a: batches.append(x.shape[0]) or
                        run_block(self, blk, x, *a))
    with torch.no_grad():
        logits, info = dit(x, return_info=True)
        assert any(b < 6 for b in batches)  # some block ran on a subset of the images
        for b in range(6):
            one, one_info = dit(x[b:b + 1], return_info=True)
            torch.testing.assert_close(logits[b:b + 1], one, atol=1e-5, rtol=0)
            assert one_info.extra["gmacs"].item() == pytest.approx(info.extra["gmacs"][b].item(), rel=1e-6)


def test_dense_above_runs_crowded_nodes_on_the_whole_map():
    """The cost model changes what is executed, not the result nor the routing's per-image GMACs."""
    _, dit = twins()
    randomise_gates(dit)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref, info = dit(x, return_info=True)
        dit.dense_above = 0.0
        out, dense_info = dit(x, return_info=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense_info.extra["gmacs"], info.extra["gmacs"])
    assert dense_info.extra["executed_gmacs"] > info.extra["executed_gmacs"]
    with pytest.raises(ConfigError, match="dense_above"):
        dynavit.create_model("dit_tiny", dense_above=2)


def test_info_gmacs_match_flop_counter():
    """Per-image GMACs in info == FlopCounterMode on that image's gathered forward; executed_gmacs == the batch's."""
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
    assert (per_image < dit.space_gmacs((64, 64))).all()


def module_flops(per_module: dict, prefix: str) -> float:
    """FLOPs FlopCounterMode attributes to modules under `prefix` (names are 'DiT.<prefix>...')."""
    return sum(v for k, v in per_module.items() if k.startswith(f"DiT.{prefix}"))


def test_closed_node_costs_nothing():
    _, dit = twins()
    x = torch.randn(1, 3, 64, 64)
    dit.force_gates("open")
    full, per_full = count_flops(dit, x, by_module=True)
    node = "s0.c2"  # an off-route node (1/4 tokens in stage 2): block grid.s0c2 and P[0, 2]
    dit.force_gates("closed", nodes=[node])
    total, per = count_flops(dit, x, by_module=True)
    with torch.no_grad():
        gmacs = dit(x, return_info=True)[1].extra["gmacs"].item()
    assert module_flops(per_full, "grid.s0c2.") > 0 and module_flops(per, "grid.s0c2.") == 0
    assert full > total and gmacs == pytest.approx(total / 2e9, rel=1e-6)
    # a learned gate that stops every token: its block is skipped, only the gate itself is spent
    dit.force_gates(None)
    n = dit.node_names.index("s2.c5")
    with torch.no_grad():
        dit.gates[n].bias.fill_(-50.0)
        _, info = dit(x, return_info=True)
    _, per = count_flops(dit, x, by_module=True)
    assert module_flops(per, "stages.2.blocks.1.") == 0 and per[f"DiT.gates.{n}"] > 0
    assert module_flops(per, "stages.2.blocks.0.") > 0
    assert info.extra["scale_tokens"][0, 5, 2] == 0 and info.extra["scale_tokens"][0, 4, 2] == 16
    # early stop: every 1/16 token stopped at s2.c5, so the next 1/16 node computes nothing, not even its gate
    assert not info.extra["alive"][dit.node_names.index("s2.c6")].any()
    assert module_flops(per, f"gates.{dit.node_names.index('s2.c6')}") == 0


def test_scale_tokens_match_the_gates():
    """scale_tokens[b, j, i] == number of tokens whose transform logit is > 0 at node (i, j), read by a hook."""
    _, dit = twins()
    randomise_gates(dit, seed=5)
    seen = {}
    hooks = [g.register_forward_hook(lambda m, inp, out, n=n: seen.__setitem__(n, out.detach()))
             for n, g in enumerate(dit.gates)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, info = dit(x, return_info=True)
    for h in hooks:
        h.remove()
    st = info.extra["scale_tokens"][0]
    checked = 0
    for n, (i, j) in enumerate(dit.nodes):
        if j == dit.columns:
            continue
        expect = int((seen[n][0, :, 0] > 0).sum()) if n in seen and dit.has_block(i, j) else 0
        assert st[j, i] == expect, dit.node_names[n]
        checked += expect > 0
    assert checked >= 5 and st.sum() == sum(int(r.sum()) for r in info.extra["ran"])
    # the routing picture's data: stage k, scale i = union of the tokens that ran in stage k's columns
    act = stage_activity(info)
    assert act[1][0].sum() > 0 and act[0][3].sum() == 0  # 1/8 tokens in stage 1; no 1/4 tokens in stage 4


def test_budget_loss_value_warmup_and_direction():
    _, dit = twins()
    dit.force_gates("open")  # start from the full routing space (ratio ~ 2.6 > budget)
    dit.train()
    x = torch.randn(4, 3, 64, 64)
    _, info = dit(x, return_info=True)
    ratio = info.extra["gmacs"].mean().item() / info.extra["gmacs_twin"]
    crit = DiTBudgetLoss(weight=3.0, warmup=0.4)
    assert crit(info, progress=0.1).item() == 0.0
    assert crit(info, progress=0.5).item() == pytest.approx(3.0 * (ratio - 0.5) ** 2, rel=1e-5)
    dit.force_gates(None)
    with torch.no_grad():
        for gate in dit.gates:
            gate.bias.fill_(1.0)  # learned gates, all open
    _, info = dit(x, return_info=True)
    start = info.extra["gmacs"].mean().item() / info.extra["gmacs_twin"]
    opt = torch.optim.SGD(dit.gates.parameters(), lr=2.0)
    for _ in range(5):  # a few steps on the budget loss alone lower the cost
        opt.zero_grad()
        crit(dit(x, return_info=True)[1]).backward()
        opt.step()
    dit.eval()
    with torch.no_grad():
        after = dit(x, return_info=True)[1].extra["gmacs"].mean().item() / info.extra["gmacs_twin"]
    assert after < start - 0.3


def test_budget_criterion_applies_the_warmup():
    """The engine's progress reaches the budget loss: 0 before its warm-up, w (ratio - budget)^2 after."""
    _, dit = twins()
    dit.train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    logits, info = dit(x, return_info=True)
    ce = F.cross_entropy(logits, y).item()
    ratio = info.extra["gmacs"].mean().item() / info.extra["gmacs_twin"]
    crit = build_criterion(dit, "dit", weight=3.0, start=0.6)
    assert crit.budget_loss.warmup == 0.6  # the recipe's start is the loss's warm-up
    crit.set_progress(0.5)
    assert crit(x, (logits, info), y).item() == pytest.approx(ce, rel=1e-6) and "budget" not in crit.last_parts
    crit.set_progress(0.7)
    assert crit(x, (logits, info), y).item() == pytest.approx(ce + 3.0 * (ratio - 0.5) ** 2, rel=1e-5)
    # the loss's own warm-up holds inside a criterion (it was ignored: the progress was never passed on)
    crit = BudgetCriterion(DiTBudgetLoss(weight=3.0, warmup=0.5))
    crit.set_progress(0.45)
    assert crit(x, (logits, info), y).item() == pytest.approx(ce, rel=1e-6)


def test_down_subset_equals_the_conv_at_those_tokens():
    from dynavit.models.pvt_v2 import OverlapPatchEmbed

    down = OverlapPatchEmbed(3, 2, 6, 10)
    fine = torch.randn(2, 6, 7, 5)  # odd sizes: next scale 4 x 3
    full, size = down(fine)
    index = torch.tensor([[0, 5, 11], [3, 4, 7]])
    out = down_subset(down, fine, index)
    torch.testing.assert_close(out, torch.gather(full, 1, index.unsqueeze(-1).expand(-1, -1, 10)), atol=1e-5, rtol=0)
    assert size == (4, 3)


@pytest.mark.parametrize("k", [1, 3, 12])  # 9 k below and above the 35 fine tokens: norm after / before the gather
def test_down_tokens_subset_equals_the_masked_conv(k):
    """The patch embedding of norm(x) * sent, from the token list at next-scale tokens `index`, == the whole-map conv."""
    from dynavit.models.pvt_v2 import OverlapPatchEmbed, to_map

    torch.manual_seed(0)
    down, norm = OverlapPatchEmbed(3, 2, 6, 10), nn.LayerNorm(6)
    nn.init.normal_(norm.bias)  # a zero row normed is not zero: the mask must apply after the norm
    x, sent = torch.randn(2, 35, 6), torch.rand(2, 35) < 0.5  # a 7 x 5 map, next scale 4 x 3
    full, _ = down(to_map(norm(x) * sent.unsqueeze(-1), (7, 5)))
    index = torch.stack([torch.randperm(12)[:k] for _ in range(2)])
    out = down_tokens_subset(down, norm, x, (7, 5), index, sent)
    torch.testing.assert_close(out, torch.gather(full, 1, index.unsqueeze(-1).expand(-1, -1, 10)), atol=1e-5, rtol=0)


def test_routing_picture_rows_are_strides_columns_are_stages(tmp_path):
    from PIL import Image

    from dynavit.cli import main

    _, dit = twins()  # initial gates: PVTv2's route, so stage k holds only stride 4 * 2^k, every token of it
    image, tiles, counts, gmacs, _ = dit.routing_rows(torch.randn(1, 3, 64, 64))[0]
    assert counts == [[4 ** (4 - i) if i == k else 0 for k in range(4)] for i in range(4)]
    assert (tiles[0][1] == 1.0).all() and tiles[0][0].shape == image.shape  # white where no token ran
    assert gmacs == pytest.approx(dit.twin_gmacs((64, 64)), rel=0.01)
    png = tmp_path / "in.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(png)
    out = tmp_path / "routing.png"
    assert main(["viz", "--model", "dit_tiny", "--img-size", "64", "--image", str(png), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_backbone_lr_scale_flag_overrides_the_recipe(tmp_path):
    """`--backbone-lr-scale 0`: the gates (recipe `dit`'s head) move, the backbone does not."""
    from safetensors.torch import load_file

    from dynavit.cli import main

    out = tmp_path / "r"
    assert main(["train", "--model", "dit_tiny", "--img-size", "64", "--data", "demo", "--aug", "none", "--workers", "0",
                 "--demo-size", "4", "4", "--no-eval", "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0",
                 "--lr", "0.64", "--backbone-lr-scale", "0", "--output", str(out)]) == 0
    torch.manual_seed(0)  # the run's initial weights (`dynavit train` seeds 0 before building the model)
    init = dynavit.create_model("dit_tiny", img_size=64, num_classes=10).state_dict()
    trained = load_file(str(out / "model.safetensors"))
    assert torch.equal(trained["stages.0.blocks.0.attn.q.weight"], init["stages.0.blocks.0.attn.q.weight"])
    assert not torch.equal(trained["gates.0.bias"], init["gates.0.bias"])
