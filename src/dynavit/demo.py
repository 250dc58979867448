"""The main job (`dynavit demo`): every method on the embedded digits task, trained, measured and drawn.

Starting from the dense ViT that ships with the package (`demo_vit`, pretrained by `dynavit train` on the demo
data: `assets/demo_models.json` has the command), the demo

1. evaluates the dense model on the validation split;
2. fine-tunes DynamicViT (with its dense teacher), EViT, BAT and ToMe at each keep rate (ToMe at the `r` whose
   GMACs match BAT's) with the training engine of `dynavit train` and the methods' recipes, shortened
   (`DEMO_LR` below; `--quick` skips this and uses the weights as shipped);
3. adds the shipped DiT (budget 0.5), evaluated at its own resolution against its dense PVTv2 twin;
4. evaluates every model, times them side by side (interleaved rounds, median), counts GMACs;
5. writes `results.json`, `tradeoff.png`, `tokens.png`, `diversity.png` and prints the table and the papers'
   claims, each marked as holding or not on this run.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .assets import load_asset, manifest
from .data.demo import DemoDataset
from .errors import ConfigError
from .data.transforms import AugmentConfig, eval_batch
from .flops import count_gmacs

# The recipes run 30 epochs at lr scaled to the global batch; the demo runs `steps` steps, so it takes the
# recipes' structure (what is trained, frozen, distilled, scheduled) with peak learning rates for a short run.
DEMO_LR = {"dynamicvit": 1e-3, "evit": 1e-4, "bat": 1e-4, "tome": 1e-4}
METHODS = ("dynamicvit", "evit", "bat", "tome")


@dataclass
class DemoConfig:
    output: str = "demo-output"
    quick: bool = False  # no fine-tuning: the shipped weights as they are
    keep_rates: tuple = (0.7, 0.5)
    steps: int = 40  # fine-tuning steps per method and keep rate (EViT, BAT, ToMe start from good weights)
    dynamicvit_steps: int = 40  # DynamicViT (its predictors start from scratch; 150 measured no better)
    batch_size: int = 32
    val_images: int = 1000
    bench_batch: int = 32
    bench_repeats: int = 5
    viz_images: int = 4
    seed: int = 0
    backbone: str = "demo_vit"
    dit: str = "demo_dit"
    asset_root: Optional[Path] = None  # retrained assets (`--from-scratch`) instead of the shipped ones
    log: callable = field(default=print, repr=False)


# ------------------------------------------------------------------------------------------- evaluation
def val_images(n: int, size: int, seed: int = 0) -> tuple:
    """(uint8 images (n, 3, size, size), labels (n,)) of the demo's validation split."""
    from tqdm import tqdm

    ds = DemoDataset("val", seed=seed, n=n, size=size)
    items = [ds[i] for i in tqdm(range(n), desc=f"render val {size}px", leave=False, mininterval=1.0)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 100, desc: str = "eval") -> dict:
    """Top-1 (%) and mean GMACs per image (DiT: the routed cost of each image; others: counted once)."""
    from tqdm import tqdm

    model.eval()
    size = images.shape[-1]
    correct, routed = 0, []
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False, mininterval=1.0):
        x = eval_batch(images[i:i + batch], size)
        if hasattr(model, "force_gates"):  # DiT: per-image routed cost
            logits, info = model(x, return_info=True)
            routed.append(info.extra["gmacs"].float())
        else:
            logits = model(x)
        correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    gmacs = float(torch.cat(routed).mean()) if routed else count_gmacs(model, img_size=size)
    return {"top1": 100.0 * correct / len(images), "gmacs": gmacs}


def time_models(models: dict, sizes: dict, batch: int, repeats: int) -> dict:
    """{name: img/s}: inference forwards timed side by side, interleaved (A B C A B C ...), median of rounds."""
    from .bench import make_step, time_interleaved

    torch.manual_seed(0)
    steps = [make_step(m.eval(), torch.randn(batch, 3, sizes[k], sizes[k]), train=False) for k, m in models.items()]
    times = time_interleaved(steps, repeats, 1, torch.device("cpu"))
    return {k: batch / statistics.median(t) for k, t in zip(models, times)}


# ------------------------------------------------------------------------------------------- models
def tome_r_matching(gmacs_target: float, backbone: str, max_r: int = 16) -> int:
    """The ToMe r whose GMACs are closest to `gmacs_target` (ToMe's r plays the role of a keep rate)."""
    from .registry import create_model

    best = None
    for r in range(1, max_r + 1):
        try:
            g = count_gmacs(create_model(backbone, method="tome", r=r))
        except ConfigError:  # r too large for the token count
            break
        if best is None or abs(g - gmacs_target) < best[1]:
            best = (r, abs(g - gmacs_target))
    return best[0]


def method_kwargs(method: str, keep: float, r: Optional[int]) -> dict:
    return {"r": r} if method == "tome" else {"keep_rate": keep}


def finetune(model: nn.Module, method: str, keep: float, cfg: DemoConfig, run_dir: Path) -> dict:
    """Fine-tune `model` for cfg.steps steps with `method`'s recipe (shortened); returns the run summary."""
    from .train.criterion import build_criterion
    from .train.engine import Trainer, TrainConfig
    from .train.recipes import get_recipe

    recipe = get_recipe(None, method)
    criterion = build_criterion(model, recipe.criterion, smoothing=0.0, distill=recipe.distill)
    steps = cfg.dynamicvit_steps if method == "dynamicvit" else cfg.steps
    train_set = DemoDataset("train", seed=cfg.seed, n=steps * cfg.batch_size)
    tc = TrainConfig(
        output=str(run_dir), epochs=1.0, batch_size=cfg.batch_size, lr=DEMO_LR[method], min_lr=DEMO_LR[method] / 10,
        warmup_epochs=0.0, weight_decay=recipe.weight_decay, backbone_lr_scale=recipe.backbone_lr_scale,
        head_patterns=recipe.head_patterns, frozen_patterns=recipe.frozen_patterns,
        freeze_backbone_epochs=recipe.freeze_backbone_epochs / max(recipe.epochs, 1), ema_decay=0.0,
        amp="none", seed=cfg.seed, img_size=224, num_classes=10, augment=AugmentConfig.none(),
        keep_rate=keep if method != "tome" else None, keep_schedule=recipe.keep_schedule, workers=1,
        log_every=10, eval_every_epoch=False)
    return Trainer(model, criterion, train_set, None, tc, meta={"method": method, "keep_rate": keep}).fit()


# ------------------------------------------------------------------------------------------- the job
def run(cfg: DemoConfig) -> dict:
    log = cfg.log
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    assets = manifest()
    torch.manual_seed(cfg.seed)

    log(f"[1/6] dense {cfg.backbone} (shipped, {assets[cfg.backbone]['description']})")
    images, labels = val_images(cfg.val_images, 224, cfg.seed)
    dense = load_asset(cfg.backbone, root=cfg.asset_root).eval()
    models, rows = {"dense": dense}, [{"method": "dense", "keep_rate": 1.0, **evaluate(dense, images, labels)}]
    log(f"      dense top-1 {rows[0]['top1']:.1f}% at {rows[0]['gmacs']:.3f} GMACs")

    how = (" (as shipped, no fine-tuning)" if cfg.quick
           else f", fine-tuned {cfg.steps} steps each (DynamicViT {cfg.dynamicvit_steps})")
    log(f"[2/6] methods at keep rates {list(cfg.keep_rates)}{how}")
    for keep in cfg.keep_rates:
        r = None
        for method in METHODS:  # ToMe last: its r is the one whose GMACs match BAT's at this keep rate
            if method == "tome":
                bat = next(row for row in rows if row["method"] == "bat" and row["keep_rate"] == keep)
                r = tome_r_matching(bat["gmacs"], cfg.backbone)
            kw = method_kwargs(method, keep, r)
            # quick: DynamicViT's shipped predictors; full: fresh predictors, trained below as the recipe says
            extra = [f"{cfg.backbone}_dynamicvit_{keep:g}"] if method == "dynamicvit" and cfg.quick else []
            extra = [e for e in extra if e in assets]
            model = load_asset(cfg.backbone, method=method, extra=extra, root=cfg.asset_root, **kw)
            name = f"{method}:{keep:g}" if method != "tome" else f"tome:{r}"
            if not cfg.quick:
                log(f"      fine-tuning {name}")
                finetune(model, method, keep, cfg, out / "runs" / name.replace(":", "_"))
                if method != "tome":
                    model.reducer.set_keep_rate(keep)
            elif getattr(model, "asset_missing", None):
                log(f"      note: {name} has parameters no asset provides (untrained): {model.asset_missing[:3]}")
            model.eval()
            res = evaluate(model, images, labels, desc=name)
            rows.append({"method": method, "keep_rate": keep, **({"r": r} if r else {}), **res})
            models[name] = model
            log(f"      {name:<16} top-1 {res['top1']:5.1f}%  {res['gmacs']:.3f} GMACs")

    log(f"[3/6] DiT (shipped {cfg.dit}, {assets[cfg.dit]['description']})")
    dit = load_asset(cfg.dit, root=cfg.asset_root).eval()
    dit_size = dit.img_size if hasattr(dit, "img_size") else assets[cfg.dit]["kwargs"].get("img_size", 224)
    dit_images, dit_labels = val_images(cfg.val_images, dit_size, cfg.seed)
    res = evaluate(dit, dit_images, dit_labels, desc="dit")
    twin = load_asset(cfg.dit, root=cfg.asset_root).eval()
    twin.force_gates("open")
    twin_res = evaluate(twin, dit_images, dit_labels, desc="dit twin")
    rows.append({"method": "dit", "keep_rate": dit.budget, **res, "twin_top1": twin_res["top1"],
                 "twin_gmacs": twin_res["gmacs"]})
    log(f"      dit budget {dit.budget:g}: top-1 {res['top1']:.1f}% at {res['gmacs']:.4f} GMACs "
        f"(all gates open: {twin_res['top1']:.1f}% at {twin_res['gmacs']:.4f})")

    log("[4/6] timing every model side by side (batch %d, %d interleaved rounds)" % (cfg.bench_batch,
                                                                                   cfg.bench_repeats))
    timed = dict(models, **{"dit": dit, "dit_twin": twin})
    sizes = {k: (dit_size if k.startswith("dit") else 224) for k in timed}
    rates = time_models(timed, sizes, cfg.bench_batch, cfg.bench_repeats)
    for row, key in zip(rows, list(models) + ["dit"]):
        base_rate, base_gmacs = (rates["dit_twin"], rows[-1]["twin_gmacs"]) if key == "dit" else \
            (rates["dense"], rows[0]["gmacs"])
        row["img_per_s"] = rates[key]
        row["speedup"] = rates[key] / base_rate
        row["ideal_speedup"] = base_gmacs / row["gmacs"]
        row["efficiency"] = row["speedup"] / row["ideal_speedup"]

    log("[5/6] token diversity (BAT Eq. 4) of EViT and BAT")
    diversity = diversity_curves(cfg, images[:64])

    log("[6/6] pictures")
    pictures = draw(cfg, out, rows, models, dit, images, labels, dit_images, diversity)
    claims = check_claims(rows, diversity)
    result = {"rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
              "claims": claims, "diversity": diversity, "pictures": [p.name for p in pictures],
              "config": {"quick": cfg.quick, "steps": 0 if cfg.quick else cfg.steps,
                         "dynamicvit_steps": 0 if cfg.quick else cfg.dynamicvit_steps, "batch_size": cfg.batch_size,
                         "val_images": cfg.val_images, "bench_batch": cfg.bench_batch,
                         "threads": torch.get_num_threads()},
              "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    log("")
    log(format_table(result))
    log(f"\nwrote {out / 'results.json'} and {', '.join(p.name for p in pictures)} in {result['seconds']:.0f} s")
    return result


@torch.no_grad()
def diversity_curves(cfg: DemoConfig, images: Tensor, keep_rates=(1.0, 0.9, 0.7, 0.5, 0.3)) -> dict:
    """{method: [[keep_rate, mean diversity of the final tokens], ...]} for EViT and BAT on the shipped weights."""
    from .metrics import diversity_score

    x = eval_batch(images, 224)
    curves = {}
    for method in ("evit", "bat"):
        pts = []
        for keep in keep_rates:
            model = load_asset(cfg.backbone, method=method, keep_rate=keep, root=cfg.asset_root).eval()
            tokens = model.forward_features(x)[:, model.num_prefix_tokens:]
            pts.append([keep, round(float(diversity_score(tokens).mean()), 3)])
        curves[method] = pts
    return curves


def draw(cfg: DemoConfig, out: Path, rows: list, models: dict, dit, images: Tensor, labels: Tensor,
         dit_images: Tensor, diversity: dict) -> list:
    from .viz import panels_for, plot_diversity, plot_tradeoff, save_grid

    paths = [plot_tradeoff([r for r in rows if r["method"] != "dit"], out / "tradeoff.png",
                           title=f"{cfg.backbone} on the demo digits: top-1 vs GMACs (labels: keep rate)")]
    n = cfg.viz_images
    x = eval_batch(images[:n], 224)
    keep = cfg.keep_rates[0]
    names = [f"dynamicvit:{keep:g}", f"evit:{keep:g}", f"bat:{keep:g}"] + [k for k in models if k.startswith("tome")][:1]
    per_model = {k: panels_for(models[k], x, [str(int(v)) for v in labels[:n]]) for k in names}
    dit_panels = panels_for(dit, eval_batch(dit_images[:n], dit_images.shape[-1]))
    grid_rows, col_titles = [], None
    for b in range(n):
        row = [per_model[names[0]][b][0]] + per_model[names[0]][b][1:]  # input + DynamicViT's three stages
        titles = ["input"] + [f"DynamicViT {keep:g} s{s + 1}" for s in range(len(per_model[names[0]][b]) - 1)]
        for k in names[1:]:
            row.append(per_model[k][b][-1])  # the last stage: what reaches the head
            titles.append({"evit": "EViT", "bat": "BAT", "tome": "ToMe"}[k.split(":")[0]] + " " + k.split(":")[1]
                          + ("" if k.startswith("tome") else " last"))
        row.append(dit_panels[b][-1])
        titles.append(f"DiT budget {dit.budget:g}")
        grid_rows.append(row)
        col_titles = col_titles or titles
    paths.append(save_grid(grid_rows, out / "tokens.png", col_titles=col_titles,
                           title="kept (faded = pruned), merged (one colour per group) and routed tokens"))
    paths.append(plot_diversity(diversity, out / "diversity.png",
                                title="token diversity (BAT Eq. 4) of the final tokens, shipped weights"))
    return paths


def retrain_assets(output: str, names=None) -> Path:
    """Re-run the `dynavit train` commands that made the shipped demo models, into OUTPUT/pretrain."""
    from .assets import retrain_commands
    from .cli import main

    root = Path(output) / "pretrain"
    names = names or [n for n in manifest() if manifest()[n].get("demo", True)]
    done = []
    for name in names:
        for argv in retrain_commands(name, root):
            if argv in done:
                continue
            print("$ dynavit " + " ".join(argv))
            rc = main(argv)
            if rc:
                from .errors import TrainingError

                raise TrainingError(f"retraining {name!r} failed (exit {rc}): dynavit {' '.join(argv)}")
            done.append(argv)
    return root


# ------------------------------------------------------------------------------------------- claims
def check_claims(rows: list, diversity: dict) -> list:
    """The papers' claims, evaluated on this run's numbers: [{claim, holds, detail}, ...]."""
    def row(method, keep):
        return next((r for r in rows if r["method"] == method and r["keep_rate"] == keep), None)

    dense = row("dense", 1.0)
    claims = [{"claim": "the dense model learns the task (chance is 10%)", "holds": dense["top1"] >= 50.0,
               "detail": f"dense top-1 {dense['top1']:.1f}%"}]
    dvit = row("dynamicvit", 0.7)
    if dvit:
        drop, cut = dense["top1"] - dvit["top1"], 1 - dvit["gmacs"] / dense["gmacs"]
        claims.append({"claim": "DynamicViT 0.7 loses <= 1.0 point of top-1 and cuts GMACs by about a third",
                       "holds": drop <= 1.0 and 0.25 <= cut <= 0.45,
                       "detail": f"top-1 {dvit['top1']:.1f}% vs {dense['top1']:.1f}% ({-drop:+.1f}), GMACs "
                                 f"-{100 * cut:.0f}%"})
    bat, evit = row("bat", 0.5), row("evit", 0.5)
    if bat and evit:
        div = {m: dict((k, v) for k, v in diversity.get(m, [])) for m in ("bat", "evit")}
        d_bat, d_evit = div["bat"].get(0.5), div["evit"].get(0.5)
        claims.append({"claim": "at keep rate 0.5 BAT is at least as accurate as EViT",
                       "holds": bat["top1"] >= evit["top1"],
                       "detail": f"BAT {bat['top1']:.1f}% vs EViT {evit['top1']:.1f}%; diversity BAT {d_bat} vs "
                                 f"EViT {d_evit}"})
    reduced = [r for r in rows if r["method"] not in ("dense", "dit")]
    worst = min(reduced, key=lambda r: r["efficiency"])
    claims.append({"claim": "measured speed-ups match the GMACs reductions (efficiency >= 0.9)",
                   "holds": worst["efficiency"] >= 0.9,
                   "detail": f"lowest efficiency {worst['efficiency']:.2f} ({worst['method']} {worst['keep_rate']:g})"})
    return claims


def format_table(result: dict) -> str:
    lines = [f"{'method':<12}{'keep':>6}{'top-1':>8}{'GMACs':>8}{'img/s':>9}{'speed-up':>10}{'eff.':>6}",
             "-" * 59]
    for r in result["rows"]:
        keep = f"r={r['r']}" if r.get("r") else f"{r['keep_rate']:g}"
        lines.append(f"{r['method']:<12}{keep:>6}{r['top1']:>7.1f}%{r['gmacs']:>8.3f}{r['img_per_s']:>9.1f}"
                     f"{r['speedup']:>9.2f}x{r['efficiency']:>6.2f}")
    lines.append("(dit: keep = budget; its speed-up and efficiency are against its dense PVTv2 twin, all gates open)")
    lines.append("")
    for c in result["claims"]:
        lines.append(f"[{'holds' if c['holds'] else 'does NOT hold'}] {c['claim']}: {c['detail']}")
    return "\n".join(lines)
