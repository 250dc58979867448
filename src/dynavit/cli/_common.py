"""Options shared by several subcommands (one parser for model / method arguments)."""
from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_model_args(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    if model_positional:
        p.add_argument("model", help="model name (see `dynavit models`)")
    else:
        p.add_argument("--model", required=True, help="model name (see `dynavit models`)")
    p.add_argument("--method", default=None, help="token-reduction method (default: dense)")
    p.add_argument("--keep-rate", type=float, default=None, help="keep rate in (0, 1] (dynamicvit, evit, bat, ...)")
    p.add_argument("--r", type=int, default=None, help="ToMe: tokens merged per block")
    p.add_argument("--budget", type=float, default=None, help="DiT: target fraction of the full routing cost")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other model or method argument (repeatable), e.g. --set prune_locations=[2,5,8]")


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
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        kw[key.strip().replace("-", "_")] = parse_value(value.strip())
    return kw


def build_model(args: argparse.Namespace):
    from ..registry import create_model

    return create_model(args.model, method=args.method, **model_kwargs(args))
