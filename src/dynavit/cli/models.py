"""`dynavit models`: list registered backbones (marking those with released weights) and methods."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list models and methods")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pretrained import TWINS, weights_for
    from ..registry import list_methods, list_models

    print("models (* = released weights: create_model(name, pretrained=True) / --pretrained):")
    for name in list_models():
        found = weights_for(name)
        mark = "*" if found else " "
        where = "; ".join(f"{w.tag}: {w.label}" for w in found)
        if name in TWINS and found:
            where = f"its PVTv2 twin's ({where}; gates fresh)"
        print(f"  {mark} {name:<34} {where}".rstrip())
    print("methods:")
    for name, spec in list_methods().items():
        summary = spec.doc.splitlines()[0] if spec.doc else ""
        print(f"  {name:<12} params: {', '.join(spec.params) or '-':<40} {summary}")
    return 0
