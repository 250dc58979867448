"""Training and evaluation: the engine behind `dynavit train` / `dynavit eval`, the papers' recipes, DDP."""
from .criterion import ClassificationCriterion, build_criterion
from .engine import TrainConfig, Trainer
from .evaluate import evaluate
from .recipes import RECIPES, Recipe, get_recipe

__all__ = ["Trainer", "TrainConfig", "evaluate", "build_criterion", "ClassificationCriterion", "RECIPES", "Recipe",
           "get_recipe"]
