"""Training recipes from the papers (METHODS sections 3-7), as presets of `dynavit train --recipe NAME`.

Learning rates are given at a reference global batch and scaled linearly: lr = lr_ref x global / batch_ref
(global = per-process batch x processes x accumulation), the rule DeiT and every method here use; the CLI
prints it. Every field can be overridden by a command-line flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..errors import unknown_name


@dataclass(frozen=True)
class Recipe:
    name: str
    doc: str
    epochs: float
    lr: float  # peak lr at the reference global batch `lr_batch`
    lr_batch: int
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    warmup_start: float = 1e-6  # lr at the first warm-up step
    warmup_style: str = "linear"  # linear | linspace (see optim.cosine_lr)
    augment: str = "deit"  # deit | light | none (see data.transforms.AugmentConfig)
    criterion: str = "classification"  # classification | dynamicvit | dynamic_hier | budget
    distill: bool = False  # DynamicViT: dense teacher distillation
    backbone_lr_scale: float = 1.0
    head_patterns: tuple = ()
    frozen_patterns: tuple = ()
    freeze_backbone_epochs: float = 0.0
    freeze_mode: str = "no_grad"  # no_grad | zero_lr (see engine.FREEZE_MODES)
    ema_decay: float = 0.0
    clip_grad: Optional[float] = None
    keep_schedule: Optional[tuple] = None  # (start, length) fractions of training for the keep-rate cosine
    budget_start: float = 0.4  # DiT: budget loss switched on after this fraction of training
    method: Optional[str] = None  # the method this recipe is for (informative; --method chooses)
    extra: dict = field(default_factory=dict)

    def scaled_lr(self, global_batch: int, lr: Optional[float] = None) -> tuple:
        """(scaled lr, the rule as text)."""
        base = self.lr if lr is None else lr
        scaled = base * global_batch / self.lr_batch
        return scaled, f"lr = {base:g} x global batch {global_batch} / {self.lr_batch} = {scaled:.3g}"


# EViT trains 300 epochs with the keep rate at 1 for 10 epochs, then a cosine to rho over 100 epochs; its
# fine-tune keeps rho from the first step (shrink_start_epoch 0, shrink_epochs 0).
_EVIT_SCHEDULE = (10 / 300, 100 / 300)
# BAT from scratch (paper Sec. 5.1): "the keep rate decreases from 1 to the target over 100 epochs" of 300.
_BAT_SCHEDULE = (0.0, 100 / 300)

RECIPES = {r.name: r for r in [
    Recipe("dense", "DeiT from scratch: 300 epochs, AdamW, lr 5e-4 x B/512, cosine, warm-up 5, full DeiT augmentation",
           epochs=300, lr=5e-4, lr_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05),
    Recipe("finetune", "dense fine-tune (DeiT at a new resolution / dataset): 30 epochs, lr 5e-6 x B/512, wd 1e-8",
           epochs=30, lr=5e-6, lr_batch=512, min_lr=1e-6, warmup_epochs=0, weight_decay=1e-8),
    Recipe("dynamicvit", "DynamicViT, as the authors' current release (commit 1322e62): 30 epochs from a "
           "pretrained dense model, lr 1e-3 x B/1024, warm-up 5 epochs from lr 0 (np.linspace per step), backbone "
           "lr x 0.01 and lr 0 for 5 epochs (AdamW still steps it), cls_token / pos_embed fixed, dense teacher "
           "distillation, EMA 0.9999", epochs=30, lr=1e-3, lr_batch=1024, min_lr=1e-6, warmup_epochs=5,
           weight_decay=0.05, warmup_start=0.0, warmup_style="linspace", criterion="dynamicvit", distill=True,
           backbone_lr_scale=0.01, head_patterns=("score_predictor.*",), frozen_patterns=("cls_token", "pos_embed"),
           freeze_backbone_epochs=5, freeze_mode="zero_lr", ema_decay=0.9999, method="dynamicvit"),
    *[Recipe(name, f"{label} (TPAMI, the authors' README; METHODS 3.4): 120 epochs from a pretrained dense model, "
             "lr 4e-3 x B/4096, warm-up 20, backbone lr x 0.2 and frozen for 5 epochs, dense teacher distillation "
             "(ratio weight 10, token MSE), EMA 0.9999; the authors also set drop path 0.2 (0.5 for -B): "
             "--set drop_path_rate=0.2", epochs=120, lr=4e-3, lr_batch=4096, min_lr=1e-6, warmup_epochs=20,
             weight_decay=0.05, criterion="dynamic_hier", distill=True, backbone_lr_scale=0.2,
             head_patterns=("score_predictor.*", "*.score_predictor.*", "*fast_path*", "*fastmlp*"),
             freeze_backbone_epochs=5, ema_decay=0.9999, method=name)
      for name, label in (("dynamiccnn", "DynamicCNN"), ("dynamicswin", "DynamicSwin"))],
    Recipe("evit", "EViT fine-tune (BAT paper's 30-epoch recipe): lr 2e-5 x B/512, min 2e-6, wd 1e-6, keep-rate "
           "cosine 1 -> rho", epochs=30, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6,
           keep_schedule=_EVIT_SCHEDULE, method="evit"),
    Recipe("bat", "BAT fine-tune from a pretrained DeiT (the authors' logs for rho 0.2-0.6): 30 epochs, lr 4e-5 "
           "at batch 1024 (= 2e-5 x B/512), cosine to 2e-6, no warm-up, wd 1e-6, keep rate rho from the first step "
           "(EViT's fine-tune)", epochs=30, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6,
           method="bat"),
    Recipe("bat_scratch", "BAT from scratch (paper Sec. 5.1, the authors' rho 0.7 log): DeiT's 300 epochs, lr "
           "5e-4 x B/512, warm-up 5, min 1e-5, wd 0.05, keep rate 1 -> rho by cosine over the first 100 epochs",
           epochs=300, lr=5e-4, lr_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
           keep_schedule=_BAT_SCHEDULE, method="bat"),
    Recipe("tome", "ToMe fine-tune (off the shelf needs no training: use `dynavit eval`): the EViT/BAT fine-tune "
           "hyperparameters with a fixed r", epochs=30, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0,
           weight_decay=1e-6, method="tome"),
    Recipe("dit", "DiT (METHODS 7, docs/dit.md): DeiT schedule, budget loss switched on after 40% of training; "
           "lr 1e-2 x B/512 is the gates', the backbone's is x 0.05 (DeiT's 5e-4)",
           epochs=300, lr=1e-2, lr_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
           criterion="budget", budget_start=0.4, backbone_lr_scale=0.05, head_patterns=("gates.*",), method="dit"),
]}

# `--recipe` defaults from `--method`
METHOD_RECIPE = {None: "dense", "dense": "dense", "dynamicvit": "dynamicvit", "evit": "evit", "bat": "bat",
                 "tome": "tome", "dit": "dit", "topk": "evit", "random": "evit",
                 "dynamiccnn": "dynamiccnn", "dynamicswin": "dynamicswin"}


def get_recipe(name: Optional[str], method: Optional[str] = None, model: Optional[str] = None) -> Recipe:
    """The named recipe, or the default for `method` (DiT models `dit_*` default to the 'dit' recipe)."""
    if name is None:
        if model is not None and str(model).startswith("dit"):
            name = "dit"
        else:
            name = METHOD_RECIPE.get(method, "finetune")
    if name not in RECIPES:
        raise unknown_name("recipe", name, RECIPES)
    return RECIPES[name]


def override(recipe: Recipe, **changes) -> Recipe:
    """A copy with the non-None `changes` applied."""
    return replace(recipe, **{k: v for k, v in changes.items() if v is not None})
