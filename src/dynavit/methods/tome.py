"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching of tokens in every block (docs/methods.md 6).

Between attention and MLP of each block, r tokens are merged: the head-averaged keys, L2-normalised, are split
by position into A (even positions of the full sequence) and B (odd); each A token's most similar B token is
its partner, the r best-scoring A tokens merge into their partners (size-weighted mean, sizes add) and the
output is `[prefix, unmerged A in order, B in order]`, as the authors' code. Prefix tokens (class,
distillation) never merge. Proportional attention adds `log(size)` to the attention logits, passed to the fused
attention as an additive bias (B, 1, 1, T).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import argsort_desc, may_sync
from ..recipes import Recipe
from ..reduction import TokenReducer
from ..registry import register_method
from ..tokens import TokenState, gather_tokens, remap_patches

RSpec = Union[int, Sequence[int], tuple]


def parse_r(r: RSpec, depth: int) -> list[int]:
    """r per block from an int (constant), a list (padded with 0) or (r, inflection) in [-1, 1].

    (r, inflection) is ToMe's schedule: a line from r * (1 - inflection) in the first block to
    r * (1 + inflection) in the last (truncated to ints); (r, 0) is constant, (r, -1) decreasing.
    """
    if isinstance(r, bool):
        raise ConfigError(f"r must be an int, a list of ints or (r, inflection), got {r!r}")
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflect = r
        if not -1.0 <= inflect <= 1.0:
            raise ConfigError(f"ToMe inflection must be in [-1, 1], got {inflect!r}")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / max(depth - 1, 1)
        sched = [int(lo + step * i) for i in range(depth)]
    elif isinstance(r, (list, tuple)):
        if len(r) > depth:
            raise ConfigError(f"r schedule {list(r)} is longer than the model's {depth} blocks")
        sched = [int(v) for v in r] + [0] * (depth - len(r))
    else:
        try:
            value = operator.index(r)  # an integer (not 1.5, not '3')
        except TypeError:
            raise ConfigError(f"r must be an int, a list of ints or (r, inflection), got {r!r}") from None
        sched = [value] * depth
    if min(sched) < 0:
        raise ConfigError(f"r must be >= 0 in every block, got {sched}")
    return sched


def check_schedule(sched: list[int], num_patches: int) -> None:
    """Fail loudly (instead of ToMe's silent clamp) when a block would merge more than half its tokens."""
    T = num_patches
    for i, r in enumerate(sched):
        if r > T // 2:
            raise ConfigError(f"ToMe r={r} in block {i} exceeds the {T // 2} tokens mergeable there "
                              f"({T} tokens left); lower r or give a per-block list / (r, inflection)")
        T -= r


@dataclass
class MatchPlan:
    """Which token goes where: group (B, T) output slot of every non-prefix token; num_groups = T - r.

    Eager plans also name the tokens by slot, for `merge_into_partners`: primary (B, T - r) the token that
    opens each output slot (the unmerged A tokens, then every B token), src (B, r) the merged A tokens and dst
    (B, r) the slot each joins.
    """

    group: Tensor
    num_groups: int
    primary: Optional[Tensor] = None
    src: Optional[Tensor] = None
    dst: Optional[Tensor] = None


# The lean plan and inference merge pay off from this many images on (DeiT-S r=13, 2 threads, against the sorted
# plan and the generic merge in one process: batch 1 4.7 % slower, batch 4 level, batch 8 1.8 % faster).
LEAN_MIN_BATCH = 4


@torch.no_grad()
def bipartite_plan(keys: Tensor, r: int, num_prefix: int) -> MatchPlan:
    """ToMe's bipartite soft matching on keys (B, P+T, d) (prefix tokens excluded) -> MatchPlan.

    A = non-prefix tokens at even positions of the full sequence, B = odd positions (the authors' split). The r
    A tokens with the most similar partner merge (ties: the earlier token, a stable sort). Where reading a value
    costs no device sync (eager CPU), the r best come from a top-k (sorted only in images where the r-th best
    ties the next) and only their partners are looked up: the same plan, a fraction of the work. Below
    LEAN_MIN_BATCH images its extra small operations cost more than they save, so the sorted plan runs.
    """
    B, L, _ = keys.shape
    T, P = L - num_prefix, num_prefix
    dev = keys.device
    metric = keys[:, P:].float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    # token t sits at position P + t: even positions start at t = P % 2 (strided slices: views, static shapes)
    a0, b0 = P % 2, (P + 1) % 2
    scores = metric[:, a0::2] @ metric[:, b0::2].transpose(1, 2)  # (B, Na, Nb)
    Na, n_b = scores.shape[1], scores.shape[2]
    n_unm = Na - r
    group = torch.empty(B, T, dtype=torch.long, device=dev)
    slot_a = group[:, a0::2]  # (B, Na) view: output slot of each A token, written in place
    group[:, b0::2] = torch.arange(n_unm, n_unm + n_b, device=dev)
    if 0 < r < Na and B >= LEAN_MIN_BATCH and may_sync(keys):
        node_max = scores.amax(dim=-1)  # (B, Na)
        best, src = node_max.topk(r + 1, dim=1)
        src = src[:, :r]  # the stable sort's set where the r-th best beats the next; else sort that image
        strict = best[:, r - 1] > best[:, r]
        if not bool(strict.all()):
            tied = (~strict).nonzero().squeeze(1)
            src[tied] = argsort_desc(node_max[tied])[:, :r]
        dst = n_unm + gather_tokens(scores, src).argmax(dim=-1)  # (B, r) = max(dim=-1).indices: the first maximum
        kept = torch.ones(B, Na, dtype=torch.bool, device=dev).scatter_(1, src, False)  # unmerged A tokens
        slot_a.copy_(kept.cumsum(dim=1) - 1).scatter_(1, src, dst)  # unmerged A tokens in order
        unm = kept.nonzero()[:, 1].view(B, n_unm)  # (B, n_unm) ascending A positions
        primary = torch.cat([a0 + 2 * unm, torch.arange(b0, T, 2, device=dev).expand(B, n_b)], dim=1)
        return MatchPlan(group, n_unm + n_b, primary, a0 + 2 * src, dst)
    node_max, node_idx = scores.max(dim=-1)  # (B, Na)
    order = argsort_desc(node_max)  # (B, Na), stable: ties keep the earlier token first
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values  # A positions
    slot_a.scatter_(1, unm, torch.arange(n_unm, device=dev).expand(B, n_unm))
    slot_a.scatter_(1, src, n_unm + torch.gather(node_idx, 1, src))
    return MatchPlan(group, n_unm + n_b)


def merge_by_size(state: TokenState, group: Tensor, num_groups: int) -> TokenState:
    """`merge_tokens(state, group, state.patch_sizes(), num_groups, normalize=True)` for a group map that drops
    no token (ToMe's), in fewer operations: no spill slot, one scatter for the group totals (they are the new
    sizes), and in inference the means are written straight into the output tensor (no concatenation).
    The same sums in the same order, so the result is bit for bit merge_tokens'.
    """
    P, x = state.num_prefix, state.x
    B, T, C, G = x.shape[0], state.num_tokens, x.shape[2], num_groups
    sizes = state.patch_sizes()  # (B, T) float32
    w = sizes.to(x.dtype)
    flat = (group + torch.arange(B, device=x.device).unsqueeze(1) * G).reshape(-1)
    summed = x.new_zeros(B * G, C).index_add_(0, flat, (x[:, P:] * w.unsqueeze(-1)).reshape(B * T, C))
    new_sizes = sizes.new_zeros(B, G).scatter_add_(1, group, sizes)  # (B, G)
    total = new_sizes if w.dtype == sizes.dtype else x.new_zeros(B, G).scatter_add_(1, group, w)
    denom = total.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or denom.requires_grad)):
        state.x = torch.cat([x[:, :P], summed.view(B, G, C) / denom], dim=1)
    else:  # out= has no autograd, and dynamo takes no strided out=
        out = x.new_empty(B, P + G, C)
        out[:, :P] = x[:, :P]
        torch.div(summed.view(B, G, C), denom, out=out[:, P:])
        state.x = out
    prefix_sizes = x.new_ones(B, P, 1, dtype=sizes.dtype) if state.sizes is None else state.sizes[:, :P]
    state.sizes = torch.cat([prefix_sizes, new_sizes.unsqueeze(-1)], dim=1)
    state.patch_to_token = remap_patches(state.patch_to_token, group)
    return state


@torch.no_grad()
def merge_into_partners(state: TokenState, plan: MatchPlan) -> TokenState:
    """ToMe's size-weighted merge (inference, a plan with `primary`): each output slot starts as a copy of its
    primary token and only the r slots that receive a merged token are recomputed, as
    (x_dst s_dst + sum x_src s_src) / (s_dst + sum s_src). The value of `merge_by_size` up to rounding (the
    authors' order of the sum: the slot's own token first); tokens that merge with nothing pass bit for bit.
    """
    P, x = state.num_prefix, state.x
    B, C, G, r = x.shape[0], x.shape[2], plan.num_groups, plan.src.shape[1]
    dev = x.device
    sizes = state.patch_sizes()  # (B, T) float32
    offset = torch.arange(B, device=dev).unsqueeze(1)
    opening = torch.cat([torch.arange(P, device=dev).expand(B, P), plan.primary + P], dim=1)  # (B, P + G)
    out = gather_tokens(x, opening)  # (B, P + G, C): prefix, then each slot's primary token
    own = torch.gather(sizes, 1, plan.primary)  # (B, G) size of each slot's primary token
    w_src = torch.gather(sizes, 1, plan.src)  # (B, r)
    new_sizes = own.scatter_add(1, plan.dst, w_src)
    slots, inverse = torch.unique(plan.dst + offset * G, return_inverse=True)  # (U,) receiving slots, flat
    flat = out.view(B * (P + G), C)
    rows_out = slots // G * (P + G) + P + slots % G  # those slots as rows of out
    numer = flat.index_select(0, rows_out) * own.view(-1)[slots].unsqueeze(-1).to(x.dtype)  # (U, C)
    x_src = gather_tokens(x, plan.src + P).reshape(B * r, C)  # the merged tokens, (B r, C)
    numer.index_add_(0, inverse.view(-1), x_src * w_src.view(-1, 1).to(x.dtype))
    flat.index_copy_(0, rows_out, numer / new_sizes.view(-1)[slots].unsqueeze(-1).to(x.dtype))
    prefix_sizes = x.new_ones(B, P, 1, dtype=sizes.dtype) if state.sizes is None else state.sizes[:, :P]
    state.x = out
    state.sizes = torch.cat([prefix_sizes, new_sizes.unsqueeze(-1)], dim=1)
    state.patch_to_token = remap_patches(state.patch_to_token, plan.group)
    return state


class ToMeReducer(TokenReducer):
    name = "tome"
    keep_rate_hint = "ToMe merges r tokens per block: change it with model.reducer.set_r(r)"

    def __init__(self, r: RSpec, depth: int, num_patches: int, prop_attn: bool = True):
        self.depth, self.num_patches, self.prop_attn = depth, num_patches, bool(prop_attn)
        self.set_r(r)

    def set_r(self, r: RSpec) -> None:
        """Change the merge schedule (int, per-block list or (r, inflection))."""
        sched = parse_r(r, self.depth)
        check_schedule(sched, self.num_patches)
        self.r, self.schedule = r, sched

    def attention_args(self, i: int, state: TokenState) -> dict:
        kw = {"need_keys": self.schedule[i] > 0}
        if self.prop_attn and state.sizes is not None:
            kw["attn_bias"] = state.sizes.log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, P+T)
        return kw

    def after_attention(self, model: nn.Module, i: int, state: TokenState, cls_attn: Optional[Tensor],
                        keys: Optional[Tensor]) -> TokenState:
        r = self.schedule[i]
        if r <= 0:
            return state
        plan = bipartite_plan(keys, r, state.num_prefix)
        if plan.primary is not None and not (torch.is_grad_enabled() and state.x.requires_grad):
            state = merge_into_partners(state, plan)  # inference: only the r receiving slots are recomputed
        else:
            state = merge_by_size(state, plan.group, plan.num_groups)  # = merge_tokens(..., sizes, normalize=True)
        state.record_stage()
        return state

    def extra_repr(self) -> str:
        return f"r={self.r!r}, prop_attn={self.prop_attn}"


RECIPE = Recipe("tome", "ToMe fine-tune (off the shelf needs no training: use `dynavit eval`): the EViT/BAT fine-tune "
                "hyperparameters with a fixed r", epochs=30, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0,
                weight_decay=1e-6)


@register_method("tome", params=("r", "prop_attn"), families=("vit",), recipe=RECIPE,
                 attention_extras=("need_keys", "attn_bias"), identity={"r": 0})
def apply_tome(model: nn.Module, r: RSpec = 8, prop_attn: bool = True) -> nn.Module:
    """ToMe: merge r tokens per block by bipartite soft matching on the keys (training-free).

    Args:
        r: tokens merged per block: an int, a per-block list, or (r, inflection) (ToMe's schedule).
        prop_attn: proportional attention (add log(size) to the attention logits).
    """
    model.reducer = ToMeReducer(r, len(model.blocks), model.num_patches, prop_attn)
    return model
