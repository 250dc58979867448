"""Does a dense backbone leave chance on the demo task? A bare training loop printing the learning curve.

    python benchmarks/demo_learning_probe.py --model pvt_v2_tiny --variant tokenlabel --lr 1e-3 --steps 1600

Used to choose how the demo's DiT twin (PVTv2) must be trained (docs/demo.md, "DiT on the demo"). Variants:
  plain       cross-entropy on the model's own head (`pvt_v2_tiny` with global_pool='max');
  tokmax      PVTv2's head applied to every 1/32 token, max over tokens (LV-ViT's aux-head form);
  convstem    PVTv2 with a BN + ReLU convolutional stem (`ConvStem`, stride 4, one dilated grid conv) in place
              of its 7x7 overlapping patch embedding (Xiao et al. 2021);
  tokenlabel  plain + token labelling (LV-ViT) at the 1/8 map: KL to the shipped `demo_cnn`'s per-token scores
              (its 14 x 14 token grid is PVTv2's 1/8 map at 112 px), through a Linear on PVTv2's 1/8 tokens.
Prints, every --every steps: mean cross-entropy, training accuracy, and for tokenlabel the token KL and the
accuracy of the 1/8 tokens' max (does the early map locate digits?). Batch 32, AdamW, clip 1.0, constant lr.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import dynavit
from dynavit.losses import token_label_loss
from dynavit.data.demo import DemoDataset
from dynavit.data.transforms import eval_batch

VARIANTS = ("plain", "tokmax", "convstem", "tokenlabel")


class ConvStemEmbed(nn.Module):
    """PVTv2's patch-embedding interface ((B, N, C), (H', W')) over a stride-4 ConvStem + LayerNorm."""

    def __init__(self, img_size: int, dim: int):
        super().__init__()
        from dynavit.models.vit import ConvStem
        self.stem = ConvStem(img_size, 4, 3, dim, widths=(16, 32), grid_convs=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.stem(x)), (x.shape[2] // 4, x.shape[3] // 4)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pvt_v2_tiny", help="pvt_v2_tiny or demo_cnn (the reference that learns)")
    ap.add_argument("--variant", choices=VARIANTS, default="plain")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--token-weight", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    pvt = args.model.startswith("pvt")
    model = dynavit.create_model(args.model, **(dict(img_size=112, global_pool="max") if pvt else {}))
    if args.variant != "plain" and not pvt:
        raise SystemExit(f"--variant {args.variant} needs a PVTv2 model, got {args.model}")
    params = list(model.parameters())
    if args.variant == "tokmax":
        model.forward_head = lambda last_map, pre_logits=False: model.head(last_map.flatten(2).transpose(1, 2)).amax(1)
    elif args.variant == "convstem":
        model.patch_embed = ConvStemEmbed(112, model.embed_dims[0])
        params = list(model.parameters())
    elif args.variant == "tokenlabel":
        from dynavit.assets import load_asset
        from dynavit.models.pvt_v2 import to_tokens
        teacher = load_asset("demo_cnn").eval()
        token_head = nn.Linear(model.embed_dims[1], 10)
        params += list(token_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    data = DemoDataset("train", n=args.steps * args.batch_size, size=112)
    sums, t0 = {}, time.time()
    for step in range(args.steps):
        idx = range(step * args.batch_size, (step + 1) * args.batch_size)
        x = eval_batch(torch.stack([data[i][0] for i in idx]), 112)
        y = torch.tensor([data[i][1] for i in idx])
        if args.variant == "tokenlabel":
            maps = model.forward_features(x)
            logits = model.forward_head(maps[-1])
            scores = token_head(to_tokens(maps[1]))  # (B, 196, 10)
            with torch.no_grad():
                target = teacher.aux_head(teacher.norm(teacher.patch_embed(x)))  # (B, 196, 10)
            token_kl = token_label_loss(scores, target)
            ce = F.cross_entropy(logits, y)
            loss = ce + args.token_weight * token_kl
            parts = {"token_kl": token_kl.item(), "token_max_acc": (scores.amax(1).argmax(1) == y).float().mean().item()}
        else:
            logits = model(x)
            loss = ce = F.cross_entropy(logits, y)
            parts = {}
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        parts.update(ce=ce.item(), acc=(logits.argmax(1) == y).float().mean().item())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            n = (step % args.every) + 1
            print(f"{args.model} {args.variant} lr {args.lr:g} step {step + 1} ({time.time() - t0:.0f}s): "
                  + " ".join(f"{k} {v / n:.3f}" for k, v in sums.items()), flush=True)
            sums = {}


if __name__ == "__main__":
    main()
