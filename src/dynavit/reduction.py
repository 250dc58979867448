"""The interface between a backbone and a token-reduction method (docs/methods.md section 2,
docs/writing-a-method.md).

A `TokenReducer` holds a method's hyperparameters; its learned parts (DynamicViT's predictors) are registered on
the model itself so state-dict keys match the authors' checkpoints. The backbone calls the hooks below in
order for every block i; each hook receives and returns the per-forward `TokenState`:

    state = reducer.before_block(model, i, state)            # e.g. DynamicViT's predictor + top-k
    kw    = reducer.attention_args(i, state)                 # need_cls_attn / need_keys / attn_bias / attend
    x, cls_attn, keys = block.attn_residual(state.x, **kw)
    state = reducer.after_attention(model, i, state, cls_attn, keys)  # EViT, BAT, ToMe
    state.x = block.mlp_residual(state.x)

and after the final norm and head, `out = reducer.finalize(model, state, logits)` is what forward returns.
The base class does nothing, so a reducer that keeps everything gives the dense model.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .tokens import TokenState


class TokenReducer:
    """Base class of every token-reduction method (no-op hooks)."""

    name = "dense"

    def before_block(self, model: nn.Module, i: int, state: TokenState) -> TokenState:
        return state

    def attention_args(self, i: int, state: TokenState) -> dict:
        """Keyword arguments for block i's attention: need_cls_attn (bool), need_keys (bool), attn_bias
        (B, 1, 1, T) additive, attend (q, k, v, scale) -> out. Ask only where needed: {} keeps it fused."""
        return {}

    def after_attention(self, model: nn.Module, i: int, state: TokenState, cls_attn: Optional[Tensor],
                        keys: Optional[Tensor]) -> TokenState:
        return state

    def finalize(self, model: nn.Module, state: TokenState, logits: Tensor) -> Any:
        """What forward returns (DynamicViT returns its loss inputs while training)."""
        return logits

    def set_keep_rate(self, keep_rate: float) -> None:
        """Change the keep rate at run time (training schedules). Methods without one raise a ConfigError."""
        from .errors import ConfigError

        hint = getattr(self, "keep_rate_hint", "")
        raise ConfigError(f"method {self.name!r} has no keep rate (got set_keep_rate({keep_rate!r}))"
                          + (f"; {hint}" if hint else ""))

    def export_blocker(self) -> Optional[str]:
        """Why a model with this reducer cannot be exported as one ONNX graph (e.g. per-image token counts), or
        None; `dynavit export` refuses with this reason before it starts."""
        return None

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
