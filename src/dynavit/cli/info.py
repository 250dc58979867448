"""`dynavit info MODEL [--method M --keep-rate R]`: parameters, GMACs, tokens per stage and the info fields."""
from __future__ import annotations

import inspect

import torch

from ..flops import count_gmacs
from ..registry import spec_for
from ._common import add_model_args, build_model, label


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameters, GMACs and tokens per stage of a model")
    add_model_args(p, model_positional=True)
    p.set_defaults(func=run)


def run(args) -> int:
    model = build_model(args).eval()
    params = sum(p.numel() for p in model.parameters())
    size = getattr(model, "img_size", 224)
    x = torch.randn(1, getattr(model, "in_chans", 3), size, size)
    info = None  # models without token bookkeeping (PVTv2, demo_cnn) take no return_info
    if "return_info" in inspect.signature(model.forward).parameters:
        with torch.no_grad():
            _, info = model(x, return_info=True)
    gmacs = count_gmacs(model, x)
    print(f"model:      {label(args)}")
    if getattr(model, "reducer", None) is not None:
        print(f"method:     {model.reducer!r}")
    print(f"params:     {params / 1e6:.2f} M")
    print(f"input:      {size}x{size}")
    print(f"GMACs:      {gmacs:.3f}")
    if info is None:
        return 0
    n = getattr(model, "num_patches", None)
    counts = list(info.token_counts)
    if n is not None:
        print(f"tokens:     {n} patches" + (f" -> per stage {' / '.join(str(c) for c in counts)}" if counts else
                                            " (no reduction)"))
    for line in getattr(model, "info_lines", lambda info: [])(info):  # a model family's own report
        print(line)
    spec = spec_for(args.model, args.method)
    fields = spec.info_fields if spec is not None else {}
    for key in info.extra:
        print(f"info.extra  {key}: {fields.get(key, '(undocumented)')}")
    return 0
