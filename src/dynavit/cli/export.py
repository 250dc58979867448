"""`dynavit export --model M [--method X ...] [--checkpoint C] --onnx OUT.onnx`: ONNX export, verified.

The graph has a dynamic batch axis unless `--batch-size N` asks for a static one; the weights are stored inside the
one .onnx file unless they exceed protobuf's 2 GiB limit (then a `.onnx.data` file beside it, and the output says so).
"""
from __future__ import annotations

from ..extras import require
from ._common import add_model_args, number
from ._weights import add_weights_args


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a (reduced) model to ONNX and verify it with onnxruntime")
    add_model_args(p, model_required=False)
    add_weights_args(p)
    p.add_argument("--onnx", required=True, help="output .onnx path")
    p.add_argument("--batch-size", type=number(int, ">0"), default=None,
                   help="static batch size of the exported graph (default: a dynamic batch axis, checked at batch "
                        "1 and 3)")
    p.add_argument("--legacy", action="store_true", help="use the TorchScript exporter instead of dynamo")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    modules = ("onnx",) + (() if args.legacy else ("onnxscript",)) + (() if args.no_verify else ("onnxruntime",))
    require("export", "dynavit export", modules)
    from ..export import ExportError, export_blocker, export_onnx
    from ._weights import load_weights, model_and_weights
    from ._common import check_output_file

    check_output_file(Path(args.onnx))
    model, w, name, method = model_and_weights(args)
    blocker = export_blocker(model)
    if blocker:  # before loading weights or starting the exporter
        raise ExportError(f"cannot export {name}" + (f" + {method}" if method else "") + f" to ONNX: {blocker}")
    if w is not None:
        load_weights(model, w, partial=args.allow_partial)
    res = export_onnx(model, args.onnx, batch_size=args.batch_size, dynamo=not args.legacy,
                      verify=not args.no_verify)
    batch = f"batch {args.batch_size}" if args.batch_size else "dynamic batch"
    if res["max_abs_diff"] is None:
        diff = "not verified"
    else:
        at = ", ".join(map(str, res["checked_batches"]))
        diff = f"max |d logit| vs PyTorch {res['max_abs_diff']:.2e} at batch {at}"
    print(f"wrote {res['path']} ({res['exporter']} exporter, opset {res['opset']}, {batch}): {diff}")
    if res["external_data"]:
        print(f"note: the weights exceed ONNX's 2 GiB single-file limit and are in {res['external_data']}; "
              f"keep that file beside the .onnx (copying the .onnx alone fails)")
    return 0
