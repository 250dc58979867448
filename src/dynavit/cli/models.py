"""`dynavit models`: list registered backbones (marking those with released weights), token-reduction methods,
model families and recipes."""
from __future__ import annotations

from ..pretrained import TWINS, weights_for
from ..recipes import all_recipes
from ..registry import list_families, list_methods, list_models


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list models, methods and recipes")
    p.set_defaults(func=run)


def _summary(doc: str) -> str:
    return doc.splitlines()[0] if doc else ""


def run(args) -> int:
    print("models (* = released weights: create_model(name, pretrained=True) / --pretrained):")
    for name in list_models():
        found = weights_for(name)
        mark = "*" if found else " "
        where = "; ".join(f"{w.tag}: {w.label}" for w in found)
        if name in TWINS and found:
            where = f"its twin {TWINS[name]}'s ({where}; its own parts fresh)"
        print(f"  {mark} {name:<34} {where}".rstrip())
    print("methods (SPEC NAME:VALUE sets the first parameter):")
    for name, spec in list_methods().items():
        recipe = spec.recipe.name if spec.recipe else "finetune"
        print(f"  {name:<12} params: {', '.join(spec.params) or '-':<40} recipe: {recipe:<10} {_summary(spec.doc)}")
    families = list_families()
    if families:
        print("model families (SPEC NAME:VALUE builds the family's twin of --model):")
        for name, spec in families.items():
            print(f"  {name:<12} params: {', '.join(spec.params) or '-':<40} {_summary(spec.doc)}")
    print("recipes:")
    for name, recipe in all_recipes().items():
        print(f"  {name:<12} {recipe.doc}")
    return 0
