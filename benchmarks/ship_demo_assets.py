"""Copy the demo's trained runs into the package (src/dynavit/assets) and write demo_models.json.

    python benchmarks/ship_demo_assets.py RUNS_ROOT

RUNS_ROOT holds one `dynavit train` run directory per asset (demo_cnn, demo_vit, demo_vit_dynamicvit_0.7,
demo_vit_dynamicvit_0.5, demo_dit), made by the commands in ASSETS below with {root} = RUNS_ROOT (the same
commands `dynavit demo --from-scratch` runs). Method-only assets keep just the method's own parameters.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

COMMON = ["--data", "demo", "--aug", "none", "--workers", "1", "--weight-decay", "0.05"]

ASSETS = {
    "demo_cnn": dict(
        model="demo_cnn", kwargs={}, description="demo_vit's stem + norm + aux head, max over tokens",
        command=["train", "--model", "demo_cnn", *COMMON, "--demo-size", "64000", "1000", "--epochs", "1",
                 "--batch-size", "32", "--lr", "3.2e-2", "--warmup-epochs", "0.01", "--output", "{root}/demo_cnn"]),
    "demo_vit": dict(
        model="demo_vit", kwargs={}, needs=["demo_cnn"],
        description="dense ViT, 12 blocks, width 64, 196 tokens, conv stem, LV-ViT aux head",
        command=["train", "--model", "demo_vit", "--init", "{root}/demo_cnn/model.safetensors", "--allow-partial",
                 *COMMON,
                 "--demo-size", "32000", "1000", "--epochs", "1", "--batch-size", "32", "--lr", "8e-3",
                 "--warmup-epochs", "0.02", "--clip-grad", "1.0", "--output", "{root}/demo_vit"]),
    "demo_dit": dict(
        model="dit_tiny", kwargs={"img_size": 64, "budget": 0.5, "global_pool": "max"},
        description="DiT (PVTv2-tiny routing space, max-pool head) at 64 px, budget 0.5",
        command=["train", "--model", "dit_tiny", "--budget", "0.5", "--img-size", "64", "--set", "global_pool=max",
                 *COMMON, "--demo-size", "25600", "1000", "--epochs", "1", "--batch-size", "32", "--lr", "3.2e-2", "--warmup-epochs",
                 "0.02", "--clip-grad", "1.0", "--output", "{root}/demo_dit"]),
}
for _keep in (0.7, 0.5):
    ASSETS[f"demo_vit_dynamicvit_{_keep:g}"] = dict(
        model="demo_vit", method="dynamicvit", method_kwargs={"keep_rate": _keep}, partial=True,
        needs=["demo_vit"], backbone="demo_vit", keys="score_predictor.",
        description=f"DynamicViT predictors for demo_vit at keep rate {_keep:g} (150 steps, recipe 'dynamicvit')",
        command=["train", "--model", "demo_vit", "--method", "dynamicvit", "--keep-rate", f"{_keep:g}", "--init",
                 "{root}/demo_vit/model.safetensors", *COMMON, "--no-eval", "--demo-size", "4800", "1",
                 "--epochs", "1", "--batch-size", "32", "--lr", "3.2e-2", "--warmup-epochs", "0",
                 "--freeze-backbone-epochs", "0.1667", "--ema-decay", "0", "--output", f"{{root}}/demo_vit_dynamicvit_{_keep:g}"])


def main(root: Path) -> None:
    out_dir = Path(__file__).resolve().parents[1] / "src" / "dynavit" / "assets"
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, spec in ASSETS.items():
        run = root / name
        if not (run / "model.safetensors").exists():
            print(f"skip {name}: no {run / 'model.safetensors'}")
            continue
        sd = load_file(str(run / "model.safetensors"))
        if spec.get("keys"):
            sd = {k: v for k, v in sd.items() if k.startswith(spec["keys"])}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / f"{name}.safetensors"))
        summary = json.loads((run / "summary.json").read_text())
        entry = {k: v for k, v in spec.items() if k != "keys"}
        entry.update(classes=[str(c) for c in range(10)], file=f"{name}.safetensors", top1=summary.get("top1"),
                     seconds=round(summary["seconds"]),
                     steps=summary["steps"], images=summary["steps"] * summary["global_batch"],
                     trained_on="2-core CPU (AMD EPYC), torch 2.13.0, shared with other jobs")
        manifest[name] = entry
        print(f"{name}: {len(sd)} tensors, top-1 {entry['top1']}, {entry['seconds']} s")
    (out_dir / "demo_models.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
