"""Registries of backbones, token-reduction methods and model families, and `create_model` (timm-style).

Backbones register a constructor with `@register_model`. Methods register an `apply(model, **params)` with
`@register_method(name, params=..., ...)`, which stores a `MethodSpec`: everything generic code (bench, flops,
train, eval, viz, export, the CLI) asks about a method. A model family that is its own reduction (DiT) registers
a `FamilySpec`. Every module in `dynavit.models` and `dynavit.methods` is imported on first use, and so is every
module named by an entry point of the group `dynavit.methods` (methods in other packages,
docs/writing-a-method.md). Registering a second, different entry under a taken name is refused unless
`override=True` (then it warns).
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
import pkgutil
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from torch import nn

from .checkpoint import load_checkpoint
from .errors import ConfigError, unknown_name
from .pretrained import load_pretrained, select

if TYPE_CHECKING:
    from .recipes import Recipe

ENTRY_POINT_GROUP = "dynavit.methods"
_MODELS: dict[str, Callable[..., nn.Module]] = {}
_METHODS: dict[str, "MethodSpec"] = {}
_FAMILIES: dict[str, "FamilySpec"] = {}
_loaded = False


@dataclass
class Spec:
    """What generic code needs to know about a reduction (a method, or a model family such as DiT)."""

    name: str
    params: tuple = ()  # keyword arguments it takes
    doc: str = ""
    primary: Optional[str] = None  # the parameter a SPEC's VALUE sets (`evit:0.7` -> keep_rate); None: params[0]
    recipe: Optional["Recipe"] = None  # its training recipe; None: the generic fine-tune recipe
    recipes: tuple = ()  # its other recipes (e.g. from scratch), chosen by name with --recipe
    criterion: Optional[Callable[..., nn.Module]] = None  # criterion(model, smoothing=, distill=); None: CE
    info_fields: dict = field(default_factory=dict)  # info.extra key -> what it holds (`dynavit info` lists them)

    def __post_init__(self):
        if self.primary is None and self.params:
            self.primary = self.params[0]
        if self.primary is not None and self.primary not in self.params:
            raise ConfigError(f"{self.name}: primary parameter {self.primary!r} is not one of its params "
                              f"{list(self.params)}")

    def label(self, params: dict) -> str:
        """'evit:0.7' for keep_rate=0.7: the name and the primary parameter's value, as a bench SPEC writes it."""
        value = params.get(self.primary) if self.primary else None
        if value is None:
            return self.name
        return f"{self.name}:{value:g}" if isinstance(value, float) else f"{self.name}:{value}"


@dataclass
class MethodSpec(Spec):
    """A token-reduction method: `apply(model, **params)` attaches its `TokenReducer` (and learned parts)."""

    apply: Optional[Callable[..., nn.Module]] = None
    families: tuple = ("vit",)  # model families it supports (model.family)
    attention_extras: tuple = ()  # what its attention_args may ask for: need_cls_attn, need_keys, attn_bias, attend
    identity: Optional[dict] = None  # parameters at which it reduces nothing (the contract tests: == dense)


@dataclass
class FamilySpec(Spec):
    """A model family that is its own reduction (DiT): a SPEC `NAME:VALUE` selects the family's twin model."""

    owns: Callable[[str], bool] = lambda name: False  # is this registered model one of the family's?
    model_for: Optional[Callable[[str], str]] = None  # --model NAME -> the family's model (ConfigError if none)
    dense_for: Optional[Callable[[str], str]] = None  # one of its models -> the dense twin


def _origin(obj) -> str:
    fn = getattr(obj, "apply", None) or getattr(obj, "model_for", None) or obj
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _store(table: dict, kind: str, name: str, entry, override: bool) -> None:
    old = table.get(name)
    if old is not None and _origin(old) != _origin(entry):  # the same definition again (a reload) is fine
        if not override:
            raise ConfigError(f"{kind} {name!r} is already registered (by {_origin(old)}); choose another name, "
                              f"or pass override=True to replace it")
        warnings.warn(f"{kind} {name!r} from {_origin(old)} replaced by {_origin(entry)}", stacklevel=3)
    table[name] = entry


def register_model(fn: Callable[..., nn.Module] = None, *, override: bool = False):
    """Register a backbone constructor under its function name (usable as `@register_model`)."""
    if fn is None:
        return lambda f: register_model(f, override=override)
    _store(_MODELS, "model", fn.__name__, fn, override)
    return fn


def register_method(name: str, params: tuple = (), families: tuple = ("vit",), doc: str = "",
                    override: bool = False, **spec):
    """Register `apply(model, **params)` as token-reduction method `name` (a decorator).

    spec: the other `MethodSpec` fields: primary, recipe, recipes, criterion, attention_extras, info_fields,
    identity.
    """
    def deco(fn):
        entry = MethodSpec(name, tuple(params), doc or (fn.__doc__ or "").strip(), apply=fn,
                           families=tuple(families), **spec)
        _store(_METHODS, "method", name, entry, override)
        return fn

    return deco


def register_model_family(entry: FamilySpec, override: bool = False) -> FamilySpec:
    """Register a model family that is its own reduction (see `FamilySpec`)."""
    _store(_FAMILIES, "model family", entry.name, entry, override)
    return entry


def load_plugins() -> list:
    """Import every module named by a `dynavit.methods` entry point; returns their names. A plugin that fails to
    import is skipped with a warning (the built-in methods keep working)."""
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
            loaded.append(ep.value)
        except Exception as e:  # noqa: BLE001 - any failure of a third-party module
            warnings.warn(f"dynavit: method plugin {ep.name!r} ({ep.value}) could not be loaded: "
                          f"{type(e).__name__}: {e}", stacklevel=2)
    return loaded


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
    load_plugins()


def list_models() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def list_methods() -> dict[str, MethodSpec]:
    _load_all()
    return dict(sorted(_METHODS.items()))


def list_families() -> dict[str, FamilySpec]:
    _load_all()
    return dict(sorted(_FAMILIES.items()))


def get_method(name: str) -> MethodSpec:
    _load_all()
    if name not in _METHODS:
        raise unknown_name("method", name, _METHODS)
    return _METHODS[name]


def get_spec(name: str) -> Spec:
    """A method's or a model family's spec by name (bench SPECs name either)."""
    _load_all()
    if name in _METHODS:
        return _METHODS[name]
    if name in _FAMILIES:
        return _FAMILIES[name]
    raise unknown_name("method", name, ["dense", *_METHODS, *_FAMILIES])


def family_of(model_name: str) -> Optional[FamilySpec]:
    """The family spec owning registered model `model_name` (e.g. DiT's for 'dit_b0'), or None."""
    _load_all()
    return next((f for f in _FAMILIES.values() if f.owns(model_name)), None)


def spec_for(model_name: str, method: Optional[str]) -> Optional[Spec]:
    """The spec that governs a model built as `create_model(model_name, method=method)` (None: plain dense)."""
    if method is not None and method != "dense":
        return get_method(method)
    return family_of(model_name)


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


def remove_method(model: nn.Module) -> nn.Module:
    """Detach what `apply_method` attached: the reducer and every module the method registered on the model."""
    for name in getattr(model, "method_modules", ()):
        if name in model._modules:
            delattr(model, name)
    model.method_modules, model.method_state_keys = (), ()
    model.method_name = None
    if getattr(model, "reducer", None) is not None:
        model.reducer = None
    return model


def apply_method(model: nn.Module, method: str, **params) -> nn.Module:
    """Attach token-reduction `method` to an existing (possibly already loaded) dense model.

    A model that already has a method is refused (one clear error); `remove_method(model)` first detaches it
    with every module it registered, so the state dict then holds only the new method's keys.
    """
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
                          f"dense model only (build a fresh one, dynavit.remove_method(model) first, or change the "
                          f"running method's setting, e.g. model.reducer.set_keep_rate)")
    before, before_modules = set(model.state_dict()), set(model._modules)
    model = spec.apply(model, **params)
    # the method's own tensors (DynamicViT's predictors): a dense checkpoint cannot hold them
    model.method_state_keys = tuple(k for k in model.state_dict() if k not in before)
    model.method_modules = tuple(n for n in model._modules if n not in before_modules)
    model.method_name = spec.name
    return model


def create_model(name: str, method: Optional[str] = None, checkpoint: Optional[str] = None,
                 pretrained: bool = False, **kwargs) -> nn.Module:
    """Build backbone `name` (kwargs override its architecture) with an optional token-reduction `method`.

    Args:
        name: a registered model (`dynavit.list_models()`), e.g. 'deit_small_patch16_224', 'lvvit_s', 'vit'.
        method: None for the dense model, or a registered method (`dynavit.list_methods()`).
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
        keep = method_kwargs.get("keep_rate")
        if keep is None and method not in (None, "dense"):  # the method's default keep rate
            param = inspect.signature(get_method(method).apply).parameters.get("keep_rate")
            keep = None if param is None or param.default is inspect.Parameter.empty else param.default
        load_pretrained(model, select(name, method, keep))
    if checkpoint is not None:
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
