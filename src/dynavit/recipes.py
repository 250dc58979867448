"""Training recipes: the hyperparameters of `dynavit train --recipe NAME`.

The generic recipes live here (`dense`: DeiT from scratch; `finetune`: a short dense fine-tune, also the recipe
of any method that brings none); a method's own recipe lives in its module and reaches `dynavit train` through
its spec (`register_method(..., recipe=...)`). Learning rates are given at a reference global batch and scaled
linearly: lr = lr_ref x global / batch_ref (global = per-process batch x processes x accumulation), the rule
DeiT and every method here use; the CLI prints it. Every field can be overridden by a command-line flag.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .errors import unknown_name
from .registry import list_families, list_methods, spec_for


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
    distill: bool = False  # the method's criterion distils from a dense teacher
    backbone_lr_scale: float = 1.0
    head_patterns: tuple = ()  # parameters at the full lr when backbone_lr_scale != 1
    frozen_patterns: tuple = ()  # parameters never trained
    freeze_backbone_epochs: float = 0.0
    freeze_mode: str = "no_grad"  # no_grad | zero_lr (see engine.FREEZE_MODES)
    ema_decay: float = 0.0
    clip_grad: Optional[float] = None
    keep_schedule: Optional[tuple] = None  # (start, length) fractions of training for the keep-rate cosine
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient in a step (gated models)

    def scaled_lr(self, global_batch: int, lr: Optional[float] = None) -> tuple:
        """(scaled lr, the rule as text)."""
        base = self.lr if lr is None else lr
        scaled = base * global_batch / self.lr_batch
        return scaled, f"lr = {base:g} x global batch {global_batch} / {self.lr_batch} = {scaled:.3g}"


GENERIC = {r.name: r for r in [
    Recipe("dense", "DeiT from scratch: 300 epochs, AdamW, lr 5e-4 x B/512, cosine, warm-up 5, full DeiT augmentation",
           epochs=300, lr=5e-4, lr_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05),
    Recipe("finetune", "dense fine-tune (DeiT at a new resolution / dataset), and the recipe of a method without "
           "one: 30 epochs, lr 5e-6 x B/512, wd 1e-8", epochs=30, lr=5e-6, lr_batch=512, min_lr=1e-6,
           warmup_epochs=0, weight_decay=1e-8),
]}


def all_recipes() -> dict:
    """{name: Recipe}: the generic ones and every registered method's and model family's."""
    found = dict(GENERIC)
    for spec in [*list_methods().values(), *list_families().values()]:
        for recipe in (spec.recipe, *spec.recipes):
            if recipe is not None:
                found.setdefault(recipe.name, recipe)
    return found


def get_recipe(name: Optional[str] = None, method: Optional[str] = None, model: Optional[str] = None) -> Recipe:
    """The named recipe, or the default: the recipe of `method` (or of `model`'s family), the generic
    fine-tune for a method that has none, the dense recipe for a plain dense model."""
    recipes = all_recipes()
    if name is None:
        spec = spec_for(model or "", method)
        if spec is None:
            return recipes["dense"]
        return spec.recipe or recipes["finetune"]
    if name not in recipes:
        raise unknown_name("recipe", name, recipes)
    return recipes[name]


def override(recipe: Recipe, **changes) -> Recipe:
    """A copy with the non-None `changes` applied."""
    return replace(recipe, **{k: v for k, v in changes.items() if v is not None})
