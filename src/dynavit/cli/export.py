"""`dynavit export --model M [--method X ...] [--checkpoint C] --onnx OUT.onnx`: ONNX export, verified."""
from __future__ import annotations

from ._common import add_model_args, build_model


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a (reduced) model to ONNX and verify it with onnxruntime")
    add_model_args(p)
    p.add_argument("--checkpoint", default=None, help="weights to load (.safetensors or .pth)")
    p.add_argument("--onnx", required=True, help="output .onnx path")
    p.add_argument("--batch-size", type=int, default=1, help="static batch size of the exported graph")
    p.add_argument("--legacy", action="store_true", help="use the TorchScript exporter instead of dynamo")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import load_checkpoint
    from ..export import export_onnx

    model = build_model(args)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    res = export_onnx(model, args.onnx, batch_size=args.batch_size, dynamo=not args.legacy,
                      verify=not args.no_verify)
    diff = "not verified" if res["max_abs_diff"] is None else f"max |d logit| vs PyTorch {res['max_abs_diff']:.2e}"
    print(f"wrote {res['path']} ({res['exporter']} exporter, opset {res['opset']}): {diff}")
    return 0
