"""`dynavit models`: list registered backbones and token-reduction methods."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list models and methods")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..registry import list_methods, list_models

    print("models:")
    for name in list_models():
        print(f"  {name}")
    print("methods:")
    for name, spec in list_methods().items():
        summary = spec.doc.splitlines()[0] if spec.doc else ""
        print(f"  {name:<12} params: {', '.join(spec.params) or '-':<40} {summary}")
    return 0
