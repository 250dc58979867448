"""`dynavit info MODEL [--method M --keep-rate R]`: parameters, GMACs and tokens per stage."""
from __future__ import annotations

import torch

from ._common import add_model_args, build_model


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameters, GMACs and tokens per stage of a model")
    add_model_args(p, model_positional=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..flops import count_gmacs

    model = build_model(args).eval()
    params = sum(p.numel() for p in model.parameters())
    size = getattr(model, "img_size", 224)
    x = torch.randn(1, getattr(model, "in_chans", 3), size, size)
    with torch.no_grad():
        _, info = model(x, return_info=True)
    gmacs = count_gmacs(model, x)
    print(f"model:      {args.model}" + (f" + {args.method}" if args.method else " (dense)"))
    if getattr(model, "reducer", None) is not None:
        print(f"method:     {model.reducer!r}")
    print(f"params:     {params / 1e6:.2f} M")
    print(f"input:      {size}x{size}")
    print(f"GMACs:      {gmacs:.3f}")
    summary = getattr(model, "cost_summary", None)
    if callable(summary):  # DiT: the routing space's costs next to the budget (docs/dit.md)
        c = summary()
        print(f"routing:    full space {c['space']:.4g} GMACs | PVTv2 route (twin) {c['twin']:.4g} | "
              f"budget {c['budget']:g} x twin = {c['budgeted']:.4g}")
        print(f"            this model's gates on one random image: {float(info.extra['gmacs'][0]):.4g} GMACs")
        st = info.extra["scale_tokens"][0]  # (columns, 4): tokens that ran a block
        for k in range(4):
            cols = [j for j, s in enumerate(model.stage_of) if s == k]
            print(f"            stage {k + 1} ({len(cols)} columns), block runs per stride 4/8/16/32: "
                  + " / ".join(str(int(v)) for v in st[cols].sum(0)))
        return 0
    n = getattr(model, "num_patches", None)
    counts = list(info.token_counts)
    print(f"tokens:     {n} patches" + (f" -> per stage {' / '.join(str(c) for c in counts)}" if counts else
                                        " (no reduction)"))
    if "gmacs" in info.extra:
        print(f"routing:    {info.extra['gmacs']}")
    return 0
