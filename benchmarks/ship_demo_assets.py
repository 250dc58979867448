"""Copy the demo's trained runs into the package (src/dynavit/assets) and write demo_models.json.

    python benchmarks/ship_demo_assets.py RUNS_ROOT

RUNS_ROOT holds one `dynavit train` run directory per asset (demo_cnn, demo_vit, demo_vit_<method>_<keep>,
demo_pvt, demo_dit), made by the commands in ASSETS below with {root} = RUNS_ROOT (the same commands
`dynavit demo --from-scratch` runs). Weights are stored in float16 (half the size; loading casts them back).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

COMMON = ["--data", "demo", "--aug", "none", "--workers", "1", "--weight-decay", "0.05"]
VAL = "2000"
VIT_IMAGES, METHOD_IMAGES = 32000, 9600
DIT_BUDGET, DIT_IMAGES, DIT_LR = 0.5, 48000, "0.64"


def _init(name: str) -> list:
    return ["--init", f"{{root}}/{name}/model.safetensors"]


ASSETS = {
    "demo_cnn": dict(
        model="demo_cnn", kwargs={}, description="demo_vit's stem + norm + aux head, max over tokens",
        command=["train", "--model", "demo_cnn", *COMMON, "--demo-size", "320000", VAL, "--epochs", "1",
                 "--batch-size", "64", "--lr", "3.2e-2", "--warmup-epochs", "0.01", "--output", "{root}/demo_cnn"]),
    "demo_vit": dict(
        model="demo_vit", kwargs={}, needs=["demo_cnn"],
        description="dense ViT, 12 blocks, width 64, 196 tokens at 112 px, conv stem, LV-ViT aux head",
        command=["train", "--model", "demo_vit", *_init("demo_cnn"), "--allow-partial", *COMMON, "--demo-size", str(VIT_IMAGES), VAL,
                 "--epochs", "1", "--batch-size", "32", "--lr", "4e-3", "--warmup-epochs", "0.02", "--clip-grad", "1.0",
                 "--output", "{root}/demo_vit"]),
    "demo_pvt": dict(
        model="pvt_v2_tiny", kwargs={"img_size": 112, "global_pool": "max", "token_head_scale": 1}, needs=["demo_cnn"],
        description="dense PVTv2-tiny at 112 px (max-pool head), token labels from demo_cnn at its 1/8 map: DiT's twin",
        # from scratch PVTv2 stays at chance on the demo task; demo_cnn's per-token scores (LV-ViT token labelling)
        # give every 1/8 token a target (docs/demo.md, "DiT on the demo")
        command=["train", "--model", "pvt_v2_tiny", "--img-size", "112", "--set", "global_pool=max", "--set",
                 "token_head_scale=1", "--token-teacher", "{root}/demo_cnn", "--token-weight", "1", *COMMON,
                 "--demo-size", "48000", VAL, "--epochs", "2", "--batch-size", "64", "--lr", "1.6e-2",
                 "--warmup-epochs", "0.02", "--clip-grad", "1.0", "--output", "{root}/demo_pvt"]),
    "demo_dit": dict(
        model="dit_tiny", kwargs={"img_size": 112, "budget": DIT_BUDGET, "global_pool": "max"}, needs=["demo_pvt"],
        description=f"DiT routing grid over demo_pvt (PVTv2-tiny, max-pool head) at 112 px, budget {DIT_BUDGET:g}",
        # recipe 'dit': --lr is the gates' (the backbone's is x 0.05); the budget loss starts at 40% of the run
        command=["train", "--model", "dit_tiny", "--budget", f"{DIT_BUDGET:g}", "--img-size", "112", "--set",
                 "global_pool=max", "--init", "{root}/demo_pvt", *COMMON, "--demo-size", str(DIT_IMAGES), VAL,
                 "--epochs", "1", "--batch-size", "32", "--lr", DIT_LR, "--warmup-epochs", "0.02", "--clip-grad", "1.0",
                 "--output", "{root}/demo_dit"]),
}
# every method fine-tuned from demo_vit by its own recipe (`--recipe` from `--method`), with learning rates for a
# short run: DynamicViT 3.2e-2 x 32 / 1024 = 1e-3 (backbone x 0.01; the recipe's warm-up from 0 and frozen backbone,
# 5 of 30 epochs, as fractions), EViT / BAT / ToMe 1.6e-3 x 32 / 512 = 1e-4
TOME_R = {0.7: 11, 0.5: 15}  # the r whose GMACs match EViT's at that keep rate (demo.tome_r_matching)
# DynamicViT's two short-run options (docs/dynamicvit.md "Short runs"): predictors start on their keep ratios and a
# ratio weight that holds them there; with the authors' values (zero bias, weight 2) the predictors learn to drop
# the digit (docs/demo.md finding 4)
DYNAMICVIT_SHORT_RUN = ["--set", "predictor_bias=keep_ratio", "--ratio-weight", "1000"]
# run lengths other than METHOD_IMAGES: two runs on a crowded machine (7 img/s) were shortened to 100 steps;
# BAT at 0.5 was rerun twice as long (92.4% after 9,600 images, 93.85% after 19,200)
RUN_IMAGES = {"demo_vit_bat_0.7": 3200, "demo_vit_tome_0.5": 3200, "demo_vit_bat_0.5": 19200}
for _keep in (0.7, 0.5):
    ASSETS[f"demo_vit_dynamicvit_{_keep:g}"] = dict(
        model="demo_vit", method="dynamicvit", method_kwargs={"keep_rate": _keep}, keep_rate=_keep,
        needs=["demo_vit"], description=f"DynamicViT on demo_vit at keep rate {_keep:g} (recipe 'dynamicvit')",
        command=["train", "--model", "demo_vit", "--method", "dynamicvit", "--keep-rate", f"{_keep:g}",
                 *_init("demo_vit"), *COMMON, "--demo-size", str(METHOD_IMAGES), VAL, "--epochs", "1",
                 "--batch-size", "32", "--lr", "3.2e-2", "--warmup-epochs", "0.1667", "--freeze-backbone-epochs", "0.1667",
                 "--ema-decay", "0", *DYNAMICVIT_SHORT_RUN, "--output", f"{{root}}/demo_vit_dynamicvit_{_keep:g}"])
    for _method in ("evit", "bat", "tome"):
        arg = ["--r", str(TOME_R[_keep])] if _method == "tome" else ["--keep-rate", f"{_keep:g}"]
        kw = {"r": TOME_R[_keep]} if _method == "tome" else {"keep_rate": _keep}
        ASSETS[f"demo_vit_{_method}_{_keep:g}"] = dict(
            model="demo_vit", method=_method, method_kwargs=kw, keep_rate=_keep, needs=["demo_vit"],
            description=f"{_method} on demo_vit at " + (f"r={TOME_R[_keep]} (EViT {_keep:g}'s GMACs)"
                                                        if _method == "tome" else f"keep rate {_keep:g}")
            + f" (recipe '{_method}')",
            command=["train", "--model", "demo_vit", "--method", _method, *arg, *_init("demo_vit"), *COMMON,
                     "--demo-size", str(RUN_IMAGES.get(f"demo_vit_{_method}_{_keep:g}", METHOD_IMAGES)), VAL, "--epochs", "1", "--batch-size", "32", "--lr", "1.6e-3",
                     "--min-lr", "1.6e-4", "--warmup-epochs", "0", "--ema-decay", "0",
                     "--output", f"{{root}}/demo_vit_{_method}_{_keep:g}"])


def main(root: Path) -> None:
    out_dir = Path(__file__).resolve().parents[1] / "src" / "dynavit" / "assets"
    out_dir.mkdir(parents=True, exist_ok=True)
    old = json.loads((out_dir / "demo_models.json").read_text()) if (out_dir / "demo_models.json").exists() else {}
    manifest = {}
    for name, spec in ASSETS.items():
        run = root / name
        if not (run / "model.safetensors").exists():
            if name in old:  # not retrained this time: the shipped file and its entry stay
                manifest[name] = old[name]
            print(f"skip {name}: no {run / 'model.safetensors'}" + (" (kept the shipped one)" if name in old else ""))
            continue
        sd = load_file(str(run / "model.safetensors"))
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
        save_file(sd, str(out_dir / f"{name}.safetensors"))
        summary = json.loads((run / "summary.json").read_text())
        entry = dict(spec)
        entry.update(classes=summary.get("classes") or [str(c) for c in range(10)], file=f"{name}.safetensors",
                     top1=summary.get("top1"), seconds=round(summary["seconds"]),
                     steps=summary["steps"], images=summary["steps"] * summary["global_batch"],
                     trained_on="2-core CPU (AMD EPYC), torch 2.13.0, shared with other jobs")
        manifest[name] = entry
        print(f"{name}: {len(sd)} tensors, top-1 {entry['top1']}, {entry['seconds']} s")
    (out_dir / "demo_models.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
