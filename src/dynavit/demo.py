"""The main job (`dynavit demo`): every method on the embedded digits task, trained, measured and drawn.

Starting from the dense ViT that ships with the package (`demo_vit`, trained by `dynavit train` on the demo
data: `assets/demo_models.json` has every command), the demo

1. evaluates the dense model on the validation split (unseen handwriting);
2. fine-tunes DynamicViT live at each keep rate: the shipped asset's own `dynavit train` command (the
   'dynamicvit' recipe with its dense teacher, LV-ViT token distillation, frozen-backbone warm-up), run for
   `--dynamicvit-steps` steps from the dense model with fresh predictors (`--quick`: the shipped DynamicViT
   weights, the same command run longer);
3. evaluates EViT, BAT and ToMe (ToMe at the r whose GMACs match EViT's) as shipped: each fine-tuned by its
   recipe's `dynavit train` command in `demo_models.json`;
4. adds the shipped DiT and its dense PVTv2 twin (the same weights forced onto PVTv2's route), at their own
   resolution (skipped, saying why, when the shipped DiT predates the model's code);
5. times every model side by side (interleaved rounds, median), counts GMACs;
6. writes `results.json`, `tradeoff.png`, `tokens.png`, `diversity.png` and prints the table and the papers'
   claims, each marked as holding or not on this run.

A rerun replaces the previous run's live fine-tunes (it says so); nothing needs cleaning by hand.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .assets import asset_path, load_asset, manifest, retrain_commands
from .data.demo import DemoDataset
from .data.transforms import eval_batch
from .errors import CheckpointError, ConfigError, TrainingError
from .flops import count_gmacs
from .timing import malloc_tunables_on

METHODS = ("dynamicvit", "evit", "bat", "tome")
LABELS = {"dynamicvit": "DynamicViT", "evit": "EViT", "bat": "BAT", "tome": "ToMe"}


@dataclass
class DemoConfig:
    output: str = "demo-output"
    quick: bool = False  # no live fine-tuning: the shipped DynamicViT weights
    keep_rates: tuple = (0.7, 0.5)
    dynamicvit_steps: int = 150  # live DynamicViT fine-tuning steps per keep rate (batch 32)
    val_images: int = 2000
    bench_batch: int = 128  # width 64: at 32 per-op fixed costs take 10-15 % of a pruned model (docs/demo.md)
    bench_repeats: int = 7
    viz_images: int = 4
    seed: int = 0
    backbone: str = "demo_vit"
    dit: str = "demo_dit"
    asset_root: Optional[Path] = None  # retrained assets (`--from-scratch`) instead of the shipped ones
    log: callable = field(default=print, repr=False)


def method_asset(backbone: str, method: str, keep: float) -> str:
    """The shipped asset of `method` on `backbone` at keep rate `keep` (ToMe: matched to EViT's GMACs at it)."""
    return f"{backbone}_{method}_{keep:g}"


def shipped_keep_rates(backbone: str = "demo_vit") -> list:
    """Keep rates for which every method has a shipped asset."""
    assets = manifest()
    rates = sorted({e["keep_rate"] for e in assets.values() if "keep_rate" in e}, reverse=True)
    return [k for k in rates if all(method_asset(backbone, m, k) in assets for m in METHODS)]


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


def bench_batch(images: Tensor, batch: int) -> Tensor:
    """The first `batch` validation images (cycled if there are fewer), as the models see them: what is timed.
    Real images, not noise: DiT's routes (and so its cost) depend on the image."""
    return eval_batch(images[torch.arange(batch) % len(images)], images.shape[-1])


def time_models(models: dict, inputs: dict, repeats: int) -> dict:
    """{name: img/s}: inference forwards on inputs[name] timed side by side, interleaved (A B C A B C ...),
    median of rounds."""
    from .timing import make_step, time_interleaved

    steps = [make_step(m.eval(), inputs[k], train=False) for k, m in models.items()]
    times = time_interleaved(steps, repeats, 1, torch.device("cpu"))
    return {k: inputs[k].shape[0] / statistics.median(t) for k, t in zip(models, times)}


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


def run_train(argv: list, log=print) -> None:
    """Run `dynavit train ARGV` in a fresh process, exactly as a user types it (progress bars pass through)."""
    log("      $ dynavit " + " ".join(argv))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rc = subprocess.run([sys.executable, "-m", "dynavit", *argv], env=env).returncode
    if rc:
        raise TrainingError(f"'dynavit {' '.join(argv)}' failed (exit {rc})")


def live_command(asset: str, run_dir: Path, steps: int, init: Path) -> list:
    """The shipped asset's own `dynavit train` command, for `steps` steps, starting from `init`, into `run_dir`."""
    argv = list(manifest()[asset]["command"])
    for flag in ("--epochs", "--max-steps"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    argv = [str(init) if a.endswith("/model.safetensors") and "{root}" in a else a for a in argv]
    argv[argv.index("--output") + 1] = str(run_dir)
    if "--demo-size" in argv:  # a small validation split: the demo evaluates on its own images
        i = argv.index("--demo-size")
        argv[i + 1:i + 3] = [str(steps * 32), "1"]
    return argv + ["--max-steps", str(steps), "--no-eval"]


def finetune_live(cfg: DemoConfig, method: str, keep: float, run_dir: Path) -> nn.Module:
    """Fine-tune `method` at `keep` live from the dense backbone with its shipped asset's recipe (fewer steps)."""
    from .checkpoint import load_checkpoint
    from .registry import create_model

    asset = method_asset(cfg.backbone, method, keep)
    if run_dir.exists():
        cfg.log(f"      replacing the previous demo's run {run_dir}")
        shutil.rmtree(run_dir)
    run_train(live_command(asset, run_dir, cfg.dynamicvit_steps, asset_path(cfg.backbone, cfg.asset_root)),
              cfg.log)
    entry = manifest()[asset]
    model = create_model(entry["model"], method=entry["method"], **entry.get("method_kwargs", {}))
    load_checkpoint(model, run_dir / "model.safetensors", strict=True)
    return model


# ------------------------------------------------------------------------------------------- the job
def run(cfg: DemoConfig) -> dict:
    log = cfg.log
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    assets = manifest()
    available = shipped_keep_rates(cfg.backbone)
    for keep in cfg.keep_rates:
        if keep not in available:
            raise ConfigError(f"the demo has shipped weights for keep rates {available}, got {keep:g}")
    torch.manual_seed(cfg.seed)

    log(f"[1/6] dense {cfg.backbone} (shipped, {assets[cfg.backbone]['description']})")
    dense = load_asset(cfg.backbone, root=cfg.asset_root).eval()
    size = dense.img_size
    images, labels = val_images(cfg.val_images, size, cfg.seed)
    models, rows = {"dense": dense}, [{"method": "dense", "keep_rate": 1.0, **evaluate(dense, images, labels)}]
    log(f"      dense top-1 {rows[0]['top1']:.1f}% at {rows[0]['gmacs']:.3f} GMACs on {cfg.val_images} images")

    how = "shipped weights (--quick)" if cfg.quick else f"fine-tuned live, {cfg.dynamicvit_steps} steps each"
    log(f"[2/6] DynamicViT at keep rates {list(cfg.keep_rates)}: {how}")
    live = {}
    for keep in cfg.keep_rates:
        name = f"dynamicvit:{keep:g}"
        if cfg.quick:
            model = load_asset(method_asset(cfg.backbone, "dynamicvit", keep), root=cfg.asset_root)
        else:
            model = finetune_live(cfg, "dynamicvit", keep, out / "runs" / f"dynamicvit_{keep:g}")
            live[name] = cfg.dynamicvit_steps
        models[name] = model.eval()
        res = evaluate(model, images, labels, desc=name)
        rows.append({"method": "dynamicvit", "keep_rate": keep, **res,
                     "trained": "live" if not cfg.quick else "shipped",
                     "steps": cfg.dynamicvit_steps if not cfg.quick else assets[method_asset(
                         cfg.backbone, "dynamicvit", keep)].get("steps")})
        log(f"      {name:<16} top-1 {res['top1']:5.1f}%  {res['gmacs']:.3f} GMACs")

    log("[3/6] EViT, BAT, ToMe (shipped, each fine-tuned by its recipe: demo_models.json)")
    for keep in cfg.keep_rates:
        for method in METHODS[1:]:
            asset = method_asset(cfg.backbone, method, keep)
            model = load_asset(asset, root=cfg.asset_root).eval()
            r = assets[asset].get("method_kwargs", {}).get("r")
            name = f"{method}:{keep:g}" if r is None else f"tome:{r}"
            res = evaluate(model, images, labels, desc=name)
            rows.append({"method": method, "keep_rate": keep, **({"r": r} if r else {}), **res,
                         "trained": "shipped", "steps": assets[asset].get("steps")})
            models[name] = model
            log(f"      {name:<16} top-1 {res['top1']:5.1f}%  {res['gmacs']:.3f} GMACs")

    log(f"[4/6] DiT (shipped {cfg.dit}: {assets[cfg.dit]['description']}) against its dense PVTv2 twin")
    dit = twin = dit_images = None
    try:
        dit = load_asset(cfg.dit, root=cfg.asset_root).eval()
        twin = load_asset(cfg.dit, root=cfg.asset_root).eval()
    except CheckpointError as e:  # an asset older than the model's code: say so, run the rest
        log(f"      skipped: {e}")
    if dit is not None:
        twin.force_gates("pvt_v2")  # the dense PVTv2 twin: the same weights on PVTv2's route
        dit_size = dit.img_size
        dit_images, dit_labels = val_images(cfg.val_images, dit_size, cfg.seed)
        res = evaluate(dit, dit_images, dit_labels, desc="dit")
        twin_res = evaluate(twin, dit_images, dit_labels, desc="dit twin")
        row = {"method": "dit", "keep_rate": dit.budget, **res, "twin_top1": twin_res["top1"],
               "twin_gmacs": twin_res["gmacs"], "trained": "shipped", "steps": assets[cfg.dit].get("steps")}
        start = next((n for n in assets[cfg.dit].get("needs", []) if assets[n]["model"].startswith("pvt_v2")), None)
        if start is not None:  # the dense PVTv2 DiT was fine-tuned from, before DiT's fine-tune moved its weights
            row["pvt_top1"] = evaluate(load_asset(start, root=cfg.asset_root).eval(), dit_images, dit_labels,
                                       desc=start)["top1"]
        rows.append(row)
        log(f"      dit budget {dit.budget:g}: top-1 {res['top1']:.1f}% at {res['gmacs']:.4f} GMACs "
            f"(PVTv2 route: {twin_res['top1']:.1f}% at {twin_res['gmacs']:.4f}"
            + (f"; {start} before DiT's fine-tune: {row['pvt_top1']:.1f}%)" if start else ")"))

    log("[5/6] timing every model side by side (batch %d, %d interleaved rounds)" % (cfg.bench_batch,
                                                                                   cfg.bench_repeats))
    timed = dict(models, **({"dit": dit, "dit_twin": twin} if dit is not None else {}))
    batches = {"vit": bench_batch(images, cfg.bench_batch)}
    if dit is not None:
        batches["dit"] = bench_batch(dit_images, cfg.bench_batch)
        with torch.no_grad():  # what a batch really runs: every node's gathers are as wide as its busiest image
            executed = dit(batches["dit"], return_info=True)[1].extra["executed_gmacs"] / cfg.bench_batch
        rows[-1]["executed_gmacs"] = float(executed)
    rates = time_models(timed, {k: batches["dit" if k.startswith("dit") else "vit"] for k in timed},
                        cfg.bench_repeats)
    for row, key in zip(rows, list(models) + (["dit"] if dit is not None else [])):
        base_rate, base_gmacs = (rates["dit_twin"], rows[-1]["twin_gmacs"]) if key == "dit" else \
            (rates["dense"], rows[0]["gmacs"])
        row["img_per_s"] = rates[key]
        row["speedup"] = rates[key] / base_rate
        row["ideal_speedup"] = base_gmacs / row["gmacs"]
        row["efficiency"] = row["speedup"] / row["ideal_speedup"]

    log("[6/6] token diversity (BAT Eq. 4) of EViT and BAT, pictures")
    diversity = diversity_curves(cfg, images[:64])
    pictures = draw(cfg, out, rows, models, dit, images, labels, dit_images, diversity)
    claims = check_claims(rows, diversity)
    result = {"rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
              "claims": claims, "diversity": diversity, "pictures": [p.name for p in pictures],
              "val_images": cfg.val_images,
              "config": {"quick": cfg.quick, "dynamicvit_steps": 0 if cfg.quick else cfg.dynamicvit_steps,
                         "keep_rates": list(cfg.keep_rates), "img_size": size,
                         "dit_img_size": dit.img_size if dit is not None else None,
                         "val_images": cfg.val_images, "bench_batch": cfg.bench_batch,
                         "threads": torch.get_num_threads(), "malloc_tunables": malloc_tunables_on()},
              "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    log("")
    log(format_table(result))
    log(f"\nwrote {out / 'results.json'} and {', '.join(p.name for p in pictures)} in {result['seconds']:.0f} s")
    return result


@torch.no_grad()
def diversity_curves(cfg: DemoConfig, images: Tensor, keep_rates=(1.0, 0.9, 0.7, 0.5, 0.3)) -> dict:
    """{method: [[keep_rate, mean diversity of the final tokens], ...]} for EViT and BAT applied to the dense
    `demo_vit` weights (no fine-tune, so every keep rate is measured on the same network)."""
    from .metrics import diversity_score

    x = eval_batch(images, images.shape[-1])
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
    x = eval_batch(images[:n], images.shape[-1])
    keep = cfg.keep_rates[0]
    names = [f"dynamicvit:{keep:g}", f"evit:{keep:g}", f"bat:{keep:g}"] + [k for k in models if k.startswith("tome")][:1]
    per_model = {k: panels_for(models[k], x, [str(int(v)) for v in labels[:n]]) for k in names}
    dit_panels = panels_for(dit, eval_batch(dit_images[:n], dit_images.shape[-1])) if dit is not None else None
    grid_rows, col_titles = [], None
    for b in range(n):
        row = [per_model[names[0]][b][0]] + per_model[names[0]][b][1:]  # input + DynamicViT's three stages
        titles = ["input"] + [f"DynamicViT {keep:g} s{s + 1}" for s in range(len(per_model[names[0]][b]) - 1)]
        for k in names[1:]:
            row.append(per_model[k][b][-1])  # the last stage: what reaches the head
            titles.append({"evit": "EViT", "bat": "BAT", "tome": "ToMe"}[k.split(":")[0]] + " " + k.split(":")[1]
                          + ("" if k.startswith("tome") else " last"))
        if dit_panels is not None:
            row.append(dit_panels[b][-1])
            titles.append(f"DiT budget {dit.budget:g}")
        grid_rows.append(row)
        col_titles = col_titles or titles
    paths.append(save_grid(grid_rows, out / "tokens.png", col_titles=col_titles,
                           title="kept (faded = pruned), merged (one colour per group) and routed tokens"))
    paths.append(plot_diversity(diversity, out / "diversity.png",
                                title="token diversity (BAT Eq. 4) of the final tokens, dense demo_vit weights"))
    return paths


def retrain_assets(output: str, names=None, log=print) -> Path:
    """Re-run the `dynavit train` commands that made the shipped demo models, into OUTPUT/pretrain."""
    root = Path(output) / "pretrain"
    names = names or list(manifest())
    done = []
    for name in names:
        for argv in retrain_commands(name, root):
            if argv in done:
                continue
            run_dir = Path(argv[argv.index("--output") + 1])
            if (run_dir / "summary.json").exists():
                log(f"      {run_dir} is already trained: kept (delete it to retrain)")
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an interrupted retraining: start it again
                run_train(argv, log)
            done.append(argv)
    return root


# ------------------------------------------------------------------------------------------- claims
CLAIM_NAMES = ("dense", "dynamicvit_0.7", "dynamicvit_0.5", "evit_0.7", "bat_vs_evit_0.5", "tome", "dit", "efficiency")


def check_claims(rows: list, diversity: dict) -> list:
    """The papers' claims as the demo's targets, evaluated on this run's numbers: [{claim, holds, detail}, ...].

    A claim whose rows are absent (e.g. `--keep-rates 0.7` only) is left out.
    """
    def row(method, keep=None):
        return next((r for r in rows if r["method"] == method and (keep is None or r["keep_rate"] == keep)), None)

    dense = row("dense")
    claims = [{"name": "dense", "claim": "the dense backbone is good at the task (>= 85% top-1; chance is 10%)",
               "holds": dense["top1"] >= 85.0, "detail": f"dense top-1 {dense['top1']:.1f}%"}]

    def drop_claim(name, method, keep, max_drop, label, extra_cut=None):
        r = row(method, keep)
        if r is None:
            return
        drop, cut = dense["top1"] - r["top1"], 1 - r["gmacs"] / dense["gmacs"]
        holds = drop <= max_drop and (extra_cut is None or cut >= extra_cut)
        text = f"{label} loses <= {max_drop:.1f} point{'s' if max_drop > 1 else ''} of top-1" + (
            f" and cuts GMACs by >= {100 * extra_cut:.0f}%" if extra_cut else "")
        claims.append({"name": name, "claim": text, "holds": holds,
                       "detail": f"top-1 {r['top1']:.1f}% vs {dense['top1']:.1f}% ({-drop:+.1f}), GMACs "
                                 f"-{100 * cut:.0f}%"})

    drop_claim("dynamicvit_0.7", "dynamicvit", 0.7, 1.0, "DynamicViT 0.7", extra_cut=0.30)
    drop_claim("dynamicvit_0.5", "dynamicvit", 0.5, 3.0, "DynamicViT 0.5")
    drop_claim("evit_0.7", "evit", 0.7, 1.5, "EViT 0.7")
    bat, evit = row("bat", 0.5), row("evit", 0.5)
    if bat and evit:
        div = {m: dict((k, v) for k, v in diversity.get(m, [])) for m in ("bat", "evit")}
        d_bat, d_evit = div["bat"].get(0.5), div["evit"].get(0.5)
        diverse = d_bat is not None and d_evit is not None and d_bat >= d_evit
        claims.append({"name": "bat_vs_evit_0.5",
                       "claim": "at keep rate 0.5 BAT is at least as accurate as EViT, with more diverse tokens",
                       "holds": bat["top1"] >= evit["top1"] and diverse,
                       "detail": f"BAT {bat['top1']:.1f}% vs EViT {evit['top1']:.1f}%; diversity BAT {d_bat} vs "
                                 f"EViT {d_evit}"})
    tome = row("tome", 0.7) or row("tome")
    if tome:
        drop_claim("tome", "tome", tome["keep_rate"], 1.5, f"ToMe r={tome.get('r')} (EViT {tome['keep_rate']:g}'s GMACs)")
    dit = row("dit")
    if dit:
        ratio = dit["gmacs"] / dit["twin_gmacs"]
        claims.append({"name": "dit", "claim": "DiT is within 2 points of its dense PVTv2 twin at <= 0.6 of its GMACs",
                       "holds": dit["top1"] >= dit["twin_top1"] - 2.0 and ratio <= 0.6,
                       "detail": f"DiT {dit['top1']:.1f}% vs twin {dit['twin_top1']:.1f}% at {ratio:.2f} of the "
                                 f"twin's GMACs" + (f" (the dense PVTv2 it started from: {dit['pvt_top1']:.1f}%)"
                                                    if "pvt_top1" in dit else "")})
    reduced = [r for r in rows if r["method"] != "dense" and "efficiency" in r]
    if reduced:
        worst = min(reduced, key=lambda r: r["efficiency"])
        claims.append({"name": "efficiency", "claim": "measured speed-ups match the GMACs reductions (efficiency >= 0.9)",
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
    dit = next((r for r in result["rows"] if r["method"] == "dit"), None)
    if dit is not None:
        lines.append("(dit: keep = budget; its speed-up and efficiency are against its dense PVTv2 twin, its gates forced onto PVTv2's route)")
        if dit.get("executed_gmacs"):
            lines.append(f"(dit: a timed batch executes {dit['executed_gmacs']:.4f} GMACs per image, "
                         f"{dit['executed_gmacs'] / dit['twin_gmacs']:.2f} of the twin's: each node gathers as many "
                         "tokens as its busiest image routes there)")
    lines.append("")
    for c in result["claims"]:
        lines.append(f"[{'holds' if c['holds'] else 'does NOT hold'}] {c['claim']}: {c['detail']}")
    return "\n".join(lines)
