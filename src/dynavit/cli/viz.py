"""`dynavit viz --model M --method X --checkpoint C --image PATH [--output PNG]`: draw what a method did to an image.

Pruned patches are faded, merged groups coloured (one colour per token), DiT's routing shown as blocks run per
location; one panel per reduction stage. `--checkpoint` takes a file, a run directory or the name of a shipped
asset (e.g. `demo_vit`); without it the freshly initialised model is drawn (its choices are then arbitrary).
"""
from __future__ import annotations

from pathlib import Path

from ._common import add_model_args, model_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("viz", help="draw the tokens a method kept, merged or routed for an image")
    add_model_args(p)
    p.add_argument("--checkpoint", default=None, help="weights: file, run directory, or shipped asset name")
    p.add_argument("--image", required=True, nargs="+", help="image file(s) (anything PIL reads)")
    p.add_argument("--output", default=None, help="PNG to write (default: IMAGE_tokens.png beside the image)")
    p.set_defaults(func=run)


def load_image(path: str, img_size: int):
    """An image file -> normalised (1, 3, S, S) with the DeiT evaluation transform; clear errors."""
    from PIL import Image, UnidentifiedImageError

    from ..data.transforms import eval_batch, pil_resize_center_crop, resize_size
    from ..errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"image {str(p)!r} does not exist")
    try:
        with Image.open(p) as img:
            x = pil_resize_center_crop(img, resize_size(img_size), img_size)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {str(p)!r}: {e}") from None
    return eval_batch(x.unsqueeze(0), img_size)


def run(args) -> int:
    import torch

    from ..assets import manifest
    from ..checkpoint import load_checkpoint
    from ..registry import create_model
    from ..viz import panels_for, save_grid
    from .eval import resolve_checkpoint

    kw = model_kwargs(args)
    if args.checkpoint and args.checkpoint in manifest():
        from ..assets import load_asset

        model = load_asset(args.checkpoint, method=args.method, **kw)
    else:
        model = create_model(args.model, method=args.method, **kw)
        if args.checkpoint:
            load_checkpoint(model, resolve_checkpoint(args.checkpoint), strict=True)
    model.eval()
    size = getattr(model, "img_size", 224)
    x = torch.cat([load_image(p, size) for p in args.image])
    rows = panels_for(model, x, [Path(p).name for p in args.image])
    out = Path(args.output) if args.output else Path(args.image[0]).with_name(Path(args.image[0]).stem + "_tokens.png")
    method = args.method or "dense"
    save_grid(rows, out, title=f"{args.model} + {method}" + (f" ({args.checkpoint})" if args.checkpoint else ""))
    print(f"wrote {out}")
    return 0
