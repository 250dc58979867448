"""`KEY=VALUE` options: the one parser behind the CLI's `--set` and the `,KEY=VALUE` parts of a bench SPEC."""
from __future__ import annotations

import ast
from typing import Iterable

from .errors import ConfigError


def parse_value(text: str):
    """A Python literal (`0.7`, `[3, 6, 9]`, `'dpc'`, `None`), or the text itself when it is not one."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignment(item: str, what: str = "--set") -> tuple:
    """`'KEY=VALUE'` -> (key with dashes as underscores, parsed value); ConfigError naming `item` otherwise."""
    key, eq, value = str(item).partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise ConfigError(f"{what} expects KEY=VALUE, got {item!r}")
    return key, parse_value(value.strip())


def parse_assignments(items: Iterable[str], what: str = "--set") -> dict:
    """A list of `KEY=VALUE` strings -> {key: value} (later ones win)."""
    return dict(parse_assignment(item, what) for item in items)
