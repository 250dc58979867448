"""Training and evaluation: the engine behind `dynavit train` / `dynavit eval`, criteria, DDP (recipes:
`dynavit.recipes`)."""
from ..recipes import Recipe, get_recipe
from .criterion import ClassificationCriterion, build_criterion
from .engine import TrainConfig, Trainer
from .evaluate import evaluate

__all__ = ["Trainer", "TrainConfig", "evaluate", "build_criterion", "ClassificationCriterion", "Recipe",
           "get_recipe"]
