"""BAT against a direct, loop-based computation of the paper's formulas on tiny hand-made token sets, its budget
against EViT's, its ablation variants, and BAT's token-diversity score (Eq. 4)."""
from __future__ import annotations

import math

import pytest
import torch

import dynavit
from dynavit.methods import _cluster
from dynavit.methods.bat import BATConfig, BATReducer, stage_counts
from dynavit.tokens import TokenState


# ------------------------------------------------------------------ loop-based references (the formulas)
def ref_dist(z):
    M, C = z.shape
    return [[math.dist(z[i].tolist(), z[j].tolist()) / math.sqrt(C) for j in range(M)] for i in range(M)]


def ref_density(d, density, k=5, sigma=None):
    M = len(d)
    if density == "knn":
        return [math.exp(-sum(v ** 2 for v in sorted(d[i][j] for j in range(M) if j != i)[:k]) / k)
                for i in range(M)]
    return [math.exp(-sum(d[i][j] ** 2 for j in range(M)) / (2 * sigma ** 2)) for i in range(M)]


def ref_dpc(z, n, density="knn", assign="nearest", k=5, sigma=None):
    """Eqs. 6-7 and the two assignment rules, one token at a time."""
    d = ref_dist(z)
    M = len(d)
    rho = ref_density(d, density, k, sigma)
    delta, parent = [], []
    for i in range(M):
        denser = [j for j in range(M) if rho[j] > rho[i]]
        if denser:
            j = min(denser, key=lambda j: d[i][j])
            delta.append(d[i][j]), parent.append(j)
        else:
            delta.append(max(d[i])), parent.append(i)
    score = [rho[i] * delta[i] for i in range(M)]
    centres = sorted(range(M), key=lambda i: -score[i])[:n]
    label = [None] * M
    for c, i in enumerate(centres):
        label[i] = c
    if assign == "nearest":
        for i in range(M):
            if label[i] is None:
                label[i] = min(range(n), key=lambda c: d[i][centres[c]])
    else:
        for i in sorted(range(M), key=lambda i: -rho[i]):
            if label[i] is None:
                label[i] = label[parent[i]]
    return label, centres


def ref_pairs(z, p):
    K = len(z)
    zn = [v / v.norm() for v in z]
    sim = {(i, j): float(zn[i] @ zn[j]) for i in range(K) for j in range(i + 1, K)}
    pairs, used = [], set()
    for (i, j), _ in sorted(sim.items(), key=lambda kv: -kv[1]):
        if len(pairs) == p:
            break
        if i not in used and j not in used:
            pairs.append((i, j))
            used |= {i, j}
    return pairs


def hand_made_set(B=2, M=9, C=3, seed=0):
    """Three well separated blobs of different spread, so densities and distances have no ties."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -2.0]])
    spread = torch.tensor([0.3, 0.8, 1.5]).repeat_interleave(M // 3).unsqueeze(-1)
    z = centres.repeat_interleave(M // 3, dim=0) + spread * torch.randn(B, M, C, generator=g)
    return z[:, torch.randperm(M, generator=g)]


# ------------------------------------------------------------------ clustering and matching
@pytest.mark.parametrize("density,assign,sigma", [("knn", "nearest", None), ("knn", "chain", None),
                                                  ("gaussian", "nearest", 2.0), ("gaussian", "chain", 3.0)])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_dpc_equals_loop_formulas(density, assign, sigma, n):
    z = hand_made_set()
    label, centres = _cluster.dpc_cluster(z, n, density=density, k=3, sigma=sigma, assign=assign)
    for b in range(z.shape[0]):
        ref_label, ref_centres = ref_dpc(z[b], n, density, assign, k=3, sigma=sigma)
        if assign == "chain" and ref_centres[0] != max(range(9), key=lambda i: ref_density(
                ref_dist(z[b]), density, 3, sigma)[i]):
            pytest.skip("densest token is not a top centre (the forced-centre rule would differ)")
        assert centres[b].tolist() == ref_centres
        assert label[b].tolist() == ref_label


def test_density_values_equal_formulas():
    z = hand_made_set()[0]
    d = _cluster.pairwise_distance(z[None])
    torch.testing.assert_close(d[0], torch.tensor(ref_dist(z)), atol=1e-5, rtol=0)
    for density, sigma in (("knn", None), ("gaussian", 2.5)):
        got = _cluster.log_density(d, density, k=3, sigma=sigma)[0].exp()
        torch.testing.assert_close(got, torch.tensor(ref_density(ref_dist(z), density, 3, sigma)), atol=1e-5,
                                   rtol=1e-4)


def test_dpc_delta_without_parent_equals_the_indexed_min():
    """dpc_delta(need_parent=False) (a min without indices) gives the delta of the indexed min bit for bit, on
    random, rounded (tied) and NaN tokens."""
    g = torch.Generator().manual_seed(3)
    sets = [torch.randn(4, 40, 16, generator=g), torch.randn(4, 30, 3, generator=g).round(), hand_made_set(B=3)]
    nan_set = torch.randn(2, 12, 4, generator=g)
    nan_set[1, 5] = float("nan")
    for z in sets + [nan_set]:
        d = _cluster.pairwise_distance(z)
        for density in ("knn", "gaussian"):
            log_rho = _cluster.log_density(d, density)
            delta, parent = _cluster.dpc_delta(d, log_rho)
            fast, none = _cluster.dpc_delta(d, log_rho, need_parent=False)
            assert none is None
            assert torch.equal(fast.isnan(), delta.isnan()), density
            assert torch.equal(fast.nan_to_num(-1.0), delta.nan_to_num(-1.0)), density


def test_chain_forces_the_densest_token_to_be_a_centre():
    z = hand_made_set(B=4, M=12, seed=5)
    label, centres = _cluster.dpc_cluster(z, 2, assign="chain")
    rho = _cluster.log_density(_cluster.pairwise_distance(z))
    assert bool((centres == rho.argmax(dim=1, keepdim=True)).any(dim=1).all())
    assert bool((label >= 0).all() & (label < 2).all())


@pytest.mark.parametrize("K,p", [(6, 2), (9, 4), (30, 7), (2, 1)])
def test_greedy_pairs_equal_loop(K, p):
    z = torch.randn(3, K, 5, generator=torch.Generator().manual_seed(K))
    pairs = _cluster.greedy_pairs(z, p)
    for b in range(3):
        assert [tuple(q) for q in pairs[b].tolist()] == ref_pairs(z[b], p)


def test_kmeans_and_pool_groups():
    z = hand_made_set(B=2, M=12)
    label, seeds = _cluster.kmeans_cluster(z, 3, iters=10)
    assert seeds[0].tolist() == [0, 4, 8]
    for b in range(2):
        assert sorted(set(label[b].tolist())) == [0, 1, 2]
        means = torch.stack([z[b][label[b] == c].mean(0) for c in range(3)])
        nearest = torch.cdist(z[b], means).argmin(dim=1)
        free = torch.ones(12, dtype=torch.bool)
        free[seeds[b]] = False
        assert torch.equal(nearest[free], label[b][free])  # a fixed point of Lloyd's iteration
    assert _cluster.pool_groups(1, 7, 3)[0].tolist() == [0, 0, 0, 1, 1, 2, 2]


# ------------------------------------------------------------------ one BAT stage, end to end
@pytest.mark.parametrize("assign", ["nearest", "chain"])
def test_bat_stage_equals_loop(assign):
    torch.manual_seed(0)
    B, T, C = 2, 20, 3
    feats = torch.cat([hand_made_set(B, 9, C, seed=1) * 0.3 + 10, torch.randn(B, 11, C)], dim=1)  # (B, T, C)
    x = torch.cat([torch.randn(B, 1, C), feats], dim=1)
    attn = torch.rand(B, 1 + T) + torch.cat([torch.zeros(B, 1), torch.zeros(B, 9), torch.ones(B, 11)], 1)
    cfg = BATConfig(pair_ratio=0.25, knn_k=3, assign=assign, budget="evit")
    reducer = BATReducer(12, keep_rate=0.55, config=cfg)
    K, p, n = stage_counts(T, 0.55, cfg)
    assert (K, p, n) == (11, 2, 3)
    state = reducer.reduce(TokenState.from_tokens(x.clone(), 1, track=True), attn, None, 0.55)
    assert state.x.shape == (B, 1 + K - p + n, C)
    for b in range(B):
        s = attn[b, 1:]
        order = sorted(range(T), key=lambda j: -s[j].item())
        att, inatt = order[:K], order[K:]
        pairs = ref_pairs(feats[b, att], p)
        second = {j: i for i, j in pairs}
        expected = []
        for r in range(K):
            if r in second:
                continue
            mates = [r] + [j for i, j in pairs if i == r]
            w = torch.stack([s[att[m]] for m in mates])
            expected.append(sum(w[q] * x[b, 1 + att[m]] for q, m in enumerate(mates)) / w.sum())
        label, _ = ref_dpc(feats[b, inatt], n, "knn", assign, k=3)
        for c in range(n):
            members = [inatt[m] for m in range(len(inatt)) if label[m] == c]
            w = s[members]
            expected.append((w[:, None] * x[b, 1 + torch.tensor(members)]).sum(0) / w.sum())
        torch.testing.assert_close(state.x[b, 1:], torch.stack(expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.x[b, 0], x[b, 0])
    assert bool((state.patch_to_token >= 0).all())
    plan = state.info.extra["bat"][0]
    assert plan.pairs.shape == (B, p, 2) and plan.centres.shape == (B, n)


# ------------------------------------------------------------------ budget and variants
@pytest.mark.parametrize("rate", [0.9, 0.7, 0.5, 0.3])
def test_token_counts_equal_evit(rate):
    x = torch.randn(2, 3, 224, 224)
    counts = {}
    for method, kw in (("evit", {}), ("bat", {"budget": "evit"})):
        model = dynavit.create_model("tiny_vit", method=method, keep_rate=rate, **kw).eval()
        with torch.no_grad():
            counts[method] = model(x, return_info=True)[1].token_counts
    assert counts["bat"] == counts["evit"]


@pytest.mark.slow
def test_gmacs_equal_evit_on_deit_small():
    models = {"evit": dynavit.create_model("deit_small_patch16_224", method="evit"),
              "bat": dynavit.create_model("deit_small_patch16_224", method="bat", budget="evit")}
    for rate in (0.9, 0.7, 0.5, 0.3):
        g = {}
        for name, model in models.items():
            model.reducer.set_keep_rate(rate)
            g[name] = dynavit.count_gmacs(model)
        assert abs(g["bat"] - g["evit"]) <= 0.05, (rate, g)
        if rate == 0.7:
            assert abs(g["bat"] - 3.0) < 0.06


@pytest.mark.parametrize("variant,extra", [("full", 1), ("cluster", None), ("pack", 1), ("attentive", 0)])
def test_variant_counts(variant, extra):
    cfg = BATConfig(variant=variant, budget="evit")
    K, p, n = stage_counts(196, 0.7, cfg)
    assert K == 138
    full_K, full_p, full_n = stage_counts(196, 0.7, BATConfig(budget="evit"))
    if variant == "cluster":
        assert (p, n) == (0, full_n)  # same clusters, no matching: more tokens (paper Table 3, row iii)
    else:
        assert K - p + n == K + extra


def test_explicit_cluster_split():
    assert stage_counts(196, 0.7, BATConfig(num_clusters=20)) == (138, 13, 20)
    assert stage_counts(196, 0.7, BATConfig(num_clusters=0.5)) == (138, 13, 29)
    assert stage_counts(196, 0.7, BATConfig(pair_ratio=0.0, budget="evit")) == (138, 0, 1)
    assert stage_counts(196, 0.99, BATConfig(budget="evit")) == (195, 0, 1)
    assert stage_counts(196, 1.0, BATConfig())[0] == 196


@pytest.mark.parametrize("bad", [dict(variant="x"), dict(merger="mean"), dict(density="cosine"),
                                 dict(assign="far"), dict(pair_ratio=0.7), dict(num_clusters=0),
                                 dict(num_clusters=1.5), dict(sigma=0.0), dict(knn_k=0)])
def test_bad_config_raises(bad):
    with pytest.raises(dynavit.ConfigError):
        dynavit.create_model("tiny_vit", method="bat", **bad)


# ------------------------------------------------------------------ diversity score (Eq. 4)
def ref_diversity(z):
    """min over z' of sum_i ||z_i - z'||_1, coordinate by coordinate over candidate values (data points)."""
    N, C = z.shape
    return sum(min(sum(abs(z[i, c] - z[m, c]) for i in range(N)) for m in range(N)) for c in range(C))


def test_diversity_score_equals_formula_and_is_batched():
    z = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1))
    got = dynavit.diversity_score(z, center="median")
    assert got.shape == (3,)
    for b in range(3):
        assert abs(got[b].item() - ref_diversity(z[b]).item()) < 1e-4
    assert abs(dynavit.diversity_score(z[0], center="median").item() - got[0].item()) < 1e-6
    assert dynavit.diversity_score(torch.ones(2, 5, 3) * 7, center="median").abs().max().item() == 0.0
    assert dynavit.diversity_score(2 * z, center="median")[0] > got[0]


def test_greedy_pairs_terminates_on_nan():
    pairs = _cluster.greedy_pairs(torch.full((2, 6, 3), float("nan")), 2)
    assert pairs.shape == (2, 2, 2)


# ------------------------------------------------------------------ static matching == the former early-exit loop
def old_greedy_pairs(z, p):
    """greedy_pairs as it was before its rounds became static (stopped with a Python `break` on a data-dependent
    test). Kept verbatim as the reference; also returns how many rounds accepted pairs."""
    B, K, _ = z.shape
    dev = z.device
    if p == 0:
        return torch.empty(B, 0, 2, dtype=torch.long, device=dev), 0
    zn = torch.nn.functional.normalize(z.float(), dim=-1)
    sim = zn @ zn.transpose(1, 2)
    sim = torch.nan_to_num((sim + sim.transpose(1, 2)) / 2, nan=float("-inf"))
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    pos = torch.arange(K, device=dev)
    partner = torch.full((B, K), -1, dtype=torch.long, device=dev)
    edge = torch.full((B, K), float("-inf"), device=dev)
    rounds = 0
    for _ in range(K // 2 + 1):
        best, nearest = sim.max(dim=-1)
        if bool((edge.topk(p, dim=1).values[:, -1] >= best.max(dim=-1).values).all()):
            break
        rounds += 1
        mutual = (torch.gather(nearest, 1, nearest) == pos) & (best > float("-inf"))
        partner = torch.where(mutual, nearest, partner)
        edge = torch.where(mutual & (pos < nearest), best, edge)
        gone = partner >= 0
        sim.masked_fill_(gone.unsqueeze(1) | gone.unsqueeze(2), float("-inf"))
    # (the one change since: equal similarities in the order of their first positions, a stable sort, where
    # topk left the order of ties unspecified; it is now the library's rule)
    first = edge.argsort(dim=1, descending=True, stable=True)[:, :p]
    return torch.stack([first, torch.gather(partner, 1, first).clamp_min(0)], dim=-1), rounds


def tie_sets():
    """Inputs with exact similarity ties, degenerate tokens and batch coupling."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=g)
    angle = torch.cumsum(torch.linspace(0.05, 0.6, 12), 0)  # points on a circle, gaps growing along it
    mixed = torch.randn(3, 10, 5, generator=g)
    mixed[1, 4] = float("nan")  # one bad token in one image
    return {
        "all_equal": torch.ones(3, 10, 4),
        "all_equal_b1": torch.full((1, 9, 3), 2.5),
        "duplicates": base[torch.randint(0, 4, (2, 14), generator=g)],  # (2, 14, 6): 4 distinct tokens repeated
        "grid": torch.randint(-1, 2, (4, 16, 2), generator=g).float(),  # few directions, zero vectors
        "zeros": torch.zeros(2, 8, 3),
        "nan_image": torch.cat([torch.full((1, 8, 3), float("nan")), torch.randn(1, 8, 3, generator=g)]),
        "nan_token": mixed,
        "chain": torch.stack([angle.cos(), angle.sin()], -1)[None],  # one mutual pair per round: p rounds needed
        "scaled_copies": torch.randn(2, 1, 4, generator=g) * torch.arange(1, 13.0).view(1, 12, 1),  # all sims 1
    }


@pytest.mark.parametrize("B", [1, 2, 5])
@pytest.mark.parametrize("K", [2, 3, 8, 17, 40])
def test_greedy_pairs_equal_old_loop_random(B, K):
    g = torch.Generator().manual_seed(100 * B + K)
    for p in sorted({1, max(1, K // 4), K // 2}):
        for trial in range(3):
            z = torch.randn(B, K, 1 + trial * 7, generator=g)
            ref, rounds = old_greedy_pairs(z, p)
            assert rounds <= p  # why exactly p static rounds suffice
            assert torch.equal(_cluster.greedy_pairs(z, p), ref), (B, K, p, trial)


@pytest.mark.parametrize("name", list(tie_sets()))
def test_greedy_pairs_equal_old_loop_ties(name):
    z = tie_sets()[name]
    K = z.shape[1]
    for p in range(1, K // 2 + 1):
        ref, rounds = old_greedy_pairs(z, p)
        assert rounds <= p
        assert torch.equal(_cluster.greedy_pairs(z, p), ref), (name, p)
        if name == "chain":
            assert rounds == p  # the bound is tight: fewer static rounds would be wrong here
        for b in range(z.shape[0]):  # batch of one image (the old loop couples images only through ties)
            if name not in ("nan_token", "nan_image"):
                assert torch.equal(_cluster.greedy_pairs(z[b:b + 1], p), old_greedy_pairs(z[b:b + 1], p)[0])


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kw", [dict(), dict(pair_ratio=0.5, assign="chain"), dict(keep_rate=0.5, pair_ratio=0.3)])
def test_bat_model_equals_old_matching(B, kw, monkeypatch):
    """A whole BAT model (64 tokens, up to 9 pairs per stage): same plans, same logits as with the old loop."""
    kw = {"keep_rate": 0.7, **kw}
    torch.manual_seed(0)
    model = dynavit.create_model("vit", method="bat", img_size=64, patch_size=8, embed_dim=48, depth=12,
                                 num_heads=3, num_classes=10, **kw).eval()
    g = torch.Generator().manual_seed(B)
    inputs = [torch.randn(B, 3, 64, 64, generator=g), torch.full((B, 3, 64, 64), 0.3)]  # random, constant image
    for x in inputs:
        with torch.no_grad():
            out, info = model(x, return_info=True)
            monkeypatch.setattr(_cluster, "greedy_pairs", lambda z, p: old_greedy_pairs(z, p)[0])
            ref, ref_info = model(x, return_info=True)
            monkeypatch.undo()
        assert max(plan.pairs.shape[1] for plan in info.extra["bat"]) >= 2
        for plan, ref_plan in zip(info.extra["bat"], ref_info.extra["bat"]):
            assert torch.equal(plan.pairs, ref_plan.pairs) and torch.equal(plan.group, ref_plan.group)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["random", *tie_sets()])
def test_greedy_pairs_early_exit_equals_static_rounds(name):
    """The eager-CPU early exit (default on CPU) returns exactly what the p static rounds return."""
    z = tie_sets()[name] if name != "random" else torch.randn(4, 40, 8, generator=torch.Generator().manual_seed(1))
    assert _cluster.may_sync(z)  # re-exported from dynavit.ops
    for p in range(1, z.shape[1] // 2 + 1):
        static = _cluster.greedy_pairs(z, p, early_exit=False)
        assert torch.equal(_cluster.greedy_pairs(z, p, early_exit=True), static), (name, p)
        assert torch.equal(_cluster.greedy_pairs(z, p), static), (name, p)


def test_greedy_pairs_early_exit_stops_early(monkeypatch):
    """The early exit really cuts rounds: random tokens need far fewer than p rounds (counted via amax calls)."""
    z = torch.randn(1, 60, 16, generator=torch.Generator().manual_seed(2))
    calls = {"n": 0}
    real = torch.Tensor.amax

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "amax", counting)
    _cluster.greedy_pairs(z, 20, early_exit=False)
    static_calls, calls["n"] = calls["n"], 0
    _cluster.greedy_pairs(z, 20)
    assert calls["n"] < static_calls / 2


@pytest.mark.parametrize("name", ["random", "random_rounded", *tie_sets()])
def test_greedy_pairs_subgraph_equals_whole_matrix(name, monkeypatch):
    """Large-batch matching among the most similar tokens (`_subgraph_pairs`) returns exactly the pairs of the
    rounds on the whole matrix, and really matches on the subgraph when it can prove the result."""
    g = torch.Generator().manual_seed(4)
    z = {"random": torch.randn(6, 50, 8, generator=g),
         "random_rounded": torch.randn(6, 50, 3, generator=g).round()}.get(name)
    z = tie_sets()[name] if z is None else z
    monkeypatch.setattr(_cluster, "SUBGRAPH_MIN_ENTRIES", 0)
    shapes = []
    real = _cluster._matching_rounds
    monkeypatch.setattr(_cluster, "_matching_rounds", lambda sim, p, early_exit: (shapes.append(sim.shape[1]),
                                                                                  real(sim, p, early_exit))[1])
    K = z.shape[1]
    for p in range(1, K // 2 + 1):
        shapes.clear()
        got = _cluster.greedy_pairs(z, p)
        if name == "random" and p <= 8:
            assert shapes == [25]  # half the tokens, no fallback to the whole matrix
        assert torch.equal(got, _cluster.greedy_pairs(z, p, early_exit=False)), (name, p)
    assert _cluster.greedy_pairs(z, 1).shape == (z.shape[0], 1, 2)


def test_greedy_pairs_subgraph_on_model_features(monkeypatch):
    """The same on the tokens a BAT model matches (features far more alike than random ones)."""
    torch.manual_seed(0)
    model = dynavit.create_model("vit", method="bat", img_size=64, patch_size=8, embed_dim=48, depth=12,
                                 num_heads=3, num_classes=10, keep_rate=0.7).eval()
    seen = []
    real = _cluster.greedy_pairs
    monkeypatch.setattr(_cluster, "greedy_pairs", lambda z, p, early_exit=None: (seen.append((z, p)),
                                                                                 real(z, p, early_exit))[1])
    with torch.no_grad():
        model(torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    monkeypatch.undo()
    monkeypatch.setattr(_cluster, "SUBGRAPH_MIN_ENTRIES", 0)
    assert len(seen) == 3
    for z, p in seen:
        assert torch.equal(_cluster.greedy_pairs(z, p), _cluster.greedy_pairs(z, p, early_exit=False))
