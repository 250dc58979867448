"""dynavit: per-image token reduction for vision transformers (DynamicViT, BAT, DiT, EViT, ToMe)."""
from .checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from .errors import (CheckpointError, CheckpointNotFoundError, ConfigError, DataError, DynavitError, InputError,
                     OutputError, TrainingError, UnknownNameError)
from .flops import count_gmacs
from .metrics import diversity_score
from .reduction import TokenReducer
from .registry import apply_method, create_model, list_methods, list_models, register_method, register_model
from .tokens import ReductionInfo, TokenState

__version__ = "0.1.0"

__all__ = [
    "create_model", "apply_method", "list_models", "list_methods", "register_model", "register_method",
    "load_checkpoint", "load_state_dict", "save_checkpoint", "count_gmacs", "diversity_score",
    "TokenReducer", "TokenState", "ReductionInfo", "DynavitError", "ConfigError", "InputError",
    "UnknownNameError", "CheckpointError", "CheckpointNotFoundError", "DataError", "TrainingError",
    "OutputError",
]
