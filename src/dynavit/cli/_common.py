"""Options and helpers shared by several subcommands (one parser for model / method arguments)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import OutputError
from ..options import parse_assignments
from .. import registry


def add_model_args(p: argparse.ArgumentParser, model_positional: bool = False, model_required: bool = True) -> None:
    if model_positional:
        p.add_argument("model", help="model name (see `dynavit models`)")
    elif model_required:
        p.add_argument("--model", required=True, help="model name (see `dynavit models`)")
    else:
        p.add_argument("--model", default=None, help="model name (see `dynavit models`; default: the one the "
                       "--checkpoint asset or run directory was made for)")
    p.add_argument("--method", default=None, help="token-reduction method (default: dense; see `dynavit models`)")
    p.add_argument("--keep-rate", type=number(float, ">0"), default=None,
                   help="keep rate in (0, 1], for methods that take one")
    p.add_argument("--r", type=number(int, ">=0"), default=None, help="tokens merged per block, for methods that take r")
    p.add_argument("--budget", type=float, default=None,
                   help="target fraction of the dense cost, for models that take a budget")
    p.add_argument("--img-size", type=number(int, ">0"), default=None, help="input resolution (default: the model's)")
    p.add_argument("--num-classes", type=number(int, ">0"), default=None,
                   help="classifier outputs (default: the model's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other model or method argument (repeatable), e.g. --set prune_locations=[2,5,8]")
    p.add_argument("--pretrained", action="store_true",
                   help="load the released weights of the model (`dynavit models` marks which have them; a "
                        "method's own release where one matches --method and its keep rate)")


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


def model_kwargs(args: argparse.Namespace) -> dict:
    """create_model keyword arguments from the shared options."""
    named = {"keep_rate": args.keep_rate, "r": args.r, "budget": args.budget, "img_size": args.img_size,
             "num_classes": args.num_classes, "pretrained": getattr(args, "pretrained", False) or None}
    return {**{k: v for k, v in named.items() if v is not None}, **parse_assignments(args.set)}


def build_model(args: argparse.Namespace, **overrides):
    return registry.create_model(args.model, method=args.method, **{**model_kwargs(args), **overrides})


def label(args: argparse.Namespace) -> str:
    """'MODEL + NAME:0.7' / 'MODEL (dense)': how the CLI names a model and its method."""
    spec = registry.spec_for(args.model, args.method)
    if spec is None or args.method in (None, "dense"):
        return f"{args.model} (dense)" if spec is None else args.model
    return f"{args.model} + {spec.label(model_kwargs(args))}"


def check_output_file(path: Path) -> None:
    """An output file must be writable: its folder exists or can be made (by the writer, later: a command that
    then fails on its other arguments leaves no folder behind) and accepts a new file."""
    if path.is_dir():
        raise OutputError(f"--output {str(path)!r} is a folder; give a file name such as {str(path / 'tokens.png')!r}")
    folder = path.parent if str(path.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create the folder of --output {str(path)!r}: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write --output {str(path)!r}: permission denied (choose another folder)")
