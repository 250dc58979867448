"""dynavit: per-image token reduction for vision transformers (DynamicViT, BAT, DiT, EViT, ToMe).

The API for writing a method of your own (docs/writing-a-method.md): `TokenReducer` (the hooks), `TokenState`
(the tokens of one forward), `select_tokens` / `merge_tokens` (the two ways to reduce them) and
`register_method` (or the `dynavit.methods` entry-point group, for a method in another package).
"""
from .checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from .errors import (CheckpointError, CheckpointNotFoundError, ConfigError, DataError, DynavitError, InputError,
                     OutputError, TrainingError, UnknownNameError)
from .flops import count_gmacs
from .metrics import diversity_score
from .recipes import Recipe
from .reduction import TokenReducer
from .registry import (MethodSpec, apply_method, create_model, list_methods, list_models, register_method,
                       register_model, remove_method)
from .tokens import ReductionInfo, TokenState, merge_tokens, select_tokens

__version__ = "0.1.0"

__all__ = [
    "create_model", "apply_method", "remove_method", "list_models", "list_methods", "register_model",
    "register_method", "MethodSpec", "Recipe", "load_checkpoint", "load_state_dict", "save_checkpoint",
    "count_gmacs", "diversity_score", "TokenReducer", "TokenState", "ReductionInfo", "select_tokens",
    "merge_tokens", "DynavitError", "ConfigError", "InputError", "UnknownNameError", "CheckpointError",
    "CheckpointNotFoundError", "DataError", "TrainingError", "OutputError",
]
