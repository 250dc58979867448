"""Batched clustering and matching of token sets (BAT's token merger, docs/methods.md 5). Pure functions, no
loops over images: every function takes (B, M, C) features with the same M per image and returns index tensors.

- `dpc_cluster`: density-peak clustering without iterations (Rodriguez & Laio 2014; BAT Eqs. 6-7): a density
  per token (DPC-KNN `exp(-mean kNN d^2)` or the paper's Gaussian `exp(-sum_j d^2 / 2 sigma^2)`), the distance
  delta to the nearest denser token, centres = top-n of rho * delta, then assignment to the nearest centre or
  along the chain of nearest denser neighbours (classic DPC).
- `kmeans_cluster`: Lloyd iterations (the slower alternative the paper ablates).
- `pool_groups`: contiguous chunks of a sequence; with `morton_key` order, spatial pooling (the pooling ablation).
- `greedy_pairs`: the most cosine-similar disjoint pairs, best first (BAT's attentive-token matching).

Shapes and control flow depend only on the sizes, never on the values (no `.item()`; the one early exit, in
`greedy_pairs`, is taken in eager CPU runs only and changes no result), so BAT exports to ONNX and compiles with
`torch.compile(fullgraph=True)`; the two ops ONNX lacks (cdist here, the stable sort in `dynavit.ops`) are
recorded in an equivalent form during an ONNX export only (`onnx_exporting`).

Distances are Euclidean divided by sqrt(C), computed in float32; ties in density are broken by position
(earlier = denser), so results are deterministic.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..ops import argsort_desc, may_sync, onnx_exporting
from ..tokens import gather_tokens

DENSITIES = ("knn", "gaussian")
ASSIGNMENTS = ("nearest", "chain")


def cdist(a: Tensor, b: Tensor) -> Tensor:
    """torch.cdist(a, b) (Euclidean, (B, M, C), (B, N, C) -> (B, M, N)), also inside an ONNX export.

    ONNX has no cdist: the export records cdist's own matrix-product form (what torch.cdist computes for more
    than 25 rows), while PyTorch keeps calling torch.cdist, so eager results are those of torch.cdist exactly.
    """
    if not onnx_exporting():
        return torch.cdist(a, b)
    a_norm, b_norm = a.pow(2).sum(-1, keepdim=True), b.pow(2).sum(-1, keepdim=True)
    a_ = torch.cat([a.mul(-2), a_norm, torch.ones_like(a_norm)], dim=-1)
    b_ = torch.cat([b, torch.ones_like(b_norm), b_norm], dim=-1)
    return (a_ @ b_.transpose(-2, -1)).clamp_min(0).sqrt()


def pairwise_distance(z: Tensor) -> Tensor:
    """z (B, M, C) -> (B, M, M) Euclidean distances / sqrt(C), float32, exact zeros on the diagonal."""
    z = z.float()
    d = cdist(z, z) / math.sqrt(z.shape[-1])
    return d * (1 - torch.eye(z.shape[1], device=z.device, dtype=d.dtype))


def log_density(dist: Tensor, density: str = "knn", k: int = 5, sigma: Optional[float] = None) -> Tensor:
    """(B, M, M) distances -> (B, M) log rho_i (only the order and rho * delta matter, so logs avoid underflow).

    knn: log rho_i = -mean of d_ij^2 over the k nearest other tokens (DPC-KNN, as TCFormer).
    gaussian: log rho_i = -sum_j d_ij^2 / (2 sigma^2) (BAT Eq. 6); sigma=None sets 2 sigma^2 to the image's
    mean of sum_j d_ij^2, so log rho averages -1 and delta still matters in rho * delta.
    """
    M = dist.shape[-1]
    if density == "knn":
        k = min(k, M - 1)
        if k <= 0:
            return dist.new_zeros(dist.shape[:2])
        nearest = dist.topk(k + 1, dim=-1, largest=False).values[..., 1:]  # drop the token itself
        return -(nearest ** 2).mean(dim=-1)
    if density == "gaussian":
        total = (dist ** 2).sum(dim=-1)  # (B, M)
        if sigma is None:
            two_sigma2 = total.mean(dim=-1, keepdim=True).clamp_min(1e-12)
        else:
            two_sigma2 = 2.0 * float(sigma) ** 2
        return -total / two_sigma2
    raise ValueError(f"density must be one of {DENSITIES}, got {density!r}")


def denser_mask(log_rho: Tensor) -> Tensor:
    """(B, M) -> (B, M, M) bool, [b, i, j] = token j is denser than i (ties: the earlier position is denser)."""
    M = log_rho.shape[-1]
    idx = torch.arange(M, device=log_rho.device)
    ri, rj = log_rho.unsqueeze(-1), log_rho.unsqueeze(-2)
    return (rj > ri) | ((rj == ri) & (idx.view(1, 1, M) < idx.view(1, M, 1)))


def dpc_delta(dist: Tensor, log_rho: Tensor, need_parent: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """BAT Eq. 7: delta_i = min distance to a denser token (max distance for the densest) and that token (parent).

    Returns delta (B, M) and parent (B, M) (the densest token is its own parent), or None for need_parent=False
    (a min without indices: on the CPU several times faster; the same delta).
    """
    denser = denser_mask(log_rho)  # (B, M, M)
    top = ~denser.any(dim=-1)  # (B, M) the densest token of each image
    if not need_parent:
        delta = torch.where(denser, dist, float("inf")).amin(dim=-1)
        return torch.where(top, dist.amax(dim=-1), delta), None
    delta, parent = dist.masked_fill(~denser, float("inf")).min(dim=-1)
    delta = torch.where(top, dist.max(dim=-1).values, delta)
    parent = torch.where(top, torch.arange(dist.shape[-1], device=dist.device).expand_as(parent), parent)
    return delta, parent


def dpc_centres(log_rho: Tensor, delta: Tensor, n: int, force_densest: bool = False) -> Tensor:
    """Top-n tokens by rho * delta (computed as log rho + log delta), best first -> (B, n) positions."""
    score = log_rho + delta.clamp_min(1e-30).log()
    if force_densest:
        score = score.scatter(1, log_rho.argmax(dim=-1, keepdim=True), float("inf"))
    return score.topk(n, dim=-1, sorted=True).indices


def assign_nearest(dist: Tensor, centres: Tensor) -> Tensor:
    """Every token joins its nearest centre; centres join their own cluster. -> (B, M) cluster ids in [0, n)."""
    n = centres.shape[1]
    to_centres = torch.gather(dist, 2, centres.unsqueeze(1).expand(-1, dist.shape[1], -1))  # (B, M, n)
    label = to_centres.argmin(dim=-1)
    return label.scatter(1, centres, torch.arange(n, device=dist.device).expand_as(centres))


def assign_chain(parent: Tensor, centres: Tensor) -> Tensor:
    """Classic DPC: a token takes the cluster of its nearest denser neighbour, recursively (pointer jumping).

    Every chain must end at a centre: include the densest token among the centres (force_densest).
    """
    B, M = parent.shape
    n = centres.shape[1]
    root = parent.scatter(1, centres, centres)  # centres are roots
    for _ in range(max(1, math.ceil(math.log2(max(M, 2))))):
        root = torch.gather(root, 1, root)
    cluster_of = torch.full((B, M), -1, dtype=torch.long, device=parent.device)
    cluster_of.scatter_(1, centres, torch.arange(n, device=parent.device).expand(B, n))
    return torch.gather(cluster_of, 1, root)  # -1 only if a chain ends outside the centres (see above)


def dpc_cluster(z: Tensor, n: int, density: str = "knn", k: int = 5, sigma: Optional[float] = None,
                assign: str = "nearest") -> tuple[Tensor, Tensor]:
    """Density-peak clustering of z (B, M, C) into n clusters -> (label (B, M), centres (B, n) best first)."""
    if assign not in ASSIGNMENTS:
        raise ValueError(f"assign must be one of {ASSIGNMENTS}, got {assign!r}")
    dist = pairwise_distance(z)
    log_rho = log_density(dist, density, k, sigma)
    delta, parent = dpc_delta(dist, log_rho, need_parent=(assign == "chain"))
    centres = dpc_centres(log_rho, delta, n, force_densest=(assign == "chain"))
    label = assign_nearest(dist, centres) if assign == "nearest" else assign_chain(parent, centres)
    return label, centres


def kmeans_cluster(z: Tensor, n: int, iters: int = 3) -> tuple[Tensor, Tensor]:
    """K-means of z (B, M, C) into n clusters, seeded with n evenly spaced tokens -> (label (B, M), seeds (B, n)).

    Each seed token stays in its own cluster, so no cluster is empty (every merged token holds a patch).
    """
    B, M, C = z.shape
    z = z.float()
    seeds = (torch.arange(n, device=z.device) * M // n).expand(B, n)  # (B, n) distinct positions
    centre = torch.gather(z, 1, seeds.unsqueeze(-1).expand(-1, -1, C))  # (B, n, C)
    for _ in range(max(int(iters), 0)):
        label = cdist(z, centre).argmin(dim=-1)  # (B, M)
        total = z.new_zeros(B, n, C).scatter_add_(1, label.unsqueeze(-1).expand(-1, -1, C), z)
        count = z.new_zeros(B, n).scatter_add_(1, label, z.new_ones(B, M))
        centre = torch.where(count.unsqueeze(-1) > 0, total / count.clamp_min(1).unsqueeze(-1), centre)
    label = cdist(z, centre).argmin(dim=-1)
    return label.scatter(1, seeds, torch.arange(n, device=z.device).expand(B, n)), seeds


def morton_key(row: Tensor, col: Tensor, side: int) -> Tensor:
    """Z-order (Morton) index of integer grid positions in [0, side): bits of row and col interleaved (long).

    Runs of consecutive keys are compact squares of the grid: on a 2^a x 2^a grid, runs of 4^b keys starting at a
    multiple of 4^b are exactly the 2^b x 2^b pooling windows.
    """
    key = torch.zeros_like(row)
    for bit in range(max(1, math.ceil(math.log2(max(side, 2))))):
        key |= ((row >> bit) & 1) << (2 * bit + 1) | ((col >> bit) & 1) << (2 * bit)
    return key


def pool_groups(batch: int, length: int, n: int, device=None) -> Tensor:
    """Contiguous chunks: position m -> floor(m * n / M), (B, M); every chunk non-empty when n <= M."""
    return (torch.arange(length, device=device) * n // length).expand(batch, length)


def greedy_pairs(z: Tensor, p: int, early_exit: Optional[bool] = None) -> Tensor:
    """The p most cosine-similar disjoint pairs of z (B, K, C), as greedy matching picks them -> (B, p, 2).

    Greedy matching (repeatedly take the most similar remaining pair, remove both tokens) is computed in rounds
    (`_matching_rounds`): every mutual nearest-neighbour pair among the remaining tokens belongs to it, so each
    round accepts all of them at once. Rounds are over the whole batch and end once, in every image, the p best
    accepted pairs beat every similarity still left. Each round accepts the most similar remaining pair of every
    image, so that holds after p rounds at the latest: exactly p rounds run, and the rounds after the end change
    nothing (a batch-wide `done` flag instead of a Python `break`). Shapes and control flow are static, so the
    function exports to ONNX and compiles with `torch.compile(fullgraph=True)`. Pairs come best first, the
    smaller position first within a pair; p <= K // 2.

    early_exit: take the data-dependent shortcuts, which return the same pairs: the rounds stop where `done`
    turns true in every image (typically 3-5 rounds instead of p), and large batches first match among their
    most similar tokens only (`_subgraph_pairs`). None = where that is free (`may_sync`: eager CPU).
    """
    B, K, _ = z.shape
    dev = z.device
    if p == 0:
        return torch.empty(B, 0, 2, dtype=torch.long, device=dev)
    zn = torch.nn.functional.normalize(z.float(), dim=-1)
    sim = zn @ zn.transpose(1, 2)  # (B, K, K), symmetric up to rounding
    early_exit = may_sync(z) if early_exit is None else bool(early_exit)
    if early_exit and B * K * K >= SUBGRAPH_MIN_ENTRIES:
        return _subgraph_pairs(sim, p)
    edge, partner = _matching_rounds(_symmetric(sim), p, early_exit)
    return _best_pairs(edge, partner, p)


def _symmetric(sim: Tensor) -> Tensor:
    """(sim + sim^T) / 2 with NaN -> -inf and -inf on the diagonal: the exactly symmetric similarities matched."""
    K = sim.shape[-1]
    out = torch.nan_to_num((sim + sim.transpose(-2, -1)) / 2, nan=float("-inf"))
    # added as -inf / -0.0 (x + -0.0 == x bit for bit): on CPU several times faster than masked_fill
    return out.add_(torch.where(torch.eye(K, dtype=torch.bool, device=sim.device), float("-inf"), -0.0))


def _matching_rounds(sim: Tensor, p: int, early_exit: bool) -> tuple[Tensor, Tensor]:
    """Greedy matching in rounds of mutual nearest neighbours on `_symmetric` similarities (B, K, K), which
    it overwrites -> (edge (B, K): weight of the accepted pair (i, partner_i) at i < partner, -inf elsewhere;
    partner (B, K), -1 for unmatched tokens)."""
    B, K, _ = sim.shape
    dev = sim.device
    neg_inf = float("-inf")
    # the nearest column is found with arithmetic: on CPU faster than max(dim) with indices
    pos = torch.arange(K, device=dev)
    rev = (K - pos).to(sim.dtype)  # K - j: the largest among tied columns marks the first one
    lowest = torch.finfo(sim.dtype).min
    work = torch.empty_like(sim)
    partner = torch.full((B, K), -1, dtype=torch.long, device=dev)
    edge = torch.full((B, K), neg_inf, device=dev)
    done = torch.zeros((), dtype=torch.bool, device=dev)
    for r in range(p):
        best = sim.amax(dim=-1, keepdim=True)  # (B, K, 1)
        # sign(sim - best) is 0 at the row maximum, -1 elsewhere: key K - j there, K - j - 2K < 0 elsewhere
        torch.sub(sim, best.clamp_min(lowest), out=work).sign_()
        torch.add(rev, work, alpha=2 * K, out=work)
        nearest = (K - work.amax(dim=-1).abs_()).long()  # = sim.max(dim=-1).indices (all -inf row: max key -K, 0)
        best = best.squeeze(-1).masked_fill(partner >= 0, neg_inf)  # matched rows (sim masks columns only)
        # the p-th best accepted pair beats all that is left (counted: cheaper than a top-p per round)
        done = done | ((edge >= best.amax(dim=-1, keepdim=True)).sum(dim=1) >= p).all()
        if early_exit and bool(done):
            break  # nothing below would change: mutual is all False from here on
        mutual = (torch.gather(nearest, 1, nearest) == pos) & (best > neg_inf) & ~done
        partner = torch.where(mutual, nearest, partner)
        edge = torch.where(mutual & (pos < nearest), best, edge)
        if r + 1 < p:
            sim.add_(torch.where(partner >= 0, neg_inf, -0.0).unsqueeze(1))  # matched tokens leave every row
    return edge, partner


def _best_pairs(edge: Tensor, partner: Tensor, p: int) -> Tensor:
    """`_matching_rounds`' edge and partner (B, K) -> (B, p, 2) the p best pairs, best first; equal similarities
    in the order of their first positions (a stable sort: topk's order of ties is unspecified)."""
    first = argsort_desc(edge)[:, :p]  # (B, p)
    return torch.stack([first, torch.gather(partner, 1, first).clamp_min(0)], dim=-1)  # (-1 only for NaN input)


# The subgraph pays off from about this many similarities per batch (B K^2; measured on a 2-core CPU, the
# demo model's and DeiT-S's BAT stages): below it the rounds on the whole matrix are as fast.
SUBGRAPH_MIN_ENTRIES = 2 ** 19


def _subgraph_pairs(sim: Tensor, p: int, share: float = 0.5) -> Tensor:
    """`greedy_pairs` (eager) matching first among the ceil(share * K) tokens most similar to any other.

    Greedy matching takes pairs in descending similarity, so its first picks depend only on the pairs above any
    threshold theta. u_i = (max_j sim_ij + max_j sim_ji) / 2 bounds every symmetric similarity of token i, so
    every pair above theta = the (q + 1)-th largest u joins two of the q tokens of largest u: the rounds on
    that (q, q) subgraph, with the pairs at or below theta removed, make exactly greedy's first picks. An
    image's result is taken when it accepted p pairs and the p-th is strictly more similar than the next
    accepted one (then the p best are those of the whole matrix; the subgraph keeps the tokens' order, so
    equal similarities come in the same order); if one image is not, the batch is matched on its whole matrix.
    sim (B, K, K) before symmetrisation; its diagonal is overwritten.
    """
    B, K, _ = sim.shape
    neg_inf = float("-inf")
    q = min(K - 1, max(2 * p + 2, math.ceil(share * K)))
    sim.diagonal(dim1=1, dim2=2).fill_(neg_inf)
    bound = (sim.amax(dim=-1) + sim.amax(dim=-2)) / 2  # (B, K) >= every (sim_ij + sim_ji) / 2 of row i
    top, idx = bound.topk(q + 1, dim=1)
    theta = top[:, -1:]  # (B, 1); NaN (a NaN token) fails the checks below
    idx = idx[:, :q].sort(dim=1).values  # (B, q) ascending: pair order and ties as in the whole matrix
    sub = torch.gather(gather_tokens(sim, idx), 2, idx.unsqueeze(1).expand(B, q, q))  # (B, q, q) = sim[b, idx, idx]
    sub = torch.nan_to_num((sub + sub.transpose(1, 2)) / 2, nan=neg_inf)  # the whole matrix's exact values
    sub = torch.where(sub > theta.unsqueeze(-1), sub, neg_inf)  # (the diagonal is -inf already)
    edge, partner = _matching_rounds(sub, p, early_exit=True)
    won = edge.topk(min(p + 1, q), dim=1).values  # (B, <= p + 1) accepted weights, best first
    n_won = (won > neg_inf).sum(dim=1)
    # p accepted, the p-th strictly better than the next accepted one (a tie there: which of the tied pairs the
    # rounds keep depends on where they stopped)
    good = (n_won >= p) & ((n_won == p) | (won[:, p - 1] > won[:, min(p, q - 1)]))  # (B,)
    first = argsort_desc(edge)[:, :p]  # (B, p) in subgraph positions, ties by position as in the whole matrix
    pairs = torch.stack([torch.gather(idx, 1, first),
                         torch.gather(idx, 1, torch.gather(partner, 1, first).clamp_min(0))], dim=-1)
    if not bool(good.all()):  # the whole batch (the rounds couple images through the order of ties)
        return _best_pairs(*_matching_rounds(_symmetric(sim), p, early_exit=True), p)
    return pairs
