"""BAT, "Beyond Attentive Tokens" (Long et al., CVPR 2023): token splitting and merging (docs/bat.md).

Inside blocks [3, 6, 9] (12-block models) or [4, 8, 12] (depth 16: LV-ViT-S's published GMACs):
1. split (Eq. 5): the K = ceil(rho * T) tokens with the highest head-averaged class attention are attentive;
2. inattentive tokens are clustered by density peaks without iterations (Eqs. 6-7, `_cluster.dpc_cluster`);
3. the p most cosine-similar disjoint pairs of attentive tokens are matched;
4. every cluster / pair becomes one token, the class-attention-weighted mean of its members (Eq. 8, weights
   normalised within the group; `normalize_merge=False`: the literal un-normalised sum); unmatched attentive
   tokens pass unchanged.
Output `[prefix, attentive after matching (descending class attention; a pair sits at its better member's
place), cluster tokens (descending centre score)]`. The whole plan is batched (same counts for every image).

Budget (default `budget="logs"`): K - p + n = round(f(rho) K) tokens per stage, with f interpolated between the
values that reproduce the GMACs of the authors' six DeiT-S logs (no simple pair / cluster rule does, see
docs/bat.md); p = floor(pair_ratio * K) pairs and n clusters make up the rest. `budget="evit"`: n = p + 1, i.e.
K + 1 tokens, EViT's count. Every choice the paper leaves open is a parameter; `docs/bat.md` lists them.
Ablations (paper Tables 3-4): variant="attentive" (i, keep attentive only), "pack" (ii, all inattentive into one
token), "cluster" (iii, no matching), "full" (iv); merger="dpc" / "kmeans" / "pool" (spatial pooling over the
patch grid) / "subsample" (learned strided reduction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import argsort_desc
from ..recipes import Recipe
from ..registry import register_method
from ..tokens import TokenState, gather_tokens, merge_tokens
from . import _cluster
from ._common import StageReducer, keep_count, patch_scores, record_extra

VARIANTS = ("full", "cluster", "pack", "attentive")
MERGERS = ("dpc", "kmeans", "pool", "subsample")
WEIGHTS = ("attn", "mean")
FEATURES = ("tokens", "keys")
BUDGETS = ("logs", "evit")

# Tokens per stage as a multiple f of the K attentive tokens (K - p + n = round(f K)) at the keep rates of the
# authors' DeiT-S logs, fitted so that `count_gmacs` of DeiT-S gives the logged GMACs (0.7 -> 3.005, 0.6 -> 2.583,
# 0.5 -> 2.344, 0.4 -> 2.083, 0.3 -> 1.823, 0.2 -> 1.645); linear in between, constant outside [0.2, 0.7].
LOGGED_BUDGET = ((0.2, 1.059), (0.3, 1.035), (0.4, 1.051), (0.5, 1.033), (0.6, 0.983), (0.7, 1.0))


def budget_factor(keep_rate: float, table=LOGGED_BUDGET) -> float:
    """f(rho) of `LOGGED_BUDGET`: piecewise linear in the keep rate, flat beyond the logged rates."""
    rates = [r for r, _ in table]
    if keep_rate <= rates[0]:
        return table[0][1]
    for (r0, f0), (r1, f1) in zip(table, table[1:]):
        if keep_rate <= r1:
            return f0 + (f1 - f0) * (keep_rate - r0) / (r1 - r0)
    return table[-1][1]


@dataclass
class BATConfig:
    pair_ratio: float = 0.1  # pairs p = floor(pair_ratio * K) among the K attentive tokens
    num_clusters: Optional[float] = None  # None: from `budget`; int n, or a fraction of the inattentive tokens
    budget: Union[str, float] = "logs"  # tokens per stage: logs (authors' GMACs) | evit (K + 1) | f (round(f K))
    variant: str = "full"  # full | cluster (no matching) | pack (one inattentive token) | attentive (drop them)
    merger: str = "dpc"  # inattentive merger: dpc | kmeans | pool (spatial) | subsample (learned, strided)
    subsample_kernel: int = 4  # taps of merger="subsample"'s strided depthwise convolution
    density: str = "knn"  # DPC density: knn (DPC-KNN) | gaussian (paper Eq. 6)
    knn_k: int = 5  # neighbours of the DPC-KNN density
    sigma: Optional[float] = None  # Gaussian density bandwidth (None: scaled to the image, see log_density)
    assign: str = "nearest"  # nearest centre | chain (classic DPC: nearest denser neighbour's cluster)
    kmeans_iters: int = 3  # Lloyd iterations of merger="kmeans"
    merge_weight: str = "attn"  # attn: class attention normalised per group (Eq. 8) | mean: size-weighted mean
    normalize_merge: bool = True  # False: Eq. 8 as written, p_i = sum_j s_j z_j (weights not summing to 1)
    feature: str = "tokens"  # what is clustered / matched: tokens (x after attention) | keys (head-averaged)

    def __post_init__(self):
        for name, allowed in (("variant", VARIANTS), ("merger", MERGERS), ("density", _cluster.DENSITIES),
                              ("assign", _cluster.ASSIGNMENTS), ("merge_weight", WEIGHTS), ("feature", FEATURES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"bat {name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.pair_ratio) <= 0.5:
            raise ConfigError(f"bat pair_ratio must be in [0, 0.5], got {self.pair_ratio!r}")
        nc = self.num_clusters
        if nc is not None and not ((isinstance(nc, int) and nc >= 1) or (isinstance(nc, float) and 0 < nc <= 1)):
            raise ConfigError(f"bat num_clusters must be None, an int >= 1 or a fraction in (0, 1], got {nc!r}")
        if int(self.knn_k) < 1 or int(self.kmeans_iters) < 0:
            raise ConfigError(f"bat knn_k must be >= 1 and kmeans_iters >= 0, got {self.knn_k}, {self.kmeans_iters}")
        if self.sigma is not None and not float(self.sigma) > 0:
            raise ConfigError(f"bat sigma must be > 0 or None, got {self.sigma!r}")
        b = self.budget
        if not (b in BUDGETS or (isinstance(b, (int, float)) and not isinstance(b, bool) and 0.5 <= b <= 2.0)):
            raise ConfigError(f"bat budget must be one of {list(BUDGETS)} or a token factor in [0.5, 2], got {b!r}")
        if int(self.subsample_kernel) < 1:
            raise ConfigError(f"bat subsample_kernel must be >= 1, got {self.subsample_kernel!r}")
        if not self.normalize_merge and self.merge_weight != "attn":
            raise ConfigError("bat normalize_merge=False is Eq. 8's raw class-attention sum: it needs "
                              f"merge_weight='attn', got {self.merge_weight!r}")


def stage_tokens(K: int, keep_rate: float, budget) -> int:
    """Tokens a full BAT stage outputs from K attentive tokens: K + 1 (evit) or round(f K) (logs / factor f)."""
    if budget == "evit":
        return K + 1
    f = budget_factor(keep_rate) if budget == "logs" else float(budget)
    return int(math.floor(f * K + 0.5))


def stage_counts(num_tokens: int, keep_rate: float, cfg: BATConfig) -> tuple[int, int, int]:
    """(K attentive, p pairs, n inattentive groups) for T tokens; T - K == 0 means the stage does nothing."""
    T = num_tokens
    K = keep_count(keep_rate, T)
    M = T - K
    if M == 0 or cfg.variant == "attentive":
        return K, 0, 0
    if cfg.variant == "pack":
        return K, 0, 1
    p = min(int(math.floor(cfg.pair_ratio * K)), K // 2)
    if cfg.num_clusters is None:
        # K - p + n = out with 1 <= n <= M and 0 <= p <= K // 2: more pairs if out is small, fewer if it is large
        out = min(max(stage_tokens(K, keep_rate, cfg.budget), K - K // 2 + 1), K + M)
        n = out - (K - p)
        if n < 1:
            p, n = p + 1 - n, 1
        elif n > M:
            p, n = p - (n - M), M
    elif isinstance(cfg.num_clusters, float):
        n = min(M, max(1, round(cfg.num_clusters * M)))
    else:
        n = min(M, int(cfg.num_clusters))
    return K, (p if cfg.variant == "full" else 0), n


@dataclass
class BATPlan:
    """A BAT stage: group (B, T) output slot of every token (-1 dropped) plus what was decided, for inspection."""

    group: Tensor  # (B, T) in [0, num_groups) or -1
    num_groups: int  # K - p + n
    attentive: Tensor  # (B, K) token indices, descending class attention
    pairs: Tensor  # (B, p, 2) positions in `attentive` (better-scored member first)
    inattentive: Tensor  # (B, M) token indices (descending attention; Z-order for merger="pool" / "subsample")
    cluster: Tensor  # (B, M) group of each inattentive token in [0, n), -1 if dropped
    centres: Tensor  # (B, n) positions in `inattentive` of the DPC centres / K-means seeds (empty for pool)


def spatial_keys(patch_to_token: Tensor, num_tokens: int, grid: Optional[tuple] = None) -> Tensor:
    """(B, T) Z-order (Morton) key of each token's place on the patch grid: the centroid of its patches, rounded.

    patch_to_token (B, N) from the token state; grid (H, W) with H * W = N (default: square, else one row).
    """
    B, N = patch_to_token.shape
    H, W = grid if grid is not None and grid[0] * grid[1] == N else _square(N)
    idx = torch.arange(N, device=patch_to_token.device).expand(B, N)
    valid = patch_to_token >= 0
    target = torch.where(valid, patch_to_token, num_tokens)  # pruned patches -> spill slot
    coords = torch.stack([idx // W, idx % W, torch.ones_like(idx)], dim=-1).float() * valid.unsqueeze(-1)  # (B, N, 3)
    sums = coords.new_zeros(B, num_tokens + 1, 3).scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, 3), coords)
    centroid = (sums[:, :num_tokens, :2] / sums[:, :num_tokens, 2:].clamp_min(1)).round().long()  # (B, T, 2)
    return _cluster.morton_key(centroid[..., 0], centroid[..., 1], max(H, W))


def _square(n: int) -> tuple:
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def attentive_slots(K: int, pairs: Tensor) -> Tensor:
    """(B, K) output slot of each attentive position: survivors numbered in order, a pair's second member
    takes its partner's slot."""
    B, p = pairs.shape[0], pairs.shape[1]
    dev = pairs.device
    survivor = torch.ones(B, K, dtype=torch.long, device=dev)
    survivor.scatter_(1, pairs[..., 1], 0)
    slot = survivor.cumsum(dim=1) - 1
    return slot.scatter(1, pairs[..., 1], torch.gather(slot, 1, pairs[..., 0]))


def cluster_inattentive(z: Tensor, n: int, cfg: BATConfig) -> tuple[Tensor, Tensor]:
    """Group the inattentive features z (B, M, C) into n groups -> (label (B, M), centres (B, n'))."""
    B, M, _ = z.shape
    if cfg.merger == "dpc":
        return _cluster.dpc_cluster(z, n, cfg.density, cfg.knn_k, cfg.sigma, cfg.assign)
    if cfg.merger == "kmeans":
        return _cluster.kmeans_cluster(z, n, cfg.kmeans_iters)
    empty = torch.empty(B, 0, dtype=torch.long, device=z.device)
    return _cluster.pool_groups(B, M, n, z.device), empty  # pool / subsample: contiguous runs of the Z-order


@torch.no_grad()
def bat_plan(feat: Tensor, scores: Tensor, K: int, p: int, n: int, cfg: BATConfig,
             spatial: Optional[Tensor] = None) -> BATPlan:
    """Split by class attention `scores` (B, T), match p attentive pairs, cluster the rest into n groups.

    feat (B, T, C): the features compared (tokens or keys). n == 0 drops the inattentive tokens.
    spatial (B, T): Z-order keys of the tokens (`spatial_keys`), needed by merger="pool" / "subsample".
    """
    B, T = scores.shape
    dev = scores.device
    order = argsort_desc(scores)  # (B, T)
    attentive, inattentive = order[:, :K], order[:, K:]
    M = T - K
    pairs = (_cluster.greedy_pairs(gather_tokens(feat, attentive), p) if p > 0
             else torch.empty(B, 0, 2, dtype=torch.long, device=dev))
    slot = attentive_slots(K, pairs)  # (B, K) in [0, K - p)
    centres = torch.empty(B, 0, dtype=torch.long, device=dev)
    if n == 0:
        cluster = torch.full((B, M), -1, dtype=torch.long, device=dev)
    elif n == 1:
        cluster = torch.zeros(B, M, dtype=torch.long, device=dev)
    else:
        if cfg.merger in ("pool", "subsample"):  # spatial: neighbours along the Z-order of the patch grid
            key = torch.gather(spatial, 1, inattentive) * T + inattentive  # ties: token order
            inattentive = torch.gather(inattentive, 1, key.argsort(dim=1))
        cluster, centres = cluster_inattentive(gather_tokens(feat, inattentive), n, cfg)
    group = torch.empty(B, T, dtype=torch.long, device=dev)
    group.scatter_(1, attentive, slot)
    group.scatter_(1, inattentive, torch.where(cluster >= 0, cluster + (K - p), -1))
    return BATPlan(group, K - p + n, attentive, pairs, inattentive, cluster, centres)


def merge_weights(plan: BATPlan, scores: Tensor, sizes: Tensor, mode: str, normalize: bool = True) -> Tensor:
    """(B, T) weights for `merge_tokens`: class attention (Eq. 8) or patch counts; 1 for tokens passing unchanged.

    normalize=True: weights are divided by their group's total (a weighted mean), so every singleton group gets
    1 and untouched tokens pass bit-exactly. normalize=False (Eq. 8 as written, p_i = sum_j s_j z_j): every pair
    and every cluster (even of one token) is the raw sum; only unmatched attentive tokens keep weight 1.
    """
    w = scores.float().clamp_min(1e-12) if mode == "attn" else sizes.float()
    g = plan.group.clamp_min(0)
    count = torch.zeros(g.shape[0], plan.num_groups + 1, device=g.device).scatter_add_(
        1, torch.where(plan.group >= 0, g, plan.num_groups), torch.ones_like(w))
    single = torch.gather(count, 1, g) == 1
    if not normalize:
        single = single & (plan.group < plan.attentive.shape[1] - plan.pairs.shape[1])  # attentive slots: K - p
    return torch.where(single, torch.ones_like(w), w)


class SubsampleMerger(nn.Module):
    """The sub-sampling merger of the paper's Table 4: a learned strided reduction of the inattentive tokens.

    The inattentive tokens, in Z-order over the patch grid, are cut into n contiguous runs (as merger="pool");
    each run of m tokens is reduced by a depthwise convolution of k taps with stride k, the run resampled to k
    taps (token t uses tap floor(t k / m)), then a pointwise linear layer:
        out_j = W_p ((k / m_j) sum_t w_{tap(t)} * z_t + b) + b_p.
    Initialised to a plain mean (w = 1/k, b = 0, W_p = I), so an untrained model pools.
    """

    def __init__(self, dim: int, kernel: int = 4):
        super().__init__()
        self.kernel = int(kernel)
        self.weight = nn.Parameter(torch.full((self.kernel, dim), 1.0 / self.kernel))  # (k, C) depthwise taps
        self.bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.proj.bias.zero_()

    def forward(self, z: Tensor, run: Tensor, n: int) -> Tensor:
        """z (B, M, C) in run order, run (B, M) non-decreasing run ids in [0, n) -> (B, n, C)."""
        B, M, C = z.shape
        size = torch.zeros(B, n, device=z.device).scatter_add_(1, run, torch.ones(B, M, device=z.device))
        start = size.cumsum(dim=1) - size  # (B, n) first position of each run
        m = torch.gather(size, 1, run)  # (B, M) length of each token's run
        t = torch.arange(M, device=z.device).expand(B, M) - torch.gather(start, 1, run)  # position in the run
        tap = (t * self.kernel / m).floor().long().clamp_(0, self.kernel - 1)
        total = z.new_zeros(B, n, C).scatter_add_(1, run.unsqueeze(-1).expand(-1, -1, C), z * self.weight[tap])
        out = total * (self.kernel / size.clamp_min(1)).unsqueeze(-1).to(z.dtype) + self.bias
        return self.proj(out)


class BATReducer(StageReducer):
    name = "bat"

    def __init__(self, depth: int, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Optional[Sequence[int]] = None, config: Optional[BATConfig] = None):
        super().__init__(depth, keep_rate, locations)
        self.config = config or BATConfig()

    def attention_args(self, i: int, state: TokenState) -> dict:
        kw = super().attention_args(i, state)
        if kw and self.config.feature == "keys":
            kw["need_keys"] = True
        return kw

    def stage_inputs(self, model: nn.Module, s: int) -> dict:
        merger = model.bat_subsample[s] if self.config.merger == "subsample" else None
        return {"grid": getattr(model, "grid_size", None), "subsample": merger}

    def reduce(self, state: TokenState, cls_attn: Optional[Tensor], keys: Optional[Tensor],
               keep_rate: float, grid: Optional[tuple] = None,
               subsample: Optional[SubsampleMerger] = None) -> TokenState:
        cfg = self.config
        K, p, n = stage_counts(state.num_tokens, keep_rate, cfg)
        scores = patch_scores(state, cls_attn)  # (B, T)
        P = state.num_prefix
        feat = state.x[:, P:] if cfg.feature == "tokens" else keys[:, P:]
        spatial = None
        if cfg.merger in ("pool", "subsample"):
            spatial = spatial_keys(state.patch_to_token, state.num_tokens, grid)
        plan = bat_plan(feat, scores, K, p, n, cfg, spatial)
        weight = merge_weights(plan, scores, state.patch_sizes(), cfg.merge_weight, cfg.normalize_merge)
        record_extra(state, "bat", plan)
        tokens = state.x[:, P:]
        state = merge_tokens(state, plan.group, weight, plan.num_groups, normalize=cfg.normalize_merge)
        if cfg.merger == "subsample" and n > 1 and cfg.variant in ("full", "cluster"):
            if subsample is None:
                raise RuntimeError("merger='subsample' needs the model's bat_subsample layers (apply_bat adds them)")
            z = gather_tokens(tokens, plan.inattentive)  # (B, M, C) in Z-order
            learned = subsample(z, plan.cluster, n)  # (B, n, C)
            state.x = torch.cat([state.x[:, :P + plan.num_groups - n], learned.to(state.x.dtype)], dim=1)
        return state

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, variant={c.variant!r}, merger={c.merger!r}, budget={c.budget!r}, "
                f"pair_ratio={c.pair_ratio}, num_clusters={c.num_clusters}, density={c.density!r}, "
                f"assign={c.assign!r}")


_PARAMS = ("keep_rate", "locations") + tuple(BATConfig.__dataclass_fields__)


RECIPE = Recipe("bat", "BAT fine-tune from a pretrained DeiT (the authors' logs for rho 0.2-0.6): 30 epochs, lr 4e-5 "
                "at batch 1024 (= 2e-5 x B/512), cosine to 2e-6, no warm-up, wd 1e-6, keep rate rho from the first "
                "step (EViT's fine-tune)", epochs=30, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0,
                weight_decay=1e-6)
# paper Sec. 5.1: "the keep rate decreases from 1 to the target over 100 epochs" of 300
SCRATCH_RECIPE = Recipe("bat_scratch", "BAT from scratch (paper Sec. 5.1, the authors' rho 0.7 log): DeiT's 300 "
                        "epochs, lr 5e-4 x B/512, warm-up 5, min 1e-5, wd 0.05, keep rate 1 -> rho by cosine over the "
                        "first 100 epochs", epochs=300, lr=5e-4, lr_batch=512, min_lr=1e-5, warmup_epochs=5,
                        weight_decay=0.05, keep_schedule=(0.0, 100 / 300))


@register_method("bat", params=_PARAMS, families=("vit",), recipe=RECIPE, recipes=(SCRATCH_RECIPE,),
                 attention_extras=("need_cls_attn", "need_keys"), identity={"keep_rate": 1.0},
                 info_fields={"bat": "per stage, the BATPlan: group of every token, attentive tokens, pairs, clusters"})
def apply_bat(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
              locations: Optional[Sequence[int]] = None, **config) -> nn.Module:
    """BAT: split tokens by class attention, cluster the inattentive ones (DPC), match attentive pairs.

    Args:
        keep_rate: rho in (0, 1] (or one per location); `model.reducer.set_keep_rate` changes it at run time.
        locations: blocks acting between attention and MLP (default [3, 6, 9] at depth 12, [4, 8, 12] at 16;
            LV-ViT-S's published GMACs need [4, 8, 12]).
        **config: `BATConfig` fields (pair_ratio, num_clusters, budget, variant, merger, subsample_kernel,
            density, knn_k, sigma, assign, kmeans_iters, merge_weight, normalize_merge, feature); see docs/bat.md.
            merger="subsample" registers its learned layers as `model.bat_subsample` (one per location).
    """
    reducer = BATReducer(len(model.blocks), keep_rate, locations, BATConfig(**config))
    if reducer.config.merger == "subsample":
        ref = next(model.parameters())
        model.bat_subsample = nn.ModuleList(SubsampleMerger(model.embed_dim, reducer.config.subsample_kernel)
                                            for _ in reducer.locations).to(device=ref.device, dtype=ref.dtype)
    model.reducer = reducer
    return model
