"""Transformer layers shared by every ViT-style backbone: patch embedding, MLP, attention, block.

Attention runs fused (`scaled_dot_product_attention`). Token-reduction methods get what they need from it
without giving that up: the class-token row of the attention (`need_cls_attn`, O(N C)), the head-averaged keys
(`need_keys`, ToMe), an additive bias (`attn_bias`, ToMe's log-size) and DynamicViT's training policy (the
authors' masked softmax, METHODS 3.3, with a hand-written backward: `policy_attention`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokens import class_attention


def patch_grid(img_size: int, patch_size: int) -> tuple:
    """(H/p, W/p) for a square image; a size that is not a multiple of the patch is refused (a silent floor
    would drop the image's last pixels: 200 px with 16-pixel patches is a 12 x 12 grid of 192 px)."""
    from .errors import ConfigError

    if int(img_size) < int(patch_size) or int(img_size) % int(patch_size):
        lo = max(int(img_size) // int(patch_size), 1) * int(patch_size)
        raise ConfigError(f"img_size {img_size} is not a multiple of patch_size {patch_size} (the patch grid would "
                          f"cover only {int(img_size) // int(patch_size) * int(patch_size)} px); use "
                          f"{lo}" + (f" or {lo + int(patch_size)}" if lo < int(img_size) else ""))
    return (int(img_size) // int(patch_size),) * 2


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> patch tokens (B, N, C) by a strided convolution (ViT / DeiT)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = patch_grid(img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, prob: float = 0.0):
        super().__init__()
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def softmax_with_policy(attn: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax (METHODS 3.3), the authors' explicit formula. attn (B, H, T, T), policy (B, T).

        G_ij = D_j (i != j), G_ii = 1;   A_ij = exp(s_ij - max_j s_ij) G_ij;   P_ij = (A_ij + eps/T) / (sum_j A_ij + eps)

    Computed in float32. This is the reference (and the path for the rare combinations `policy_attention` does
    not take: an extra additive bias, or the class-attention row); training uses `policy_attention`.
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
    """softmax_with_policy(scale q k^T, D) @ v with a hand-written backward (DynamicViT training, METHODS 3.3).

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


class Attention(nn.Module):
    """Multi-head self-attention, fused, with the extras token-reduction methods need.

    forward(x (B, T, C)) -> (out (B, T, C), cls_attn (B, T) or None, keys (B, T, d) or None)
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_bias: Optional[Tensor] = None, policy: Optional[Tensor] = None,
                need_cls_attn: bool = False, need_keys: bool = False):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, d)
        cls_attn = None
        if policy is not None and attn_bias is None and not need_cls_attn:
            out = policy_attention(q, k, v, policy, self.scale)  # DynamicViT training (METHODS 3.3)
        elif policy is not None:
            # explicit path: the policy together with an additive bias or the class-attention row
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, T)
            if attn_bias is not None:
                attn = attn + attn_bias
            attn = softmax_with_policy(attn, policy).to(v.dtype)
            out = attn @ v
            if need_cls_attn:
                cls_attn = attn[:, :, 0].mean(dim=1)
        else:
            mask = attn_bias.to(q.dtype) if attn_bias is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if need_cls_attn:
                cls_attn = class_attention(q[:, :, :1], k, self.scale, attn_bias)
        keys = k.mean(dim=1) if need_keys else None
        out = self.proj(out.transpose(1, 2).reshape(B, T, C))
        return out, cls_attn, keys


class Block(nn.Module):
    """Pre-norm transformer block. `residual_scale` is 1 for ViT and 1/2 for LV-ViT (its skip_lam = 2).

    The two residual halves are separate methods: token-reduction methods act between them.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, residual_scale: float = 1.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.residual_scale = residual_scale
        self.drop_path = DropPath(drop_path)

    def _residual(self, x: Tensor, branch: Tensor) -> Tensor:
        branch = self.drop_path(branch)
        if self.residual_scale != 1.0:
            branch = branch * self.residual_scale
        return x + branch

    def attn_residual(self, x: Tensor, **attn_kwargs):
        """x + attn(norm1(x)); returns (x, cls_attn, keys)."""
        out, cls_attn, keys = self.attn(self.norm1(x), **attn_kwargs)
        return self._residual(x, out), cls_attn, keys

    def mlp_residual(self, x: Tensor) -> Tensor:
        return self._residual(x, self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp_residual(self.attn_residual(x)[0])
