"""ToMe against the ToMe authors' outputs (shared/fixtures), its r schedules and its matching rule."""
from __future__ import annotations

import pytest
import torch

import dynavit
from dynavit.methods.tome import bipartite_plan, parse_r

from conftest import DEIT_CFG, fixture_path


def load(**kw):
    model = dynavit.create_model("vit", method="tome", **kw, **DEIT_CFG).eval()
    dynavit.load_checkpoint(model, fixture_path("deit.safetensors"))
    return model


def source_map(info, num_patches: int) -> torch.Tensor:
    """(B, 1+T, 1+N) 0/1 map: which input tokens (class token first) each final token holds."""
    p2t = info.patch_to_token[-1]
    B, T = p2t.shape[0], info.token_counts[-1]
    src = torch.zeros(B, 1 + T, 1 + num_patches)
    src[:, 0, 0] = 1
    src[torch.arange(B)[:, None], 1 + p2t, torch.arange(1, 1 + num_patches)[None]] = 1
    return src


@pytest.mark.parametrize("prop,key", [(True, "tome_logits"), (False, "tome_noprop_logits")])
def test_logits_match_authors(ref, ref_images, prop, key):
    model = load(r=8, prop_attn=prop)
    with torch.no_grad():
        logits, info = model(ref_images, return_info=True)
    torch.testing.assert_close(logits, ref[key], atol=2e-3, rtol=0)
    assert info.token_counts == [196 - 8 * (i + 1) for i in range(12)]


def test_source_map_matches_authors(ref, ref_images):
    model = load(r=8)
    with torch.no_grad():
        _, info = model(ref_images, return_info=True)
    assert torch.equal(source_map(info, 196), ref["tome_source"])
    sizes = info.sizes[-1]
    assert torch.equal(sizes, ref["tome_source"][:, 1:].sum(dim=-1))


def test_proportional_attention_matters(ref, ref_images):
    with torch.no_grad():
        a, b = load(r=8)(ref_images), load(r=8, prop_attn=False)(ref_images)
    assert (a - b).abs().max() > 2e-3


def test_matching_rule_on_hand_made_keys():
    """A = even positions of [cls, t0..t5] (t1, t3, t5), B = odd (t0, t2, t4); best A->B edges merge."""
    d = 3
    b_keys = torch.eye(d)  # t0, t2, t4
    a_keys = torch.tensor([[0.1, 1.0, 0.0], [1.0, 0.0, 0.01], [0.0, 0.2, 1.0]])  # t1~t2, t3~t0 (closest), t5~t4
    tokens = torch.zeros(1, 7, d)
    tokens[0, 0] = torch.tensor([5.0, 5.0, 5.0])  # class token would match everything if unprotected
    tokens[0, [1, 3, 5]] = b_keys
    tokens[0, [2, 4, 6]] = a_keys
    plan = bipartite_plan(tokens, 1, num_prefix=1)
    # unmerged A (t1, t5) keep slots 0, 1 in order; B tokens t0, t2, t4 take 2, 3, 4; t3 joins t0
    assert plan.group.tolist() == [[2, 0, 3, 2, 4, 1]] and plan.num_groups == 5
    plan2 = bipartite_plan(tokens, 2, num_prefix=1)
    assert plan2.group.tolist() == [[1, 2, 2, 1, 3, 0]] and plan2.num_groups == 4  # then t1 joins t2


def test_tied_scores_merge_the_earlier_a_tokens():
    """All A tokens equally similar to their best B (identical keys): the stable order merges A tokens 0..r-1,
    each into the first B token, whatever the sort's backend would do with ties."""
    tokens = torch.ones(2, 1 + 40, 8)  # class token + 40 patch tokens: A = 20 even, B = 20 odd positions
    plan = bipartite_plan(tokens, 5, num_prefix=1)
    n_unm = 20 - 5
    a_slots = plan.group[:, 1::2]  # A = even positions of the full sequence = odd patch indices after the class token
    assert (a_slots[:, :5] == n_unm).all()  # merged into B token 0's slot
    assert (a_slots[:, 5:] == torch.arange(n_unm)).all()  # the rest keep their order
    assert plan.num_groups == 35


def test_parse_r_forms():
    assert parse_r(8, 4) == [8] * 4
    assert parse_r([3, 2], 4) == [3, 2, 0, 0]
    assert parse_r((8, -1.0), 3) == [16, 8, 0]
    assert parse_r((8, 0.0), 3) == [8, 8, 8]


@pytest.mark.parametrize("bad", [-1, [1, 2, 3, 4, 5], (8, 2.0), "x"])
def test_bad_r_raises(bad):
    with pytest.raises(dynavit.ConfigError):
        parse_r(bad, 4)


def test_r_too_large_fails_loudly():
    with pytest.raises(dynavit.ConfigError, match="exceeds"):
        dynavit.create_model("tiny_vit", method="tome", r=20)  # 196 - 20 * 9 = 16 tokens left at block 9
    model = dynavit.create_model("tiny_vit", method="tome", r=(16, -1.0)).eval()
    with torch.no_grad():
        _, info = model(torch.randn(1, 3, 224, 224), return_info=True)
    assert info.token_counts[-1] == 196 - sum(parse_r((16, -1.0), 12))
    model.reducer.set_r(0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224), return_info=True)[1].token_counts == []


# ------------------------------------------------------------------ the lean ToMe path == the generic one
def old_bipartite_group(keys, r, P):
    """bipartite_plan's group map as it was written before (indexed copies, index_put), the reference."""
    from dynavit.ops import argsort_desc

    B, L, _ = keys.shape
    T = L - P
    metric = keys[:, P:].float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_idx, b_idx = torch.arange(P % 2, T, 2), torch.arange((P + 1) % 2, T, 2)
    node_max, node_idx = (metric[:, a_idx] @ metric[:, b_idx].transpose(1, 2)).max(dim=-1)
    order = argsort_desc(node_max)
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values
    n_unm = unm.shape[1]
    slot_a = torch.empty_like(order)
    slot_a.scatter_(1, unm, torch.arange(n_unm).expand(B, n_unm))
    slot_a.scatter_(1, src, n_unm + torch.gather(node_idx, 1, src))
    group = torch.empty(B, T, dtype=torch.long)
    group[:, a_idx] = slot_a
    group[:, b_idx] = n_unm + torch.arange(b_idx.numel())
    return group, n_unm + b_idx.numel()


@pytest.mark.parametrize("B,L,P", [(1, 197, 1), (3, 50, 1), (2, 51, 2), (4, 12, 1)])
def test_bipartite_plan_equals_indexed_reference(B, L, P):
    keys = torch.randn(B, L, 16, generator=torch.Generator().manual_seed(L))
    for r in (1, (L - P) // 4, (L - P) // 2):
        plan = bipartite_plan(keys, r, num_prefix=P)
        group, G = old_bipartite_group(keys, r, P)
        assert torch.equal(plan.group, group) and plan.num_groups == G


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("B,P,with_sizes", [(1, 1, False), (3, 1, True), (2, 2, True)])
def test_merge_by_size_equals_merge_tokens(dtype, grad, B, P, with_sizes):
    """ToMe's merge_by_size is bit for bit merge_tokens(..., patch_sizes, normalize=True), values and gradients."""
    from dynavit.methods.tome import merge_by_size
    from dynavit.tokens import TokenState, merge_tokens

    g = torch.Generator().manual_seed(B + P)
    T, C = 40, 12
    keys = torch.randn(B, P + T, 8, generator=g)
    plan = bipartite_plan(keys, 9, num_prefix=P)

    def state():
        x = torch.randn(B, P + T, C, generator=torch.Generator().manual_seed(7)).to(dtype).requires_grad_(grad)
        st = TokenState.from_tokens(x, P)
        if with_sizes:
            st.sizes = torch.randint(1, 5, (B, P + T, 1), generator=torch.Generator().manual_seed(8)).float()
            st.patch_to_token = torch.randint(0, T, (B, 3 * T), generator=torch.Generator().manual_seed(9))
        return st, x

    with torch.set_grad_enabled(grad):
        (s1, x1), (s2, x2) = state(), state()
        ref = merge_tokens(s1, plan.group, s1.patch_sizes(), plan.num_groups, normalize=True)
        got = merge_by_size(s2, plan.group, plan.num_groups)
    assert torch.equal(got.x, ref.x) and got.x.dtype == dtype
    assert torch.equal(got.sizes, ref.sizes) and torch.equal(got.patch_to_token, ref.patch_to_token)
    if grad:
        w = torch.randn(ref.x.shape, generator=g).to(dtype)
        (ref.x * w).sum().backward()
        (got.x * w).sum().backward()
        assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("H", [1, 2, 3, 4, 6, 8, 12])
def test_head_mean_equals_mean_over_heads(H):
    """The keys ToMe / BAT match on: head_mean is k.mean(dim=1) bit for bit, on the strided view attention has."""
    from dynavit.layers import head_mean

    g = torch.Generator().manual_seed(H)
    for B, T, d in ((3, 197, 64), (2, 50, 16), (1, 7, 32)):
        qkv = torch.randn(B, T, 3 * H * d, generator=g) * 10
        k = qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)[1]  # (B, H, T, d) as in Attention.forward
        before = qkv.clone()
        assert torch.equal(head_mean(k), k.mean(dim=1))
        assert torch.equal(qkv, before)  # no write into the attention's qkv


@pytest.mark.parametrize("ties", [False, True])
def test_bipartite_plan_fast_path_names_its_slots(ties, monkeypatch):
    """The eager top-k plan equals the sorted one (the indexed reference) and its primary / src / dst agree
    with its group map; with tied scores too (those images are sorted)."""
    from dynavit.methods import tome

    monkeypatch.setattr(tome, "LEAN_MIN_BATCH", 1)  # 3 images: the lean path runs from 4 by default
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(3, 61, 8, generator=g)
    if ties:
        keys = keys.round().clamp(-1, 1)  # few distinct directions: tied best scores
    for r in (1, 7, 29, 30):
        plan = bipartite_plan(keys, r, num_prefix=1)
        group, G = old_bipartite_group(keys, r, 1)
        assert torch.equal(plan.group, group) and plan.num_groups == G
        if plan.primary is None:
            assert r == 30  # every A token merges: nothing to gain
            continue
        if ties and r == 7:  # the r-th best score ties the next in some image: the per-image sort ran
            m = torch.nn.functional.normalize(keys[:, 1:], dim=-1)
            best = (m[:, 1::2] @ m[:, 0::2].transpose(1, 2)).amax(-1).topk(r + 1, dim=1).values
            assert bool((best[:, r - 1] == best[:, r]).any())
        assert torch.equal(torch.gather(plan.group, 1, plan.src), plan.dst)
        assert torch.equal(torch.gather(plan.group, 1, plan.primary), torch.arange(G).expand(3, G))
    if not ties:
        assert bipartite_plan(keys, 7, num_prefix=1).primary is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,P", [(1, 1), (3, 1), (2, 2), (4, 0)])
def test_merge_into_partners_equals_merge_by_size(dtype, B, P, monkeypatch):
    """The inference merge: merge_by_size's values up to rounding, the same sizes and patch map, and tokens that
    receive no partner pass bit for bit."""
    from dynavit.methods import tome
    from dynavit.methods.tome import merge_by_size, merge_into_partners
    from dynavit.tokens import TokenState

    monkeypatch.setattr(tome, "LEAN_MIN_BATCH", 1)

    g = torch.Generator().manual_seed(10 * B + P)
    T, C = 41, 12
    keys = torch.randn(B, P + T, 8, generator=g)
    x = torch.randn(B, P + T, C, generator=g).to(dtype)
    for r in (1, 6, 19):
        plan = bipartite_plan(keys, r, num_prefix=P)

        def state():
            st = TokenState.from_tokens(x.clone(), P)
            st.sizes = torch.randint(1, 5, (B, P + T, 1), generator=torch.Generator().manual_seed(8)).float()
            st.patch_to_token = torch.randint(0, T, (B, 3 * T), generator=torch.Generator().manual_seed(9))
            return st

        ref = merge_by_size(state(), plan.group, plan.num_groups)
        got = merge_into_partners(state(), plan)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got.x, ref.x, **tol)
        assert torch.equal(got.sizes, ref.sizes) and torch.equal(got.patch_to_token, ref.patch_to_token)
        receives = torch.zeros(B, plan.num_groups, dtype=torch.bool).scatter_(1, plan.dst, True)
        own = torch.gather(x[:, P:], 1, plan.primary.unsqueeze(-1).expand(-1, -1, C))
        assert torch.equal(got.x[:, P:][~receives], own[~receives]) and torch.equal(got.x[:, :P], x[:, :P])


def test_tome_inference_merge_matches_the_training_merge(monkeypatch):
    """A ToMe model in inference (merge_into_partners) gives the logits of the generic merge."""
    from dynavit.methods import tome

    torch.manual_seed(0)
    model = dynavit.create_model("vit", method="tome", r=6, img_size=64, patch_size=8, embed_dim=48, depth=6,
                                 num_heads=3, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    calls = []
    real = tome.merge_into_partners
    monkeypatch.setattr(tome, "merge_into_partners", lambda s, p: (calls.append(1), real(s, p))[1])
    with torch.no_grad():
        out = model(x)
    assert len(calls) == 6
    monkeypatch.setattr(tome, "merge_into_partners", lambda s, p: tome.merge_by_size(s, p.group, p.num_groups))
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_small_batches_take_the_sorted_plan(monkeypatch):
    """Below LEAN_MIN_BATCH images the plan is the sorted one (no slot names, so the generic merge runs), with the
    same group map as the lean plan."""
    from dynavit.methods import tome

    keys = torch.randn(3, 61, 8, generator=torch.Generator().manual_seed(6))
    small = bipartite_plan(keys, 7, num_prefix=1)
    assert small.primary is None
    monkeypatch.setattr(tome, "LEAN_MIN_BATCH", 1)
    lean = bipartite_plan(keys, 7, num_prefix=1)
    assert lean.primary is not None and torch.equal(lean.group, small.group)
    monkeypatch.undo()
    assert bipartite_plan(torch.cat([keys, keys[:1]]), 7, num_prefix=1).primary is not None  # 4 images
