"""Registries of backbones and token-reduction methods, and `create_model` (timm-style).

Backbones register a constructor with `@register_model`; methods register an `apply(model, **params)` with
`@register_method(name, params=..., families=...)`. Every module in `dynavit.models` and `dynavit.methods` is
imported on first use, so a new file registers itself.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .errors import ConfigError, unknown_name

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_METHODS: dict[str, "MethodSpec"] = {}
_loaded = False


@dataclass
class MethodSpec:
    name: str
    apply: Callable[..., nn.Module]  # apply(model, **params) -> model with the method attached
    params: tuple  # keyword arguments the method takes (the rest of create_model's kwargs go to the backbone)
    families: tuple  # model families it supports (model.family)
    doc: str = ""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a backbone constructor under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def register_method(name: str, params: tuple = (), families: tuple = ("vit",), doc: str = ""):
    """Register `apply(model, **params)` as token-reduction method `name`."""

    def deco(fn):
        _METHODS[name] = MethodSpec(name, fn, tuple(params), tuple(families), doc or (fn.__doc__ or "").strip())
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in ("dynavit.models", "dynavit.methods"):
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{mod.name}")


def list_models() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def list_methods() -> dict[str, MethodSpec]:
    _load_all()
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> MethodSpec:
    _load_all()
    if name not in _METHODS:
        raise unknown_name("method", name, _METHODS)
    return _METHODS[name]


def _call_checked(fn: Callable, what: str, kwargs: dict):
    sig = inspect.signature(fn)
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if not accepts_any:
        bad = [k for k in kwargs if k not in sig.parameters]
        if bad:
            allowed = [p for p in sig.parameters if p != "model"]
            raise ConfigError(f"{what} got unknown argument(s) {bad}; it accepts {allowed}")
    try:
        return fn(**kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ConfigError(f"{what}: {e}") from None
        raise


def apply_method(model: nn.Module, method: str, **params) -> nn.Module:
    """Attach token-reduction `method` to an existing (possibly already loaded) model."""
    spec = get_method(method)
    family = getattr(model, "family", None)
    if family not in spec.families:
        raise ConfigError(f"method {method!r} does not support model {getattr(model, 'model_name', family)!r} "
                          f"(family {family!r}); it supports families {list(spec.families)}")
    bad = [k for k in params if k not in spec.params]
    if bad:
        raise ConfigError(f"method {method!r} got unknown argument(s) {bad}; it accepts {list(spec.params)}")
    current = getattr(model, "reducer", None)
    if current is not None:
        raise ConfigError(f"model {getattr(model, 'model_name', type(model).__name__)!r} already has method "
                          f"{getattr(current, 'name', type(current).__name__)!r}; apply_method attaches a method to a "
                          f"dense model only (build a fresh one, or change the running method's setting, e.g. "
                          f"model.reducer.set_keep_rate)")
    before = set(model.state_dict())
    model = spec.apply(model, **params)
    # the method's own tensors (DynamicViT's predictors): a dense checkpoint cannot hold them
    model.method_state_keys = tuple(k for k in model.state_dict() if k not in before)
    return model


def create_model(name: str, method: Optional[str] = None, checkpoint: Optional[str] = None,
                 pretrained: bool = False, **kwargs) -> nn.Module:
    """Build backbone `name` (kwargs override its architecture) with an optional token-reduction `method`.

    Args:
        name: a registered model (`dynavit.list_models()`), e.g. 'deit_small_patch16_224', 'lvvit_s', 'vit'.
        method: None for the dense model, or a registered method ('dynamicvit', 'evit', 'bat', 'tome', ...).
        checkpoint: optional path loaded strictly with `load_checkpoint` after the method is attached.
        pretrained: load the released weights of `name` (`dynavit.pretrained`; `dynavit models` lists them):
            the authors' DynamicViT checkpoint when `method='dynamicvit'` and the keep rate match a release,
            else the dense backbone's. A different `num_classes` keeps a fresh classifier.
        **kwargs: the method's parameters (e.g. keep_rate) and architecture overrides (e.g. num_classes).
    """
    _load_all()
    if name not in _MODELS:
        raise unknown_name("model", name, _MODELS)
    method_kwargs = {}
    if method is not None and method != "dense":
        spec = get_method(method)
        method_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in spec.params}
    try:
        model = _call_checked(_MODELS[name], f"model {name!r}", kwargs)
    except ConfigError as e:
        raise _explain_unknown_kwarg(e, name, method, kwargs) from None
    model.model_name = name
    if method is not None and method != "dense":
        model = apply_method(model, method, **method_kwargs)
    if pretrained:
        from .pretrained import load_pretrained, select

        keep = method_kwargs.get("keep_rate")
        if keep is None and method not in (None, "dense"):  # the method's default keep rate
            param = inspect.signature(get_method(method).apply).parameters.get("keep_rate")
            keep = None if param is None or param.default is inspect.Parameter.empty else param.default
        load_pretrained(model, select(name, method, keep))
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model


def _backbone_params(name: str) -> list:
    """The architecture arguments backbone `name` accepts (from its constructor's class), or [] if unknown."""
    import typing

    fn = _MODELS[name]
    try:
        cls = typing.get_type_hints(fn).get("return")
        params = inspect.signature(cls.__init__).parameters if isinstance(cls, type) else {}
    except Exception:  # noqa: BLE001 - only used to word an error message
        return []
    return [p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]


def _explain_unknown_kwarg(error: ConfigError, name: str, method: Optional[str], kwargs: dict) -> ConfigError:
    """An 'unexpected keyword argument' from a backbone, reworded: which method takes it, what is accepted."""
    import difflib
    import re

    m = re.search(r"unexpected keyword argument '(\w+)'", str(error)) or re.search(r"unknown argument\(s\) \['(\w+)'",
                                                                                   str(error))
    if not m:
        return error
    key = m.group(1)
    method = None if method in (None, "dense") else method
    owners = sorted(n for n, spec in _METHODS.items() if key in spec.params and n != method)
    what = f"model {name!r}" + (f" + method {method!r}" if method else " (dense, no method)")
    model_params = _backbone_params(name)
    method_params = list(get_method(method).params) if method else []
    if owners:
        msg = f"{what} does not take {key!r}: it is a parameter of method(s) {', '.join(owners)}"
        if not method:
            msg += f" (pass --method / method=, e.g. {owners[0]!r})"
    else:
        close = difflib.get_close_matches(key, method_params + model_params, n=2, cutoff=0.6)
        msg = f"{what} got unknown argument {key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)"
                                                         if close else "")
    if method:
        msg += f"; method {method!r} accepts {method_params}"
    if model_params:
        msg += f"; the model accepts {model_params}"
    return ConfigError(msg)
