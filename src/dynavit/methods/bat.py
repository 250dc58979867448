"""BAT, "Beyond Attentive Tokens" (Long et al., CVPR 2023): token splitting and merging (docs/methods.md 5).

Inside blocks [3, 6, 9] (12-block models) or [3, 7, 11] (LV-ViT-S), between attention and MLP:
1. split (Eq. 5): the K = ceil(rho * T) tokens with the highest head-averaged class attention are attentive;
2. inattentive tokens are clustered by density peaks without iterations (Eqs. 6-7, `_cluster.dpc_cluster`);
3. the p most cosine-similar disjoint pairs of attentive tokens are matched;
4. every cluster / pair becomes one token, the class-attention-weighted mean of its members (Eq. 8, weights
   normalised within the group); unmatched attentive tokens pass unchanged.
Output `[prefix, attentive after matching (descending class attention; a pair sits at its better member's
place), cluster tokens (descending centre score)]`. The whole plan is batched (same counts for every image).

Budget (default): p = floor(pair_ratio * K) pairs and n = p + 1 clusters, so K - p + n = K + 1 tokens remain:
exactly EViT's count at the same keep rate (same GMACs). Every choice the paper leaves open is a parameter;
`docs/bat.md` lists them. Ablations (paper Tables 3-4): variant="attentive" (i, keep attentive only), "pack"
(ii, all inattentive into one token), "cluster" (iii, no matching), "full" (iv); merger="dpc" / "kmeans" / "pool".
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
from ._common import KEEP_SCHEDULE, StageReducer, keep_count, patch_scores, record_extra

VARIANTS = ("full", "cluster", "pack", "attentive")
MERGERS = ("dpc", "kmeans", "pool")
WEIGHTS = ("attn", "mean")
FEATURES = ("tokens", "keys")


@dataclass
class BATConfig:
    pair_ratio: float = 0.1  # pairs p = floor(pair_ratio * K) among the K attentive tokens
    num_clusters: Optional[float] = None  # None: p + 1 (EViT's token count); int n, or a fraction of inattentive
    variant: str = "full"  # full | cluster (no matching) | pack (one inattentive token) | attentive (drop them)
    merger: str = "dpc"  # inattentive merger: dpc | kmeans | pool
    density: str = "knn"  # DPC density: knn (DPC-KNN) | gaussian (paper Eq. 6)
    knn_k: int = 5  # neighbours of the DPC-KNN density
    sigma: Optional[float] = None  # Gaussian density bandwidth (None: scaled to the image, see log_density)
    assign: str = "nearest"  # nearest centre | chain (classic DPC: nearest denser neighbour's cluster)
    kmeans_iters: int = 3  # Lloyd iterations of merger="kmeans"
    merge_weight: str = "attn"  # attn: class attention normalised per group (Eq. 8) | mean: size-weighted mean
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
        p = min(p, M - 1)  # n = p + 1 clusters must fit in the M inattentive tokens
        n = p + 1
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
    inattentive: Tensor  # (B, M) token indices (descending attention; token order for merger="pool")
    cluster: Tensor  # (B, M) group of each inattentive token in [0, n), -1 if dropped
    centres: Tensor  # (B, n) positions in `inattentive` of the DPC centres / K-means seeds (empty for pool)


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
    return _cluster.pool_groups(B, M, n, z.device), empty


@torch.no_grad()
def bat_plan(feat: Tensor, scores: Tensor, K: int, p: int, n: int, cfg: BATConfig) -> BATPlan:
    """Split by class attention `scores` (B, T), match p attentive pairs, cluster the rest into n groups.

    feat (B, T, C): the features compared (tokens or keys). n == 0 drops the inattentive tokens.
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
        if cfg.merger == "pool":
            inattentive = inattentive.sort(dim=1).values  # pool neighbours in token order
        cluster, centres = cluster_inattentive(gather_tokens(feat, inattentive), n, cfg)
    group = torch.empty(B, T, dtype=torch.long, device=dev)
    group.scatter_(1, attentive, slot)
    group.scatter_(1, inattentive, torch.where(cluster >= 0, cluster + (K - p), -1))
    return BATPlan(group, K - p + n, attentive, pairs, inattentive, cluster, centres)


def merge_weights(plan: BATPlan, scores: Tensor, sizes: Tensor, mode: str) -> Tensor:
    """(B, T) weights for `merge_tokens`: class attention (Eq. 8) or patch counts; 1 for singleton groups so
    untouched tokens pass bit-exactly."""
    w = scores.float().clamp_min(1e-12) if mode == "attn" else sizes.float()
    g = plan.group.clamp_min(0)
    count = torch.zeros(g.shape[0], plan.num_groups + 1, device=g.device).scatter_add_(
        1, torch.where(plan.group >= 0, g, plan.num_groups), torch.ones_like(w))
    single = torch.gather(count, 1, g) == 1
    return torch.where(single, torch.ones_like(w), w)


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

    def reduce(self, state: TokenState, cls_attn: Optional[Tensor], keys: Optional[Tensor],
               keep_rate: float) -> TokenState:
        cfg = self.config
        K, p, n = stage_counts(state.num_tokens, keep_rate, cfg)
        scores = patch_scores(state, cls_attn)  # (B, T)
        P = state.num_prefix
        feat = state.x[:, P:] if cfg.feature == "tokens" else keys[:, P:]
        plan = bat_plan(feat, scores, K, p, n, cfg)
        weight = merge_weights(plan, scores, state.patch_sizes(), cfg.merge_weight)
        record_extra(state, "bat", plan)
        return merge_tokens(state, plan.group, weight, plan.num_groups, normalize=True)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, variant={c.variant!r}, merger={c.merger!r}, pair_ratio={c.pair_ratio}, "
                f"num_clusters={c.num_clusters}, density={c.density!r}, assign={c.assign!r}")


_PARAMS = ("keep_rate", "locations") + tuple(BATConfig.__dataclass_fields__)


RECIPE = Recipe("bat", "BAT fine-tune (docs/methods.md 5): as EViT, lr 2e-5 x B/512, min 2e-6, wd 1e-6, keep-rate "
                "cosine 1 -> rho", epochs=30, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6,
                keep_schedule=KEEP_SCHEDULE)


@register_method("bat", params=_PARAMS, families=("vit",), recipe=RECIPE,
                 attention_extras=("need_cls_attn", "need_keys"), identity={"keep_rate": 1.0},
                 info_fields={"bat": "per stage, the BATPlan: group of every token, attentive tokens, pairs, clusters"})
def apply_bat(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
              locations: Optional[Sequence[int]] = None, **config) -> nn.Module:
    """BAT: split tokens by class attention, cluster the inattentive ones (DPC), match attentive pairs.

    Args:
        keep_rate: rho in (0, 1] (or one per location); `model.reducer.set_keep_rate` changes it at run time.
        locations: blocks acting between attention and MLP (default [3, 6, 9] at depth 12, [3, 7, 11] at 16).
        **config: `BATConfig` fields (pair_ratio, num_clusters, variant, merger, density, knn_k, sigma, assign,
            kmeans_iters, merge_weight, feature); see docs/bat.md.
    """
    model.reducer = BATReducer(len(model.blocks), keep_rate, locations, BATConfig(**config))
    return model
