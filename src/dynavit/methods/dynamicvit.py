"""DynamicViT (Rao et al., NeurIPS 2021): learned, hierarchical token pruning (docs/methods.md section 3).

The whole method is this file: the prediction modules, the pruning plan, the masked attention of training, the
loss with its dense teacher, the recipe, and the registration that tells dynavit's generic code about them.

A prediction module before each pruning location scores every patch token from its own feature and a masked
global mean (Sec. 3.1). At inference the top `int(N * rho_s)` tokens are gathered, so later blocks compute on
fewer tokens (Sec. 3.2). While training nothing is removed: straight-through Gumbel-softmax decisions,
multiplied stage by stage, become the policy every later block's attention masks with (Sec. 3.3; it reaches
the block as the reducer's `attend` attention argument), and forward returns what `DynamicViTLoss` needs. The
predictors are registered on the model as `model.score_predictor` so the authors' checkpoints
(`score_predictor.{s}.in_conv.*` / `.out_conv.*`) load strictly. An optional `keep_mode="threshold"` keeps per
image the tokens with keep probability > 0.5. docs/dynamicvit.md lists what matches the authors and what not.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, check_keep_rate
from ..layers import init_trunc_normal
from ..losses import classification_loss, logit_distillation, per_token_kl
from ..recipes import Recipe
from ..reduction import TokenReducer
from ..registry import register_method, remove_method
from ..tokens import TokenState, select_tokens
from ._common import check_locations, stage_locations

KEEP_MODES = ("topk", "threshold")
TOKEN_LOSSES = ("mse", "kl")
_POLICY_EPS = 1e-6  # guards the masked global mean when every token of an image was dropped (upstream 0/0 NaN)


# ---------------------------------------------------------------------------------------------- prediction
class ScorePredictor(nn.Module):
    """The authors' `PredictorLG`: (B, T, C) tokens -> (B, T, 2) log-probabilities, index 0 = keep (Sec. 3.1).

    LN -> linear -> GELU; the local half of the features per token, the global half averaged over the tokens still
    kept (`policy`; all of them when None); then C -> C/2 -> C/4 -> 2 with GELUs and a log-softmax. DynamicCNN /
    DynamicSwin reuse it on stage-3 positions (always the plain mean): `conv=True` holds the layers as 1x1 Conv2d
    (ConvNeXt's keys; its LayerNorm eps 1e-6), else as Linear (DynamicViT, Swin; eps 1e-5). Both compute on
    channels-last tokens.
    """

    def __init__(self, dim: int, conv: bool = False):
        super().__init__()

        def lin(i: int, o: int) -> nn.Module:
            return nn.Conv2d(i, o, 1) if conv else nn.Linear(i, o)

        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=1e-6 if conv else 1e-5), lin(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(lin(dim, dim // 2), nn.GELU(), lin(dim // 2, dim // 4), nn.GELU(),
                                      lin(dim // 4, 2), nn.LogSoftmax(dim=-1))
        for m in self.modules():  # the authors' init (timm's ViT init)
            init_trunc_normal(m, convs=True)

    @staticmethod
    def _w(m: nn.Module) -> Tensor:
        return m.weight.flatten(1)  # (out, in, 1, 1) 1x1 conv or (out, in) Linear -> (out, in)

    def forward(self, x: Tensor, policy: Optional[Tensor] = None) -> Tensor:
        """x (B, T, C), policy (B, T, 1) keep mask or None (= all kept) -> log p (B, T, 2)."""
        ln, first = self.in_conv[0], self.in_conv[1]
        z = F.gelu(F.linear(ln(x), self._w(first), first.bias))  # (B, T, C)
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        if policy is None:
            glob = glob.mean(dim=1, keepdim=True)  # (B, 1, C - C/2)
        else:
            total = policy.sum(dim=1, keepdim=True).clamp_min(_POLICY_EPS)
            glob = (glob * policy).sum(dim=1, keepdim=True) / total
        # out_conv[0](cat[local, global expanded over T]) with the weight split in two: the global half is one
        # row per image, so it costs (B, 1, C/2) instead of (B, T, C/2) and the (B, T, C) concatenation is never made
        m0, m2, m4 = self.out_conv[0], self.out_conv[2], self.out_conv[4]
        w0 = self._w(m0)
        h = F.gelu(F.linear(local, w0[:, :half], m0.bias) + F.linear(glob, w0[:, half:]))  # (B, T, C/2)
        h = F.gelu(F.linear(h, self._w(m2), m2.bias))
        return F.linear(h, self._w(m4), m4.bias).log_softmax(dim=-1)


PREDICTOR_BIASES = ("zero", "keep_ratio")


def stage_keep_ratios(keep_ratios: Sequence[float]) -> list[float]:
    """Cumulative keep ratios [rho_1, rho_2, ...] -> each stage's ratio given the previous: rho_s / rho_{s-1}."""
    return [r / prev for r, prev in zip(keep_ratios, [1.0, *keep_ratios[:-1]])]


@torch.no_grad()
def init_keep_bias(predictor: ScorePredictor, keep_ratio: float) -> None:
    """Set the predictor's last bias to log [r, 1 - r], so a fresh predictor keeps a token with probability r."""
    r = min(max(float(keep_ratio), 1e-4), 1 - 1e-4)
    bias = predictor.out_conv[4].bias
    bias.copy_(torch.tensor([math.log(r), math.log(1 - r)], dtype=bias.dtype))


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
    return list(stage_locations(depth, num_stages))


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


# ---------------------------------------------------------------------------------------------- masked attention
def softmax_with_policy(attn: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax (docs/methods.md 3.3), the authors' explicit formula. attn (B, H, T, T), policy (B, T).

        G_ij = D_j (i != j), G_ii = 1;   A_ij = exp(s_ij - max_j s_ij) G_ij;   P_ij = (A_ij + eps/T) / (sum_j A_ij + eps)

    Computed in float32. This is the reference the tests compare `policy_attention` (what training runs) with.
    """
    B, T = policy.shape
    key_policy = policy.reshape(B, 1, 1, T)
    eye = torch.eye(T, dtype=key_policy.dtype, device=policy.device).view(1, 1, T, T)
    key_policy = key_policy + (1.0 - key_policy) * eye  # G_ij = D_j, G_ii = 1
    attn = attn - attn.max(dim=-1, keepdim=True)[0]
    attn = attn.float().exp() * key_policy.float()
    attn = (attn + eps / T) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn


class _PolicyAttention(torch.autograd.Function):
    """softmax_with_policy(scale q k^T, D) @ v with a hand-written backward (training, docs/methods.md 3.3).

    The formula is rewritten around the plain softmax p = softmax(s) = exp(s - m) / L (m_i = max_j s_ij, so
    L_i = sum_j exp(s_ij - m_i) = 1 / max_j p_ij). Dividing the authors' numerator and denominator by L_i:

        P_ij = (p_ij G_ij + e_i / T) / z_i,   z_i = sum_j p_ij G_ij + e_i,   e_i = eps / L_i = eps * max_j p_ij

    so their eps term (relative to exp(s - m), the shift by the max over *all* keys) is kept exactly. P is never
    materialised: with G_ij = D_j + (1 - D_j) [i = j], the policy is folded into the values,

        out_i = (sum_j p_ij D_j v_j + p_ii (1 - D_i) v_i + e_i / T sum_j v_j) / z_i,

    one product p @ [D v, D] giving the numerator and z together. The backward is the exact gradient of the same
    formula, the policy's included (through it the predictors learn from attention), and the max's (non-zero
    through eps). Per block this makes two (B H, T, T) tensors (p, kept for backward, and the score gradient)
    where autograd through the explicit formula makes about fifteen.
    Shapes: q, k, v (B, H, T, d); policy (B, T); out (B, H, T, d). Computed in float32 (float64 if given).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float, eps: float) -> Tensor:
        B, H, T, d = q.shape
        dt = torch.promote_types(q.dtype, torch.float32)
        q3, k3 = q.to(dt).reshape(B * H, T, d), k.to(dt).reshape(B * H, T, d)
        key = policy.to(dt).reshape(B, 1, T, 1).expand(B, H, T, 1).reshape(B * H, T, 1)  # D_j
        v1 = torch.cat([v.to(dt), v.new_ones(B, H, T, 1, dtype=dt)], dim=-1).view(B * H, T, d + 1)  # [v_j, 1]
        v3, vk = v1[..., :d], v1 * key  # v_j;  D_j [v_j, 1]
        s = torch.baddbmm(q3.new_empty(1, 1, 1), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)  # (BH, T, T)
        p = s.softmax(dim=-1)
        del s
        # max_j p_ij = 1 / L_i and its position (where m_i sits): one vectorised pass (argmax alone is slower)
        p_max, argmax = F.adaptive_max_pool1d(p, 1, return_indices=True)  # (BH, T, 1) each
        e = eps * p_max  # eps / L_i
        p_diag = p.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # (BH, T, 1)
        self_loop = p_diag * (1.0 - key)  # p_ii (G_ii - D_i)
        yz = torch.bmm(p, vk)  # sum_j p_ij D_j [v_j, 1]  (BH, T, d + 1)
        z = yz[..., d:] + self_loop + e  # (BH, T, 1)
        num = torch.addcmul(yz[..., :d], self_loop, v3).addcmul_(e / T, v3.sum(dim=1, keepdim=True))
        # out (B, H, T, d), stored as (B, T, H, d) like fused attention's, so merging the heads is a view
        out = torch.div(num.view(B, H, T, d), z.view(B, H, T, 1), out=num.new_empty(B, T, H, d).transpose(1, 2))
        ctx.save_for_backward(q3, k3, v1, vk, key, p, argmax, e, z, out)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype, policy.dtype)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q3, k3, v1, vk, key, p, argmax, e, z, out = ctx.saved_tensors
        B, H, T, d = grad_out.shape
        v3 = v1[..., :d]
        # lhs = [w, -dz]: w_i = dO_i / z_i, dz_i = (dO_i . out_i) / z_i  (BH, T, d + 1)
        lhs = out.new_empty(B, H, T, d + 1)
        w4 = torch.div(grad_out.to(out.dtype), z.view(B, H, T, 1), out=lhs[..., :d])
        torch.sum(w4 * out, dim=-1, out=lhs[..., d]).neg_()
        lhs = lhs.view(B * H, T, d + 1)
        w = lhs[..., :d]
        # dA_ij = (dO_i . v_j - dO_i . out_i) / z_i, gradient of A_ij = p_ij G_ij: first dA_ij G_ij, in one product
        grad_s = torch.bmm(lhs, vk.transpose(1, 2))  # (BH, T, T)
        da_diag = (w * v3).sum(dim=-1) + lhs[..., d]  # dA_ii (G_ii = 1)  (BH, T)
        grad_s.diagonal(dim1=1, dim2=2).copy_(da_diag)
        grad_s.mul_(p)  # ds_ij = dA_ij G_ij p_ij, through exp(s_ij - m_i)
        # through m_i: -sum_j ds_ij = e_i (w_i . mean_j v_j - dz_i), to the argmax (as torch.max's backward)
        dm = e * (torch.bmm(w, v3.mean(dim=1, keepdim=True).transpose(1, 2)) + lhs[..., d:])
        grad_s.scatter_add_(-1, argmax, dm)
        dq = torch.bmm(grad_s, k3).mul_(ctx.scale)
        dk = torch.bmm(grad_s.transpose(1, 2), q3).mul_(ctx.scale)
        # p^T [w, -dz]: per key j, sum_i p_ij w_i (for dv) and -sum_i p_ij dz_i (for the policy)  (BH, T, d + 1)
        r = torch.bmm(p.transpose(1, 2), lhs)
        p_diag = p.diagonal(dim1=1, dim2=2).unsqueeze(-1)
        # dv_j = sum_i P_ij dO_i = D_j sum_i p_ij w_i + p_jj (1 - D_j) w_j + sum_i (e_i / T) w_i
        dv = torch.addcmul(torch.bmm(e.transpose(1, 2), w).div_(T), r[..., :d], key).addcmul_(p_diag * (1.0 - key), w)
        # dD_j = sum_{h, i != j} dA_ij p_ij  (G_ij = D_j off the diagonal only)
        dpolicy = (r[..., :d] * v3).sum(dim=-1) + r[..., d] - da_diag * p_diag[..., 0]  # (BH, T)
        grads = (dq, dk, dv, dpolicy.view(B, H, T).sum(dim=1))
        shapes = ((B, H, T, d),) * 3 + ((B, T),)
        return (*(gr.view(sh).to(dt) for gr, sh, dt in zip(grads, shapes, ctx.dtypes)), None, None)


def policy_attention(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked attention: softmax_with_policy(scale q k^T, policy) @ v, same values and gradients.

    q, k, v (B, H, T, d), policy (B, T) -> (B, H, T, d). See `_PolicyAttention` for how it is computed.
    Under autocast (mixed-precision training) it still computes in float32 and returns v's dtype: autocast
    would cast its forward products to bf16 / fp16 while the backward, run outside autocast, met float32.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _PolicyAttention.apply(q, k, v, policy, scale, eps)


@dataclass(frozen=True, eq=False)
class PolicyAttend:
    """The `attend` attention argument of a policy (B, P+N): attend(q, k, v, scale) = policy_attention(...)."""

    policy: Tensor

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return policy_attention(q, k, v, self.policy, scale)


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
            self.locations = list(check_locations(prune_locations, depth, "prune_locations"))
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
            state.aux["policy"] = state.x.new_ones(state.x.shape[0], state.x.shape[1])
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
        state.aux["policy"] = torch.cat([prefix, decision], dim=1)  # (B, P+N): every later block masks with it
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
        policy = state.aux.get("policy")
        if policy is not None:  # training, after the first stage: the masked softmax of Sec. 3.3
            return {"attend": PolicyAttend(policy)}
        bias = state.aux.get("attn_bias")  # threshold mode: padding slots masked out
        return {} if bias is None else {"attn_bias": bias}

    def finalize(self, model: nn.Module, state: TokenState, logits):
        if model.training and "decisions" in state.aux:
            cls_logits, aux_logits = model.forward_head(state.x, per_token=True)
            if aux_logits is not None:  # LV-ViT: class head alone, per-token aux scores for the token KL
                logits = cls_logits
            decisions = state.aux["decisions"]
            return DynamicViTOutput(logits, state.x[:, state.num_prefix:], decisions[-1].detach(), decisions,
                                    aux_logits)
        valid = state.aux.get("valid")
        if valid is not None:  # padding must not win a per-token head's max over tokens (LV-ViT)
            logits = model.forward_head(state.x, valid=valid)
        return logits

    def export_blocker(self) -> Optional[str]:
        if self.keep_mode == "threshold":
            return ("DynamicViT keep_mode='threshold' keeps a per-image number of tokens (data-dependent shapes); "
                    "export keep_mode='topk' (the default) or run it eagerly")
        return None

    def extra_repr(self) -> str:
        ratios = [round(r, 4) for r in self.keep_ratios]
        return (f"keep_ratios={ratios}, keep_counts={self.keep_counts}, locations={self.locations}, "
                f"keep_mode={self.keep_mode!r}" + (", early_policy=True" if self.early_policy else ""))


# ---------------------------------------------------------------------------------------------- loss
def keep_ratio_loss(decisions: Sequence[Tensor], keep_ratios: Sequence[float]) -> Tensor:
    """sum_s mean_b (mean_n D_s - rho_s)^2 over decisions D_s (B, N) (unweighted, not divided by S)."""
    if len(decisions) != len(keep_ratios):
        raise ConfigError(f"got {len(decisions)} stages of decisions but {len(keep_ratios)} keep ratios "
                          f"{list(keep_ratios)}")
    return sum(((d.mean(dim=1) - r) ** 2).mean() for d, r in zip(decisions, keep_ratios))


def masked_token_mse(tokens: Tensor, teacher_tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the kept tokens (mask (B, N) > 0.5) and channels; 0 if nothing is kept."""
    keep = (mask > 0.5).to(tokens.dtype)  # (B, N)
    err = ((tokens - teacher_tokens) ** 2).sum(dim=-1)  # (B, N)
    return (err * keep).sum() / (keep.sum() * tokens.shape[-1]).clamp_min(1.0)


def masked_token_kl(scores: Tensor, teacher_scores: Tensor, mask: Tensor) -> Tensor:
    """KL(teacher || student) of per-token scores (B, N, K), mean over kept tokens; 0 if nothing is kept."""
    keep = (mask > 0.5).to(scores.dtype)
    return (per_token_kl(scores, teacher_scores) * keep).sum() / keep.sum().clamp_min(1.0)


def dynamicvit_loss(outputs: DynamicViTOutput, target: Tensor, teacher_logits: Optional[Tensor],
                    teacher_tokens: Optional[Tensor], keep_ratios: Sequence[float], clf_weight: float = 1.0,
                    ratio_weight: float = 2.0, distill_weight: float = 0.5, token_loss: str = "mse",
                    smoothing: float = 0.0):
    """The DynamicViT loss on a training-mode `DynamicViTOutput`; returns (total, parts dict of the 4 terms).

    teacher_tokens: (B, N, C) final-norm teacher patch tokens ('mse') or (B, N, K) per-token scores ('kl').
    Without a teacher (teacher_logits None) only classification and ratio terms are used.
    """
    cls = classification_loss(outputs.logits, target, smoothing)
    ratio = keep_ratio_loss(outputs.decisions, keep_ratios)
    total = clf_weight * cls + ratio_weight * ratio / len(keep_ratios)
    zero = cls.new_zeros(())
    kl, tok = zero, zero
    if teacher_logits is not None:
        kl = logit_distillation(outputs.logits, teacher_logits)
        if token_loss == "mse":
            tok = masked_token_mse(outputs.tokens, teacher_tokens, outputs.mask)
        else:
            if outputs.aux_logits is None:
                raise ConfigError("token_loss 'kl' needs per-token aux_head scores (an LV-ViT model)")
            tok = masked_token_kl(outputs.aux_logits, teacher_tokens, outputs.mask)
        total = total + distill_weight * kl + distill_weight * tok
    return total, {"cls": cls, "ratio": ratio, "kl": kl, "token": tok}


# ---------------------------------------------------------------------------------------------- teacher
def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode dense copy of `model` (its reducer and predictors removed)."""
    teacher = remove_method(copy.deepcopy(model))
    if "score_predictor" in teacher._modules:  # attached without apply_method
        del teacher.score_predictor
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(class logits (B, K), token targets): final patch tokens (B, N, C), or the per-token head's scores
    (B, N, K) of a backbone that has one (LV-ViT's aux_head)."""
    if getattr(teacher, "reducer", None) is not None:
        raise ConfigError("the DynamicViT teacher must be the dense model; build it with make_teacher(model)")
    state = teacher.forward_state(x)
    logits, per_token = teacher.forward_head(state.x, per_token=True)
    if per_token is not None:
        return logits, per_token
    return (logits[0] if isinstance(logits, tuple) else logits), state.x[:, state.num_prefix:]


class DynamicViTLoss(nn.Module):
    """DynamicViT's training loss with its teacher (docs/methods.md 3.3). `forward(images, outputs, target)`.

    Args:
        teacher: the dense model (frozen, kept in eval mode), or None for classification + ratio only.
        keep_ratios: cumulative keep ratios per stage ([rho, rho^2, rho^3]), e.g. `model.reducer.keep_ratios`.
        token_loss: 'mse' (DeiT) or 'kl' (per-token head scores, LV-ViT); None picks by the teacher's head.
        clf_weight, ratio_weight (2; 5 for DeiT-B), distill_weight: the term weights.
        smoothing: label smoothing for integer targets (soft targets are used as given).
    The last parts are kept in `self.last_parts` (detached tensors, no host sync) for logging.
    """

    def __init__(self, teacher: Optional[nn.Module], keep_ratios: Sequence[float], token_loss: Optional[str] = None,
                 clf_weight: float = 1.0, ratio_weight: float = 2.0, distill_weight: float = 0.5,
                 smoothing: float = 0.0):
        super().__init__()
        if token_loss is None:
            token_loss = "kl" if getattr(teacher, "aux_head", None) is not None else "mse"
        if token_loss not in TOKEN_LOSSES:
            raise ConfigError(f"token_loss must be one of {list(TOKEN_LOSSES)}, got {token_loss!r}")
        self.teacher = teacher.eval() if teacher is not None else None
        self.keep_ratios = list(keep_ratios)
        self.token_loss = token_loss
        self.clf_weight, self.ratio_weight, self.distill_weight = clf_weight, ratio_weight, distill_weight
        self.smoothing = smoothing
        self.last_parts: dict = {}

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> "DynamicViTLoss":
        """The authors' setup for a DynamicViT `model`: dense frozen teacher, its keep ratios, ratio weight 5 at
        DeiT-B's width (768; 2 otherwise), MSE token loss for DeiT and per-token score KL for LV-ViT."""
        if not isinstance(getattr(model, "reducer", None), DynamicViT):
            raise ConfigError("DynamicViTLoss.for_model needs a model built with method='dynamicvit'")
        kwargs.setdefault("ratio_weight", 5.0 if getattr(model, "embed_dim", None) == 768 else 2.0)
        return cls(make_teacher(model), model.reducer.keep_ratios, **kwargs)

    def train(self, mode: bool = True) -> "DynamicViTLoss":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays frozen in eval mode
        return self

    def forward(self, images: Tensor, outputs: DynamicViTOutput, target: Tensor) -> Tensor:
        t_logits, t_tokens = teacher_outputs(self.teacher, images) if self.teacher is not None else (None, None)
        total, parts = dynamicvit_loss(outputs, target, t_logits, t_tokens, self.keep_ratios, self.clf_weight,
                                       self.ratio_weight, self.distill_weight, self.token_loss, self.smoothing)
        self.last_parts = {k: v.detach() for k, v in parts.items()}
        return total


def dynamicvit_criterion(model: nn.Module, smoothing: float = 0.0, distill: bool = True,
                         ratio_weight: Optional[float] = None) -> DynamicViTLoss:
    """The criterion `dynavit train` uses (the spec's factory): with the dense teacher unless distill is off;
    ratio_weight None = the authors' (2; 5 at DeiT-B's width)."""
    kwargs = {"smoothing": smoothing}
    if ratio_weight is not None:
        kwargs["ratio_weight"] = float(ratio_weight)
    if distill:
        return DynamicViTLoss.for_model(model, **kwargs)
    return DynamicViTLoss(None, model.reducer.keep_ratios, **kwargs)


# ---------------------------------------------------------------------------------------------- registration
RECIPE = Recipe(
    "dynamicvit", "DynamicViT, as the authors' current release (commit 1322e62): 30 epochs from a pretrained dense "
    "model, lr 1e-3 x B/1024, warm-up 5 epochs from lr 0 (np.linspace per step), backbone lr x 0.01 and lr 0 for 5 "
    "epochs (AdamW still steps it), cls_token / pos_embed fixed, dense teacher distillation, EMA 0.9999",
    epochs=30, lr=1e-3, lr_batch=1024, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05, warmup_start=0.0,
    warmup_style="linspace", distill=True, backbone_lr_scale=0.01, head_patterns=("score_predictor.*",),
    frozen_patterns=("cls_token", "pos_embed"), freeze_backbone_epochs=5, freeze_mode="zero_lr", ema_decay=0.9999)


@register_method(
    "dynamicvit", params=("keep_rate", "prune_locations", "keep_mode", "early_policy", "predictor_bias"),
    families=("vit",),
    recipe=RECIPE, criterion=dynamicvit_criterion, attention_extras=("attn_bias", "attend"),
    identity={"keep_rate": 1.0},
    info_fields={"keep_logp": "per stage, (B, T) keep log-probability of each token entering the stage",
                 "kept_per_image": "keep_mode='threshold': per stage, (B,) tokens kept by each image"})
def apply_dynamicvit(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
                     prune_locations: Optional[Sequence[int]] = None, keep_mode: str = "topk",
                     early_policy: bool = False, predictor_bias: str = "zero") -> nn.Module:
    """DynamicViT: learned prediction modules prune tokens hierarchically (keep ratios rho, rho^2, rho^3).

    Args:
        keep_rate: base rate rho in (0, 1], or an explicit non-increasing list of cumulative ratios per stage.
        prune_locations: blocks before which predictors run (default: [3, 6, 9] at depth 12, [4, 8, 12] at 16,
            [5, 10, 15] at 20; in general depth * s / (S + 1)).
        keep_mode: 'topk' (the authors': int(N * ratio) tokens per image) or 'threshold' (per image, the tokens
            with keep probability > 0.5, padded per batch with an attention mask).
        early_policy: training only: the blocks before the first predictor also run the eps-smoothed masked
            softmax with an all-ones policy, as the authors' training forward does (docs/dynamicvit.md).
        predictor_bias: the fresh predictors' last bias: 'zero' (the authors' init: p(keep) = 0.5 everywhere, so
            training starts below every target) or 'keep_ratio' (log [r_s, 1 - r_s] with r_s the stage's keep ratio
            given the previous stage's, so training starts on target; docs/dynamicvit.md "Short runs").
            Loaded weights replace it either way.
    """
    if predictor_bias not in PREDICTOR_BIASES:
        raise ConfigError(f"predictor_bias must be one of {list(PREDICTOR_BIASES)}, got {predictor_bias!r}")
    reducer = DynamicViT(model.num_patches, len(model.blocks), keep_rate, prune_locations, keep_mode, early_policy)
    ref = next(model.parameters())
    predictors = [ScorePredictor(model.embed_dim) for _ in reducer.locations]
    if predictor_bias == "keep_ratio":
        for predictor, ratio in zip(predictors, stage_keep_ratios(reducer.keep_ratios)):
            init_keep_bias(predictor, ratio)
    model.score_predictor = nn.ModuleList(predictors).to(device=ref.device, dtype=ref.dtype)
    model.reducer = reducer
    return model
