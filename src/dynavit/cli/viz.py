"""`dynavit viz --model M --method X --checkpoint C --image PATH [--output PNG]`: draw what a method did to an image.

Pruned patches are faded, merged groups coloured (one colour per token); one panel per reduction stage, the
panels a model family draws itself (`viz_panels`, e.g. blocks run per location), or the figure it draws whole
(`save_viz`, e.g. a routing grid: rows = strides, columns = stages). `--checkpoint` takes a file, a run directory
or the name of a shipped asset (e.g. `demo_vit`, or a method asset `demo_vit_<method>_0.7`, which loads its
backbone too); the model, method and class count default to the checkpoint's. Without it the freshly
initialised model is drawn (its choices are then
arbitrary). The predicted class of each image is printed, by name when the run saved its class names.
"""
from __future__ import annotations

from pathlib import Path

from ..extras import require
from ._common import add_model_args, check_output_file
from ._weights import add_weights_args


def add_parser(sub) -> None:
    p = sub.add_parser("viz", help="draw the tokens a method kept, merged or routed for an image")
    add_model_args(p, model_required=False)
    add_weights_args(p)
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
    require("plot", "dynavit viz", ("matplotlib",))
    import torch

    from ..viz import panels_for, save_grid
    from ._weights import load_weights, model_and_weights

    images = [Path(p) for p in args.image]
    out = Path(args.output) if args.output else images[0].with_name(images[0].stem + "_tokens.png")
    check_output_file(out)
    model, w, name, method = model_and_weights(args)
    if w is not None:
        load_weights(model, w, partial=args.allow_partial)
    model.eval()
    size = getattr(model, "img_size", 224)
    x = torch.cat([load_image(str(p), size) for p in images])
    classes = w.classes if w is not None else None
    source = f" ({w.label})" if w else ""
    own = getattr(model, "save_viz", None)
    if callable(own):  # a model family's own figure (docs/writing-a-method.md)
        own(x, out, [p.name for p in images], title=name + source)
        print(f"wrote {out}")
        return 0
    rows = panels_for(model, x, [p.name for p in images], class_names=classes)
    with torch.no_grad():
        probs = model(x).float().softmax(-1)
    for p, row in zip(images, probs):
        conf, k = row.max(0)
        label = repr(classes[int(k)]) if classes and int(k) < len(classes) else f"class {int(k)}"
        print(f"{p.name}: predicted {label} ({100 * float(conf):.1f}%)")
    save_grid(rows, out, title=f"{name} + {method or 'dense'}{source}")
    print(f"wrote {out}")
    return 0
