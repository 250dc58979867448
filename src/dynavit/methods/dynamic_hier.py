"""DynamicCNN and DynamicSwin (Rao et al., TPAMI extension of DynamicViT): dynamic spatial sparsification of
hierarchical backbones (docs/dynamic-hierarchical.md).

Nothing is removed: depthwise convolutions and shifted windows need the whole grid. In one stage (stage 3, the
1/16 map) predictors rank every position; from each predictor on, every block sends the top `int(N * ratio)`
positions through its full pointwise path (ConvNeXt: LN, pwconv1, GELU, pwconv2, x gamma; Swin: norm2 + MLP) and
the rest through a cheap fast path (LayerNorm + Linear(C, C); x fast_path_gamma for ConvNeXt), then scatters both
back into the dense map. The spatial part of the block (depthwise conv / window attention) runs everywhere.

- Ratios: `keep_rate=b` gives the authors' `[b, b - 0.2, b - 0.4]` in Python floats (b = 0.7: 0.49999999999999994,
  so 97 of 196 positions, not 98); each predictor ranks all N positions (not nested).
- Eval: positions are gathered (one gather per block), so only the selected ones run the full path.
- Training: the authors' two full-size streams (full-path and fast-path maps) are carried through the stage and
  merged by the current mask before each predictor, each block's spatial part and at the end of the stage;
  straight-through hard Gumbel-softmax decisions (`F.gumbel_softmax`, looked up at call time so tests can make it
  noiseless). Forward returns `DynamicHierOutput` for `DynamicHierLoss` (ratio weight 10, unmasked token MSE).

Parameters live where the authors' checkpoints have them: ConvNeXt `score_predictor.{i}` (1x1 convs) and
`stages.2.{j}.{fast_path, fast_path_gamma}`; Swin `layers.2.score_predictor.{i}` (Linear) and
`layers.2.blocks.{j}.fastmlp.fc1.{0,1}`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, check_keep_rate
from ..hier import MapContext, MapReducer
from ..layers import init_trunc_normal
from ..losses import classification_loss, logit_distillation
from ..recipes import Recipe
from ..registry import register_method
from ..tokens import gather_tokens
from .dynamicvit import ScorePredictor, keep_ratio_loss

RATIO_ARITHMETIC = ("float", "decimal")
_RATIO_STEP = 0.2  # the authors' main.py: SPARSE_RATIO = [b, b - 0.2, b - 0.4]


# ---------------------------------------------------------------------------------------------- config
def hier_ratios(keep_rate: Union[float, Sequence[float]], num_predictors: int = 3,
                arithmetic: str = "float") -> list[float]:
    """Full-path ratio per predictor: b -> [b, b - 0.2, b - 0.4, ...] (fractions of all N positions, not nested).

    arithmetic 'float' keeps the authors' Python floats (0.7 - 0.2 = 0.49999999999999994: 97 of 196 positions);
    'decimal' rounds each ratio to 12 decimals (0.5: 98 of 196). An explicit list is taken as given.
    """
    if arithmetic not in RATIO_ARITHMETIC:
        raise ConfigError(f"ratio_arithmetic must be one of {list(RATIO_ARITHMETIC)}, got {arithmetic!r}")
    if isinstance(keep_rate, (list, tuple)):
        if len(keep_rate) != num_predictors:
            raise ConfigError(f"keep_rate list {list(keep_rate)} needs one ratio per predictor ({num_predictors})")
        return [check_keep_rate(r, "keep_rate") for r in keep_rate]
    b = check_keep_rate(keep_rate)
    # i * 0.2 for i <= 2 is exactly the authors' 0.2 / 0.4; rounding only matters beyond three predictors
    ratios = [b - round(_RATIO_STEP * i, 12) if i else b for i in range(num_predictors)]
    if arithmetic == "decimal":
        ratios = [round(r, 12) for r in ratios]
    if ratios[-1] <= 0:
        raise ConfigError(f"keep_rate {keep_rate!r} gives ratios {[round(r, 4) for r in ratios]}: the last of "
                          f"[b, b - 0.2, ...] must stay > 0, so b > {round(_RATIO_STEP * (num_predictors - 1), 12)}; "
                          f"or pass an explicit list of ratios")
    return ratios


def default_hier_locations(depth: int) -> list[int]:
    """The authors' predictor blocks within the stage: step * [1, 2, 3] with step = max(1, depth // 9).

    ConvNeXt-T (9 blocks) and Swin-T (6): [1, 2, 3]; ConvNeXt-S/B (27): [3, 6, 9]; Swin-S/B (18): [2, 4, 6].
    """
    step = max(1, depth // 9)
    locs = [step, 2 * step, 3 * step]
    if locs[-1] >= depth:
        raise ConfigError(f"no default prune_locations for a stage of {depth} blocks (the authors' rule gives "
                          f"{locs}); pass prune_locations, increasing block indices in [0, {depth})")
    return locs


def check_hier_locations(prune_locations, depth: int) -> list[int]:
    try:
        locs = list(prune_locations)
    except TypeError:
        raise ConfigError(f"prune_locations must be a list of block indices, got {prune_locations!r}") from None
    ok = (len(locs) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in locs)
          and all(0 <= i < depth for i in locs) and all(a < b for a, b in zip(locs, locs[1:])))
    if not ok:
        raise ConfigError(f"prune_locations must be a non-empty, strictly increasing list of block indices within "
                          f"stage 3, in [0, {depth}), got {prune_locations!r}")
    return locs


# ---------------------------------------------------------------------------------------------- modules
class FastMlp(nn.Module):
    """DynamicSwin's fast path `fastmlp`: LayerNorm + Linear(C, C), no activation."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc1(x)


# ---------------------------------------------------------------------------------------------- pieces
def full_fast_order(keep_logp: Tensor) -> Tensor:
    """(B, N) keep log-probabilities -> (B, N) positions in descending score: the first k take the full path."""
    return keep_logp.topk(keep_logp.shape[1], dim=1, sorted=True).indices


def split_paths(y: Tensor, order: Tensor, k: int, full_fn, fast_fn) -> Tensor:
    """Run full_fn on the positions order[:, :k] and fast_fn on the rest; scatter back: y (B, N, C) -> (B, N, C).

    One gather in score order and one back (the inverse permutation), so only k positions per image pay for
    the full path.
    """
    y = gather_tokens(y, order)  # (B, N, C) in score order
    a, b = full_fn(y[:, :k]), fast_fn(y[:, k:])
    out = torch.cat([a, b.to(a.dtype)], dim=1)
    inverse = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                               .expand_as(order))
    return gather_tokens(out, inverse)


def sample_mask(logp: Tensor) -> Tensor:
    """Straight-through hard Gumbel-softmax full-path decisions (B, N, 1) from logp (B, N, 2)."""
    return F.gumbel_softmax(logp, hard=True, dim=-1)[..., 0:1]


@dataclass
class DynamicHierOutput:
    """What the training-mode forward returns (the inputs of `DynamicHierLoss`)."""

    logits: Tensor  # (B, classes)
    featmap: Tensor  # final-norm feature map: ConvNeXt (B, h, w, C), Swin (B, L, C)
    decisions: list = field(default_factory=list)  # per predictor (B, N) straight-through decisions (row-major)


# ---------------------------------------------------------------------------------------------- reducers
class DynamicHier(MapReducer):
    """Hyperparameters and the stage forward shared by DynamicCNN and DynamicSwin (subclasses: the block split)."""

    name = "dynamic_hier"

    def __init__(self, depth: int, keep_rate: Union[float, Sequence[float]] = 0.7,
                 prune_locations: Optional[Sequence[int]] = None, ratio_arithmetic: str = "float"):
        self.depth = depth
        self.locations = (default_hier_locations(depth) if prune_locations is None
                          else check_hier_locations(prune_locations, depth))
        self._index = {loc: i for i, loc in enumerate(self.locations)}
        self.ratio_arithmetic = ratio_arithmetic
        self.set_keep_rate(keep_rate)

    def set_keep_rate(self, keep_rate: Union[float, Sequence[float]]) -> None:
        """Set b (ratios [b, b - 0.2, b - 0.4]) or an explicit list of full-path ratios, one per predictor."""
        self.keep_rate = keep_rate
        self.keep_ratios = hier_ratios(keep_rate, len(self.locations), self.ratio_arithmetic)

    def counts(self, num_positions: int) -> list[int]:
        """Full-path positions per predictor: int(N * ratio) (the authors' truncation)."""
        return [int(num_positions * r) for r in self.keep_ratios]

    # ------------------------------------------------------------------ model-specific parts
    def predictors(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def tokens(self, x: Tensor) -> Tensor:
        """The stage's representation -> (B, N, C) tokens in row-major position order."""
        raise NotImplementedError

    def eval_block(self, blk: nn.Module, x: Tensor, order: Tensor, k: int) -> Tensor:
        raise NotImplementedError

    def train_block(self, blk: nn.Module, streams: tuple, mask: Tensor) -> tuple:
        raise NotImplementedError

    def to_mask(self, decision: Tensor, x: Tensor) -> Tensor:
        """(B, N, 1) decisions -> the mask shape the streams use."""
        return decision

    # ------------------------------------------------------------------ the stage
    def run_stage(self, model: nn.Module, s: int, x: Tensor, ctx: MapContext) -> Tensor:
        blocks = model.stage_blocks(s)
        if model.training:
            return self._train_stage(model, blocks, x, ctx)
        predictors = self.predictors(model)
        order, k = None, 0
        counts = None
        for j, blk in enumerate(blocks):
            i = self._index.get(j)
            if i is not None:
                tokens = self.tokens(x)  # (B, N, C)
                # a Python int: traced for ONNX, N * ratio would be computed in float32 (0.49999999999999994 -> 0.5)
                counts = counts or self.counts(int(tokens.shape[1]))
                logp = predictors[i](tokens)  # (B, N, 2)
                order, k = full_fast_order(logp[..., 0]), counts[i]
                self._record(ctx, logp, order, k)
            x = blk(x) if order is None else self.eval_block(blk, x, order, k)
        return x

    def _train_stage(self, model: nn.Module, blocks, x: Tensor, ctx: MapContext) -> Tensor:
        predictors = self.predictors(model)
        streams, mask = None, None  # (full-path stream, fast-path stream), current mask
        decisions = []
        for j, blk in enumerate(blocks):
            i = self._index.get(j)
            if i is not None:
                merged = x if streams is None else streams[0] * mask + streams[1] * (1 - mask)
                logp = predictors[i](self.tokens(merged))  # (B, N, 2)
                decision = sample_mask(logp)  # (B, N, 1)
                mask = self.to_mask(decision, x)
                decisions.append(decision[..., 0])
                if streams is None:
                    streams = (x, x)
            if streams is None:
                x = blk(x)
            else:
                streams = self.train_block(blk, streams, mask)
        ctx.aux["decisions"] = decisions
        if ctx.info is not None:
            ctx.info.extra["decisions"] = [d.detach() for d in decisions]
        return x if streams is None else streams[0] * mask + streams[1] * (1 - mask)

    def _record(self, ctx: MapContext, logp: Tensor, order: Tensor, k: int) -> None:
        info = ctx.info
        if info is None:
            return
        B, N = order.shape
        full = order[:, :k]
        p2t = torch.full((B, N), -1, dtype=torch.long, device=order.device)
        p2t.scatter_(1, full, torch.arange(k, device=order.device).expand(B, k))
        info.token_counts.append(k)
        info.patch_to_token.append(p2t)  # -1 = fast path
        info.sizes.append(torch.ones(B, k, device=order.device))
        info.extra.setdefault("full_positions", []).append(full)
        info.extra.setdefault("fast_positions", []).append(order[:, k:])
        info.extra.setdefault("keep_logp", []).append(logp[..., 0].detach())

    def finalize(self, model: nn.Module, ctx: MapContext, logits: Tensor, features: Optional[Tensor] = None):
        if model.training and "decisions" in ctx.aux:
            return DynamicHierOutput(logits, model.final_featmap(features), ctx.aux["decisions"])
        return logits

    def extra_repr(self) -> str:
        return (f"keep_ratios={[round(r, 4) for r in self.keep_ratios]}, locations={self.locations} (stage 3), "
                f"ratio_arithmetic={self.ratio_arithmetic!r}")


class DynamicCNN(DynamicHier):
    """DynamicCNN on ConvNeXt: the depthwise conv everywhere, the pointwise FFN on the selected positions."""

    name = "dynamiccnn"

    def predictors(self, model: nn.Module) -> nn.ModuleList:
        return model.score_predictor

    def tokens(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        return x.permute(0, 2, 3, 1).reshape(B, H * W, C)

    def to_mask(self, decision: Tensor, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        return decision.reshape(B, H, W, 1).permute(0, 3, 1, 2)  # (B, 1, H, W)

    @staticmethod
    def fast(blk: nn.Module, y: Tensor) -> Tensor:
        y = blk.fast_path(y)
        return y if blk.fast_path_gamma is None else y * blk.fast_path_gamma

    def eval_block(self, blk: nn.Module, x: Tensor, order: Tensor, k: int) -> Tensor:
        B, C, H, W = x.shape
        y = blk.mix(x).reshape(B, H * W, C)  # depthwise conv on the whole map, channels-last
        delta = split_paths(y, order, k, blk.ffn, lambda t: self.fast(blk, t))
        return x + blk.drop_path(delta.reshape(B, H, W, C).permute(0, 3, 1, 2))

    def train_block(self, blk: nn.Module, streams: tuple, mask: Tensor) -> tuple:
        s1, s2 = streams  # (B, C, H, W) each; mask (B, 1, H, W)
        d = blk.dwconv(s1 * mask + s2 * (1 - mask))
        a = (d * mask + s1 * (1 - mask)).permute(0, 2, 3, 1)
        b = (d * (1 - mask) + s2 * mask).permute(0, 2, 3, 1)
        s1 = s1 + blk.drop_path(blk.ffn(a).permute(0, 3, 1, 2))  # each stream keeps its own residual
        s2 = s2 + blk.drop_path(self.fast(blk, b).permute(0, 3, 1, 2))
        return s1, s2


class DynamicSwin(DynamicHier):
    """DynamicSwin: window attention everywhere, norm2 + MLP on the selected tokens, `fastmlp` on the rest."""

    name = "dynamicswin"

    def predictors(self, model: nn.Module) -> nn.ModuleList:
        return model.layers[self.stage].score_predictor

    def tokens(self, x: Tensor) -> Tensor:
        return x

    def eval_block(self, blk: nn.Module, x: Tensor, order: Tensor, k: int) -> Tensor:
        x = blk.attn_residual(x)
        return x + blk.drop_path(split_paths(x, order, k, blk.ffn, blk.fastmlp))

    def train_block(self, blk: nn.Module, streams: tuple, mask: Tensor) -> tuple:
        s1, s2 = streams  # (B, N, C) each; mask (B, N, 1)
        x = blk.attn_residual(s1 * mask + s2 * (1 - mask))
        a = x * mask + s1 * (1 - mask)
        b = x * (1 - mask) + s2 * mask
        return x + blk.drop_path(blk.ffn(a)), x + blk.drop_path(blk.fastmlp(b))  # both add to the merged tokens


# ---------------------------------------------------------------------------------------------- attach
def _attach(model: nn.Module, reducer: DynamicHier, conv: bool, dim: int, fast_factory, parent: nn.Module) -> None:
    ref = next(model.parameters())
    blocks = model.stage_blocks(reducer.stage)
    for j in range(reducer.locations[0], len(blocks)):
        fast_factory(blocks[j])
    parent.score_predictor = nn.ModuleList(ScorePredictor(dim, conv) for _ in reducer.locations)
    model.to(device=ref.device, dtype=ref.dtype)
    model.reducer = reducer


def _convnext_fast(blk: nn.Module, layer_scale_init_value: float = 1e-6) -> None:
    dim = blk.dwconv.in_channels
    blk.fast_path = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim))
    blk.fast_path.apply(init_trunc_normal)
    gamma = blk.gamma is not None  # layer scale on the fast path exactly when the block has one (the authors')
    blk.fast_path_gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value)) if gamma else None


def _swin_fast(blk: nn.Module) -> None:
    blk.fastmlp = FastMlp(blk.dim)
    blk.fastmlp.apply(init_trunc_normal)


# ---------------------------------------------------------------------------------------------- registration
RECIPES = {name: Recipe(
    name, f"{label} (TPAMI, the authors' README; docs/dynamic-hierarchical.md): 120 epochs from a pretrained dense "
    "model, lr 4e-3 x B/4096, warm-up 20, backbone lr x 0.2 and frozen for 5 epochs, dense teacher distillation "
    "(ratio weight 10, token MSE), EMA 0.9999; the authors also set drop path 0.2 (0.5 for -B): "
    "--set drop_path_rate=0.2", epochs=120, lr=4e-3, lr_batch=4096, min_lr=1e-6, warmup_epochs=20,
    weight_decay=0.05, distill=True, backbone_lr_scale=0.2,
    head_patterns=("score_predictor.*", "*.score_predictor.*", "*fast_path*", "*fastmlp*"),
    freeze_backbone_epochs=5, ema_decay=0.9999) for name, label in (("dynamiccnn", "DynamicCNN"),
                                                                    ("dynamicswin", "DynamicSwin"))}
INFO_FIELDS = {"full_positions": "per predictor, (B, k) stage-3 positions sent through the full path",
               "fast_positions": "per predictor, (B, N - k) positions sent through the fast path",
               "keep_logp": "per predictor, (B, N) keep log-probability of every stage-3 position",
               "decisions": "training: per predictor, (B, N) straight-through full-path decisions"}


def dynamic_hier_criterion(model: nn.Module, smoothing: float = 0.0, distill: bool = True) -> DynamicHierLoss:
    """The criterion `dynavit train` uses (the specs' factory): with the dense teacher unless distill is off."""
    return DynamicHierLoss.for_model(model, distill=distill, smoothing=smoothing)


_PARAMS = ("keep_rate", "prune_locations", "ratio_arithmetic")


@register_method("dynamiccnn", params=_PARAMS, families=("convnext",), recipe=RECIPES["dynamiccnn"],
                 criterion=dynamic_hier_criterion, info_fields=INFO_FIELDS)
def apply_dynamiccnn(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
                     prune_locations: Optional[Sequence[int]] = None, ratio_arithmetic: str = "float") -> nn.Module:
    """DynamicCNN (TPAMI): in ConvNeXt stage 3 only the predicted top positions run the FFN (ratios b, b-.2, b-.4).

    The other positions take a LayerNorm + Linear fast path; the depthwise conv runs everywhere.

    Args:
        keep_rate: b in (0, 1] giving full-path ratios [b, b - 0.2, b - 0.4] (the authors' floats; b > 0.4), or an
            explicit list of ratios, one per predictor.
        prune_locations: stage-3 blocks where predictors run (default: [1, 2, 3] for ConvNeXt-T, [3, 6, 9] for -S/-B).
        ratio_arithmetic: 'float' (the authors': 97 of 196 at ratio 0.7 - 0.2) or 'decimal' (98).
    """
    reducer = DynamicCNN(len(model.stage_blocks(2)), keep_rate, prune_locations, ratio_arithmetic)
    _attach(model, reducer, True, model.dims[2], _convnext_fast, model)
    return model


@register_method("dynamicswin", params=_PARAMS, families=("swin",), recipe=RECIPES["dynamicswin"],
                 criterion=dynamic_hier_criterion, info_fields=INFO_FIELDS)
def apply_dynamicswin(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
                      prune_locations: Optional[Sequence[int]] = None, ratio_arithmetic: str = "float") -> nn.Module:
    """DynamicSwin (TPAMI): in Swin stage 3 only the predicted top tokens run the MLP (ratios b, b-.2, b-.4).

    The other tokens take a LayerNorm + Linear fast path; window attention runs everywhere.

    Args:
        keep_rate: b in (0, 1] giving full-path ratios [b, b - 0.2, b - 0.4] (the authors' floats; b > 0.4), or an
            explicit list of ratios, one per predictor.
        prune_locations: stage-3 blocks where predictors run (default: [1, 2, 3] for Swin-T, [2, 4, 6] for -S/-B).
        ratio_arithmetic: 'float' (the authors': 97 of 196 at ratio 0.7 - 0.2) or 'decimal' (98).
    """
    reducer = DynamicSwin(len(model.stage_blocks(2)), keep_rate, prune_locations, ratio_arithmetic)
    _attach(model, reducer, False, model.layers[2].dim, _swin_fast, model.layers[2])
    return model


# ---------------------------------------------------------------------------------------------- loss
def make_dense_teacher(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode dense copy of a DynamicCNN / DynamicSwin model (predictors and fast paths removed)."""
    teacher = copy.deepcopy(model)
    teacher.reducer = None
    for m in list(teacher.modules()):
        for name in ("score_predictor", "fast_path", "fastmlp"):
            if name in m._modules:
                del m._modules[name]
        if "fast_path_gamma" in m._parameters:
            del m._parameters["fast_path_gamma"]
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def dense_teacher_outputs(teacher: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits (B, K), final-norm feature map) of the dense teacher."""
    if getattr(teacher, "reducer", None) is not None:
        raise ConfigError("the DynamicCNN / DynamicSwin teacher must be the dense model; use make_dense_teacher")
    features = teacher.forward_features(x)
    return teacher.forward_head(features), teacher.final_featmap(features)


def dynamic_hier_loss(outputs: DynamicHierOutput, target: Tensor, teacher_logits: Optional[Tensor],
                      teacher_featmap: Optional[Tensor], ratios: Sequence[float], clf_weight: float = 1.0,
                      ratio_weight: float = 10.0, distill_weight: float = 0.5, smoothing: float = 0.0):
    """The authors' ConvNeXt / Swin loss; returns (total, parts {cls, ratio, kl, token}).

    total = clf_w * CE + ratio_w * ratio / len(ratios) + distill_w * KL(teacher || student) + distill_w * token,
    token = MSE over the whole final feature map (no mask). Without a teacher: CE and ratio only.
    """
    cls = classification_loss(outputs.logits, target, smoothing)
    ratio = keep_ratio_loss(outputs.decisions, ratios)  # DynamicViT's, over positions instead of tokens
    total = clf_weight * cls + ratio_weight * ratio / len(ratios)
    kl = tok = cls.new_zeros(())
    if teacher_logits is not None:
        kl = logit_distillation(outputs.logits, teacher_logits)
        tok = ((outputs.featmap - teacher_featmap) ** 2).mean()
        total = total + distill_weight * kl + distill_weight * tok
    return total, {"cls": cls, "ratio": ratio, "kl": kl, "token": tok}


class DynamicHierLoss(nn.Module):
    """DynamicCNN / DynamicSwin training loss with its dense teacher. `forward(images, outputs, target) -> loss`.

    Args:
        teacher: the dense model (frozen, eval mode), or None for classification + ratio only.
        ratios: full-path ratios per predictor (`model.reducer.keep_ratios`).
        clf_weight (1), ratio_weight (10), distill_weight (0.5): main.py's values. smoothing: for integer targets.
    The last parts are kept in `self.last_parts` (detached) for logging.
    """

    def __init__(self, teacher: Optional[nn.Module], ratios: Sequence[float], clf_weight: float = 1.0,
                 ratio_weight: float = 10.0, distill_weight: float = 0.5, smoothing: float = 0.0):
        super().__init__()
        self.teacher = teacher.eval() if teacher is not None else None
        self.ratios = list(ratios)
        self.clf_weight, self.ratio_weight, self.distill_weight = clf_weight, ratio_weight, distill_weight
        self.smoothing = smoothing
        self.last_parts: dict = {}

    @classmethod
    def for_model(cls, model: nn.Module, distill: bool = True, **kwargs) -> "DynamicHierLoss":
        reducer = getattr(model, "reducer", None)
        if not isinstance(reducer, DynamicHier):
            raise ConfigError("DynamicHierLoss.for_model needs a model built with method='dynamiccnn' or 'dynamicswin'")
        return cls(make_dense_teacher(model) if distill else None, reducer.keep_ratios, **kwargs)

    def train(self, mode: bool = True) -> "DynamicHierLoss":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images: Tensor, outputs: DynamicHierOutput, target: Tensor) -> Tensor:
        t_logits, t_feat = dense_teacher_outputs(self.teacher, images) if self.teacher is not None else (None, None)
        total, parts = dynamic_hier_loss(outputs, target, t_logits, t_feat, self.ratios, self.clf_weight,
                                         self.ratio_weight, self.distill_weight, self.smoothing)
        self.last_parts = {k: v.detach() for k, v in parts.items()}
        return total
