"""Options shared by several subcommands (one parser for model / method arguments)."""
from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_model_args(p: argparse.ArgumentParser, model_positional: bool = False, model_required: bool = True) -> None:
    if model_positional:
        p.add_argument("model", help="model name (see `dynavit models`)")
    elif model_required:
        p.add_argument("--model", required=True, help="model name (see `dynavit models`)")
    else:
        p.add_argument("--model", default=None, help="model name (see `dynavit models`; default: the one the "
                       "--checkpoint asset or run directory was made for)")
    p.add_argument("--method", default=None, help="token-reduction method (default: dense)")
    p.add_argument("--keep-rate", type=number(float, ">0"), default=None,
                   help="keep rate in (0, 1] (dynamicvit, evit, bat, ...)")
    p.add_argument("--r", type=number(int, ">=0"), default=None, help="ToMe: tokens merged per block")
    p.add_argument("--budget", type=float, default=None, help="DiT: target fraction of the full routing cost")
    p.add_argument("--img-size", type=number(int, ">0"), default=None, help="input resolution (default: the model's)")
    p.add_argument("--num-classes", type=number(int, ">0"), default=None,
                   help="classifier outputs (default: the model's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other model or method argument (repeatable), e.g. --set prune_locations=[2,5,8]")
    p.add_argument("--pretrained", action="store_true",
                   help="load the released weights of the model (`dynavit models` marks which have them; the "
                        "DynamicViT release for --method dynamicvit at its keep rate)")


def number(kind: type, rule: str = ""):
    """An argparse type: int / float with a bound ('>0', '>=0', '>=1'); bad values are one-line usage errors."""
    op, bound = (rule[:2], rule[2:]) if rule[:2] in (">=", "<=") else (rule[:1], rule[1:])
    limit = float(bound) if bound else None

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if limit is not None and not {">": value > limit, ">=": value >= limit, "<=": value <= limit}[op]:
            raise argparse.ArgumentTypeError(f"must be {op} {bound}, got {text}")
        if kind is float and value != value:
            raise argparse.ArgumentTypeError(f"must be a number, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parse_value(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def model_kwargs(args: argparse.Namespace) -> dict:
    """create_model keyword arguments from the shared options."""
    kw = {}
    if args.keep_rate is not None:
        kw["keep_rate"] = args.keep_rate
    if args.r is not None:
        kw["r"] = args.r
    if args.budget is not None:
        kw["budget"] = args.budget
    if args.img_size is not None:
        kw["img_size"] = args.img_size
    if args.num_classes is not None:
        kw["num_classes"] = args.num_classes
    if getattr(args, "pretrained", False):
        kw["pretrained"] = True
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        kw[key.strip().replace("-", "_")] = parse_value(value.strip())
    return kw


def build_model(args: argparse.Namespace):
    from ..registry import create_model

    return create_model(args.model, method=args.method, **model_kwargs(args))
