"""Short CPU training run: DiT with budget 0.5 vs its dense PVTv2 twin, trained the same way (docs/dit.md).

The protocol follows DynamicViT and the dynamic-routing template: a dense PVTv2 is pre-trained first. Both
models then start from its weights and are fine-tuned the same way (same batches, same order, same optimiser).
Only DiT adds the budget loss, after a warm-up. The script reports, on the validation split:
- the accuracy of both models;
- DiT's average GMACs per image against the twin's. The target is budget x full, and the run passes when
  it lands within 10% of that (|ratio - budget| <= 0.1 * budget);
- eval throughput of both, measured side by side.

    .venv/bin/python benchmarks/dit_train_budget.py                 # demo dataset at 64 px, ~3-4 min on 1 core
    .venv/bin/python benchmarks/dit_train_budget.py --data shapes   # synthetic shapes (no scikit-image needed)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

from dynavit.timing import malloc_tunables_on, reexec_with_malloc_tunables  # noqa: E402

if "--no-reexec" not in sys.argv:  # docs/methods.md section 8: glibc's default malloc thresholds add 10-20% page-fault noise
    reexec_with_malloc_tunables(sys.argv)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dynavit  # noqa: E402
from dynavit.losses_dit import DiTBudgetLoss  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def demo_tensors(split: str, n: int, size: int):
    from dynavit.data.demo import DemoDataset

    ds = DemoDataset(split, n=n, size=size)
    items = [ds[i] for i in range(n)]
    x = torch.stack([im for im, _ in items]).float() / 255
    return (x - MEAN) / STD, torch.tensor([y for _, y in items])


def shapes_tensors(n: int, size: int, seed: int):
    """Disk / square / ring / plus of random scale (4..size/2.5 px), position and colour on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    r = 4 + torch.rand(n, generator=g) * (size / 2.5 - 4)
    cx, cy = (torch.rand(2, n, generator=g) * (size - 2 * r) + r)
    grid = torch.arange(size).float()
    dx = (grid.view(1, 1, -1) - cx.view(-1, 1, 1)).abs() / r.view(-1, 1, 1)  # (n, 1, W)
    dy = (grid.view(1, -1, 1) - cy.view(-1, 1, 1)).abs() / r.view(-1, 1, 1)  # (n, H, 1)
    dist = (dx ** 2 + dy ** 2).sqrt()
    masks = torch.stack([dist < 1, torch.maximum(dx, dy) < 0.85, (dist < 1) & (dist > 0.6),
                         ((dx < 0.3) & (dy < 1)) | ((dy < 0.3) & (dx < 1))], 1)  # (n, 4, H, W)
    mask = masks[torch.arange(n), y].float().unsqueeze(1)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    background = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2 * torch.rand(n, 3, size, size, generator=g)
    x = background * (1 - mask) + colour * mask
    return (x - MEAN) / STD, y


def accuracy_and_gmacs(model, x, y, batch: int):
    model.eval()
    correct, gmacs = 0, []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            if model.family == "dit":
                logits, info = model(x[i:i + batch], return_info=True)
                gmacs.append(info.extra["gmacs"])
            else:
                logits = model(x[i:i + batch])
            correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x), (torch.cat(gmacs).mean().item() if gmacs else None)


def train(model, x, y, args, epochs: int, budget_loss=None):
    torch.manual_seed(args.seed)  # same batch order for both models
    # gates get their own learning rate: Adam moves a parameter ~lr per step, and a gate bias starts at +2
    gates = list(model.gates.parameters()) if hasattr(model, "gates") else []
    rest = [p for n, p in model.named_parameters() if not n.startswith("gates.")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": gates, "lr": args.lr * args.gate_lr_mult,
                                                 "weight_decay": 0.0}], lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(x) // args.batch
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / total)))
    step, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        ratios, losses = [], []
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            if budget_loss is not None:
                logits, info = model(x[idx], return_info=True)
                loss = F.cross_entropy(logits, y[idx]) + budget_loss(info, progress=step / total)
                ratios.append(info.extra["gmacs"].mean().item() / info.extra["gmacs_full"])
            else:
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
        extra = f"  train cost ratio {statistics.mean(ratios):.3f}" if ratios else ""
        print(f"  [{model.family}] epoch {epoch + 1}/{epochs}  loss {statistics.mean(losses):.3f}{extra}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return time.perf_counter() - t0


def throughput(models: dict, x, repeats: int) -> dict:
    """Images/s of each model in eval + inference_mode, interleaved, median of `repeats` (one warm-up each)."""
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()(x)
        for _ in range(repeats):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    return {k: len(x) / statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["demo", "shapes"], default="demo")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--train-n", type=int, default=2560)
    p.add_argument("--val-n", type=int, default=512)
    p.add_argument("--pretrain-epochs", type=int, default=6, help="dense pre-training shared by both")
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs of each model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--budget-weight", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--gate-lr-mult", type=float, default=20.0, help="gate learning rate / backbone learning rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.data == "demo":
        xtr, ytr = demo_tensors("train", args.train_n, args.img_size)
        xva, yva = demo_tensors("val", args.val_n, args.img_size)
    else:
        xtr, ytr = shapes_tensors(args.train_n, args.img_size, args.seed)
        xva, yva = shapes_tensors(args.val_n, args.img_size, args.seed + 1)
    classes = int(max(ytr.max(), yva.max())) + 1
    print(f"data: {args.data} {args.img_size}px, {len(xtr)} train / {len(xva)} val, {classes} classes "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    torch.manual_seed(args.seed)
    dense = dynavit.create_model("pvt_v2_tiny", img_size=args.img_size, num_classes=classes)
    dit = dynavit.create_model("dit_tiny", img_size=args.img_size, num_classes=classes, budget=args.budget)
    crit = DiTBudgetLoss(weight=args.budget_weight, warmup=args.warmup)
    print("dense pre-training", flush=True)
    train(dense, xtr, ytr, args, args.pretrain_epochs)
    acc_pre, _ = accuracy_and_gmacs(dense, xva, yva, args.batch)
    dynavit.load_state_dict(dit, dense.state_dict(), strict=False)  # same start; off-route blocks from the twin
    print(f"pre-trained val accuracy {acc_pre:.3f}; fine-tuning both", flush=True)
    time_dense = train(dense, xtr, ytr, args, args.epochs)
    time_dit = train(dit, xtr, ytr, args, args.epochs, budget_loss=crit)
    acc_dense, _ = accuracy_and_gmacs(dense, xva, yva, args.batch)
    acc_dit, gmacs_dit = accuracy_and_gmacs(dit, xva, yva, args.batch)
    full = dit.full_gmacs((args.img_size, args.img_size))
    assert abs(full - dynavit.count_gmacs(dense, img_size=args.img_size)) < 1e-9
    speed = throughput({"dense": dense, "dit": dit}, xva[:args.batch], repeats=9)
    speed1 = throughput({"dense": dense, "dit": dit}, xva[:1], repeats=31)
    ratio = gmacs_dit / full
    res = dict(data=args.data, img_size=args.img_size, pretrain_epochs=args.pretrain_epochs, epochs=args.epochs,
               budget=args.budget, acc_pretrained=acc_pre,
               dense_gmacs=full, dit_gmacs=gmacs_dit, dit_ratio=ratio,
               within_10pct=abs(ratio - args.budget) <= 0.1 * args.budget,
               acc_dense=acc_dense, acc_dit=acc_dit, train_s_dense=time_dense, train_s_dit=time_dit,
               imgs_per_s_dense=speed["dense"], imgs_per_s_dit=speed["dit"],
               speedup=speed["dit"] / speed["dense"], speedup_batch1=speed1["dit"] / speed1["dense"],
               threads=args.threads, batch=args.batch, glibc_tunables=malloc_tunables_on())
    print(f"\nGMACs/img: dense {full * 1e3:.3f} M, DiT {gmacs_dit * 1e3:.3f} M -> ratio {ratio:.3f} "
          f"(target {args.budget}, within 10%: {res['within_10pct']})")
    print(f"val accuracy: dense {acc_dense:.3f}, DiT {acc_dit:.3f}")
    print(f"eval throughput (batch {args.batch}, fp32, {args.threads} thread(s), tunables "
          f"{'on' if res['glibc_tunables'] else 'off'}): dense {speed['dense']:.0f} img/s, DiT {speed['dit']:.0f} "
          f"img/s -> speed-up {res['speedup']:.2f}x (batch 1: {res['speedup_batch1']:.2f}x); "
          f"efficiency {res['speedup'] * ratio:.2f}")
    print(f"training time: dense {time_dense:.0f} s, DiT {time_dit:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
