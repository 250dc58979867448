"""DynamicViT (Rao et al., NeurIPS 2021): learned, hierarchical token pruning (METHODS section 3).

A prediction module before each pruning location scores every patch token from its own feature and a masked
global mean (Sec. 3.1). At inference the top `int(N * rho_s)` tokens are gathered, so later blocks compute on
fewer tokens (Sec. 3.2). While training nothing is removed: straight-through Gumbel-softmax decisions,
multiplied stage by stage, become the attention policy every later block masks with (Sec. 3.3), and forward
returns what `dynavit.losses.DynamicViTLoss` needs. The predictors are registered on the model as
`model.score_predictor` so the authors' checkpoints (`score_predictor.{s}.in_conv.*` / `.out_conv.*`) load
strictly. An optional `keep_mode="threshold"` keeps per image the tokens with keep probability > 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, check_keep_rate
from ..reduction import TokenReducer
from ..registry import register_method
from ..tokens import TokenState, select_tokens

KEEP_MODES = ("topk", "threshold")
_POLICY_EPS = 1e-6  # guards the masked global mean when every token of an image was dropped (upstream 0/0 NaN)


# ---------------------------------------------------------------------------------------------- prediction
class ScorePredictor(nn.Module):
    """The authors' `PredictorLG`: (B, T, C) tokens -> (B, T, 2) log-probabilities, index 0 = keep (Sec. 3.1).

    Local half of the features per token, global half averaged over the tokens still kept (`policy`).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))
        for m in self.modules():  # the authors' init (timm's ViT init)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, policy: Optional[Tensor] = None) -> Tensor:
        """x (B, T, C), policy (B, T, 1) keep mask or None (= all kept) -> log p (B, T, 2)."""
        z = self.in_conv(x)  # (B, T, C)
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        if policy is None:
            glob = glob.mean(dim=1, keepdim=True)  # (B, 1, C - C/2)
        else:
            total = policy.sum(dim=1, keepdim=True).clamp_min(_POLICY_EPS)
            glob = (glob * policy).sum(dim=1, keepdim=True) / total
        # out_conv[0](cat[local, global expanded over T]) with the weight split in two: the global half is one
        # row per image, so it costs (B, 1, C/2) instead of (B, T, C/2) and the (B, T, C) concatenation is never made
        first = self.out_conv[0]
        h = F.linear(local, first.weight[:, :half], first.bias) + F.linear(glob, first.weight[:, half:])  # (B, T, C/2)
        return self.out_conv[1:](h)


# ---------------------------------------------------------------------------------------------- plans
def keep_counts(num_patches: int, keep_ratios: Sequence[float]) -> list[int]:
    """Tokens kept per stage at inference: int(N * rho_s) of the *initial* N (Sec. 3.2)."""
    return [int(num_patches * r) for r in keep_ratios]


def topk_keep_index(keep_logp: Tensor, k: int) -> Tensor:
    """keep log-probs (B, T) -> indices (B, k) of the k highest, in descending score order."""
    return keep_logp.topk(k, dim=1, sorted=True).indices


def threshold_keep_plan(logp: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image keep set {p_keep > 0.5} (among valid tokens): logp (B, T, 2) -> (index (B, k_max), counts (B,)).

    The best-scoring valid token is always kept, so no image loses every token (LV-ViT's max over tokens and
    the predictors' global mean need one). Each image's kept tokens come first in descending score; the rest
    of its k_max slots are padding.
    """
    score = logp[..., 0]  # (B, T)
    keep = score > logp[..., 1]  # p_keep > 0.5
    if valid is not None:
        keep = keep & valid
        score = score.masked_fill(~valid, float("-inf"))
    keep = keep.scatter(1, score.argmax(dim=1, keepdim=True), True)
    counts = keep.sum(dim=1)  # (B,)
    k_max = int(counts.max())  # one host sync per stage
    key = score.masked_fill(~keep, float("-inf"))
    return key.topk(k_max, dim=1, sorted=True).indices, counts


def sample_decisions(logp: Tensor, prev: Optional[Tensor]) -> Tensor:
    """Straight-through hard Gumbel-softmax keep decisions (B, T) from logp (B, T, 2), times the previous ones.

    Called through `F.gumbel_softmax` (the module attribute) so tests can substitute a noiseless version.
    """
    decision = F.gumbel_softmax(logp, hard=True)[..., 0]
    return decision if prev is None else decision * prev


# ---------------------------------------------------------------------------------------------- config
def default_locations(depth: int, num_stages: int = 3) -> list[int]:
    """Blocks before which predictors run: depth * s / (S + 1) for s = 1..S, rounded down.

    Gives the authors' [3, 6, 9] at depth 12, [4, 8, 12] at 16 (LV-ViT-S), [5, 10, 15] at 20 (LV-ViT-M).
    """
    locs = [depth * s // (num_stages + 1) for s in range(1, num_stages + 1)]
    if depth < num_stages + 1 or len(set(locs)) != len(locs) or locs[0] < 1:
        raise ConfigError(f"no default DynamicViT prune_locations for depth {depth} with {num_stages} stages; "
                          f"pass prune_locations explicitly (a list of increasing block indices in [0, {depth}))")
    return locs


def parse_keep_ratios(keep_rate: Union[float, Sequence[float]], num_stages: Optional[int]) -> list[float]:
    """A base rate rho -> [rho, rho^2, ...] (cumulative fractions of N); or an explicit non-increasing list."""
    if isinstance(keep_rate, (list, tuple)):
        if len(keep_rate) == 0:
            raise ConfigError("keep_rate list must not be empty; give one keep ratio per pruning stage")
        ratios = [check_keep_rate(r, "keep_rate") for r in keep_rate]
        if any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ConfigError(f"keep_rate list {list(keep_rate)} must be non-increasing: each stage keeps a fraction "
                              f"of the initial tokens and can only prune further")
        if num_stages is not None and len(ratios) != num_stages:
            raise ConfigError(f"keep_rate list {list(keep_rate)} has {len(ratios)} ratios but there are "
                              f"{num_stages} prune_locations")
        return ratios
    rho = check_keep_rate(keep_rate)
    return [rho ** (s + 1) for s in range(3 if num_stages is None else num_stages)]


def check_locations(prune_locations, depth: int) -> list[int]:
    try:
        locs = list(prune_locations)
    except TypeError:
        raise ConfigError(f"prune_locations must be a list of block indices, got {prune_locations!r}") from None
    ok = (len(locs) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in locs)
          and all(0 <= i < depth for i in locs) and all(a < b for a, b in zip(locs, locs[1:])))
    if not ok:
        raise ConfigError(f"prune_locations must be a non-empty, strictly increasing list of block indices in "
                          f"[0, {depth}), got {prune_locations!r}")
    return locs


@dataclass
class DynamicViTOutput:
    """What the training-mode forward returns (the inputs of `DynamicViTLoss`)."""

    logits: Tensor  # (B, classes); for LV-ViT the class-token head only, as the authors' distillation loss uses
    tokens: Tensor  # (B, N, C) final-norm patch tokens (nothing is removed while training)
    mask: Tensor  # (B, N) last-stage keep decision, detached
    decisions: list = field(default_factory=list)  # per stage (B, N) straight-through decisions (with gradient)
    aux_logits: Optional[Tensor] = None  # (B, N, classes) LV-ViT per-token aux_head scores (token KL loss)


# ---------------------------------------------------------------------------------------------- reducer
class DynamicViT(TokenReducer):
    """Hyperparameters and hooks of DynamicViT; the predictors live on the model (`model.score_predictor`)."""

    name = "dynamicvit"

    def __init__(self, num_patches: int, depth: int, keep_rate: Union[float, Sequence[float]] = 0.7,
                 prune_locations: Optional[Sequence[int]] = None, keep_mode: str = "topk",
                 early_policy: bool = False):
        if keep_mode not in KEEP_MODES:
            raise ConfigError(f"keep_mode must be one of {list(KEEP_MODES)}, got {keep_mode!r}")
        self.num_patches = num_patches  # N from the patch grid (the authors hard-coded 196)
        self.keep_mode = keep_mode
        self.early_policy = bool(early_policy)  # training: all-ones policy before the first predictor (authors')
        if prune_locations is None:
            stages = len(keep_rate) if isinstance(keep_rate, (list, tuple)) and keep_rate else 3
            self.locations = default_locations(depth, stages)
        else:
            self.locations = check_locations(prune_locations, depth)
        self._stage_of = {loc: s for s, loc in enumerate(self.locations)}
        self.set_keep_rate(keep_rate)

    def set_keep_rate(self, keep_rate: Union[float, Sequence[float]]) -> None:
        """Set rho (ratios [rho, rho^2, ...]) or an explicit list of cumulative keep ratios, one per stage."""
        ratios = parse_keep_ratios(keep_rate, len(self.locations))
        counts = keep_counts(self.num_patches, ratios)
        if min(counts) < 1:
            raise ConfigError(f"keep_rate {keep_rate!r} keeps {counts} of {self.num_patches} tokens per stage; "
                              f"every stage must keep at least one token")
        self.keep_ratios, self.keep_counts = ratios, counts

    # ------------------------------------------------------------------ hooks
    def before_block(self, model: nn.Module, i: int, state: TokenState) -> TokenState:
        if i == 0 and model.training and self.early_policy:
            # the authors' training forward starts from an all-ones policy, so the blocks before the first
            # predictor also run the eps-smoothed masked softmax (a 1e-6-level difference from a plain softmax)
            state.policy = state.x.new_ones(state.x.shape[0], state.x.shape[1])
        s = self._stage_of.get(i)
        if s is None:
            return state
        predictor = model.score_predictor[s]
        patches = state.x[:, state.num_prefix:]  # (B, T, C)
        if model.training:
            return self._train_stage(predictor, patches, state)
        if self.keep_mode == "threshold":
            return self._threshold_stage(predictor, patches, state)
        logp = predictor(patches)  # all current tokens are kept ones: plain mean
        state = select_tokens(state, topk_keep_index(logp[..., 0], self.keep_counts[s]))
        self._record(state, logp)
        return state

    def _train_stage(self, predictor: nn.Module, patches: Tensor, state: TokenState) -> TokenState:
        prev = state.aux.get("decision")  # (B, N) or None before the first stage
        logp = predictor(patches, None if prev is None else prev.unsqueeze(-1))
        decision = sample_decisions(logp, prev)  # (B, N)
        state.aux["decision"] = decision
        state.aux.setdefault("decisions", []).append(decision)
        prefix = decision.new_ones(decision.shape[0], state.num_prefix)
        state.policy = torch.cat([prefix, decision], dim=1)  # (B, P+N): every later block masks with it
        if state.info is not None:
            p2t = state.patch_to_token
            kept = decision.detach() > 0.5
            state.patch_to_token = torch.where(kept, p2t, torch.full_like(p2t, -1))
            self._record(state, logp)
        return state

    def _threshold_stage(self, predictor: nn.Module, patches: Tensor, state: TokenState) -> TokenState:
        valid = state.aux.get("valid")  # (B, T) False for padding, or None
        logp = predictor(patches, None if valid is None else valid.unsqueeze(-1).to(patches.dtype))
        index, counts = threshold_keep_plan(logp, valid)
        state = select_tokens(state, index)
        k = index.shape[1]
        valid = torch.arange(k, device=index.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, k)
        p2t = state.patch_to_token
        state.patch_to_token = torch.where(p2t >= counts.unsqueeze(1), torch.full_like(p2t, -1), p2t)
        if bool(valid.all()):
            state.aux["valid"], state.aux["attn_bias"] = None, None
        else:
            full = torch.cat([valid.new_ones(valid.shape[0], state.num_prefix), valid], dim=1)
            bias = torch.zeros(full.shape, dtype=state.x.dtype, device=full.device)
            state.aux["attn_bias"] = bias.masked_fill_(~full, float("-inf"))[:, None, None, :]  # (B, 1, 1, P+k)
            state.aux["valid"] = valid
        self._record(state, logp)
        if state.info is not None:
            state.info.extra.setdefault("kept_per_image", []).append(counts)
        return state

    def _record(self, state: TokenState, logp: Tensor) -> None:
        if state.info is not None:
            state.record_stage()
            state.info.extra.setdefault("keep_logp", []).append(logp[..., 0].detach())

    def attention_args(self, i: int, state: TokenState) -> dict:
        bias = state.aux.get("attn_bias")
        return {} if bias is None else {"attn_bias": bias}

    def finalize(self, model: nn.Module, state: TokenState, logits):
        P = state.num_prefix
        aux_head = getattr(model, "aux_head", None)
        if model.training and "decisions" in state.aux:
            tokens = state.x[:, P:]  # (B, N, C)
            aux_logits = None
            if aux_head is not None:  # LV-ViT: class head alone, per-token aux scores for the token KL
                logits, aux_logits = model.head(state.x[:, 0]), aux_head(tokens)
            decisions = state.aux["decisions"]
            return DynamicViTOutput(logits, tokens, decisions[-1].detach(), decisions, aux_logits)
        valid = state.aux.get("valid")
        if aux_head is not None and valid is not None:  # padding must not win LV-ViT's max over tokens
            aux = aux_head(state.x[:, P:]).masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
            logits = model.head(state.x[:, 0]) + model.aux_weight * aux
        return logits

    def extra_repr(self) -> str:
        ratios = [round(r, 4) for r in self.keep_ratios]
        return (f"keep_ratios={ratios}, keep_counts={self.keep_counts}, locations={self.locations}, "
                f"keep_mode={self.keep_mode!r}" + (", early_policy=True" if self.early_policy else ""))


@register_method("dynamicvit", params=("keep_rate", "prune_locations", "keep_mode", "early_policy"),
                 families=("vit",))
def apply_dynamicvit(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
                     prune_locations: Optional[Sequence[int]] = None, keep_mode: str = "topk",
                     early_policy: bool = False) -> nn.Module:
    """DynamicViT: learned prediction modules prune tokens hierarchically (keep ratios rho, rho^2, rho^3).

    Args:
        keep_rate: base rate rho in (0, 1], or an explicit non-increasing list of cumulative ratios per stage.
        prune_locations: blocks before which predictors run (default: [3, 6, 9] at depth 12, [4, 8, 12] at 16,
            [5, 10, 15] at 20; in general depth * s / (S + 1)).
        keep_mode: 'topk' (the authors': int(N * ratio) tokens per image) or 'threshold' (per image, the tokens
            with keep probability > 0.5, padded per batch with an attention mask).
        early_policy: training only: the blocks before the first predictor also run the eps-smoothed masked
            softmax with an all-ones policy, as the authors' training forward does (docs/dynamicvit.md).
    """
    reducer = DynamicViT(model.num_patches, len(model.blocks), keep_rate, prune_locations, keep_mode, early_policy)
    ref = next(model.parameters())
    model.score_predictor = nn.ModuleList(ScorePredictor(model.embed_dim) for _ in reducer.locations).to(
        device=ref.device, dtype=ref.dtype)
    model.reducer = reducer
    return model
