"""`dynavit export --model M [--method X ...] [--checkpoint C] --onnx OUT.onnx`: ONNX export, verified."""
from __future__ import annotations

from ._common import add_model_args, number
from ._weights import add_weights_args


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a (reduced) model to ONNX and verify it with onnxruntime")
    add_model_args(p, model_required=False)
    add_weights_args(p)
    p.add_argument("--onnx", required=True, help="output .onnx path")
    p.add_argument("--batch-size", type=number(int, ">0"), default=1, help="static batch size of the exported graph")
    p.add_argument("--legacy", action="store_true", help="use the TorchScript exporter instead of dynamo")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..export import export_onnx
    from ..registry import create_model
    from ._weights import checkpoint_classes, load_weights, model_for, resolve_weights
    from ._common import check_output_file

    check_output_file(Path(args.onnx))
    w = resolve_weights(args.checkpoint) if args.checkpoint else None
    name, method, kw = model_for(args, w)
    if w is not None and "num_classes" not in kw:
        n = checkpoint_classes(w)
        if n is not None:
            kw["num_classes"] = n
    model = create_model(name, method=method, **kw)
    if w is not None:
        load_weights(model, w, partial=args.allow_partial)
    res = export_onnx(model, args.onnx, batch_size=args.batch_size, dynamo=not args.legacy,
                      verify=not args.no_verify)
    diff = "not verified" if res["max_abs_diff"] is None else f"max |d logit| vs PyTorch {res['max_abs_diff']:.2e}"
    print(f"wrote {res['path']} ({res['exporter']} exporter, opset {res['opset']}): {diff}")
    return 0
