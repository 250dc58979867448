"""Why a DynamicViT fine-tune of the demo backbone prunes what it prunes (docs/demo.md, "Why DynamicViT misses").

    python benchmarks/dynamicvit_diagnose.py CHECKPOINT --keep-rate 0.7 [--images 500]

CHECKPOINT is a `demo_vit` DynamicViT run (`model.safetensors`) or the dense `demo_vit` (fresh predictors).
Prints, on validation images of the demo task:
  - top-1 of the pruned model by path: combined (class head + 0.5 x aux max), class head alone, aux max alone;
  - the training-mode keep ratio of every stage (Gumbel decisions) against its target;
  - the predictors' keep log-probability of the teacher's ten most confident tokens per image ("digit") and of
    the rest, at every stage;
and, on training images, the gradient of each weighted loss term with respect to the decisions, digit vs rest.
"""
from __future__ import annotations

import argparse

import torch

import dynavit
from dynavit.checkpoint import load_checkpoint
from dynavit.data.demo import DemoDataset
from dynavit.data.transforms import eval_batch
from dynavit.demo import val_images
from dynavit.methods.dynamicvit import DynamicViTLoss, dynamicvit_loss, teacher_outputs

WEIGHTS = {"cls": 1.0, "ratio": 2.0 / 3, "kl": 0.5, "token": 0.5}  # the authors' LV-ViT weights (ratio / S)


def train_batch(n: int):
    ds = DemoDataset("train", n=n, size=112)
    return eval_batch(torch.stack([ds[i][0] for i in range(n)]), 112), torch.tensor([ds[i][1] for i in range(n)])


def confident_tokens(teacher_scores: torch.Tensor, y: torch.Tensor, k: int = 10) -> torch.Tensor:
    """(B, N, K) teacher aux scores -> (B, N) mask of the k tokens most confident in the true class."""
    conf = teacher_scores.softmax(-1).gather(2, y.view(-1, 1, 1).expand(-1, teacher_scores.shape[1], 1))[..., 0]
    return torch.zeros_like(conf, dtype=torch.bool).scatter(1, conf.topk(k, dim=1).indices, True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--keep-rate", type=float, default=0.7)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--train-images", type=int, default=64, help="images for the gradient check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model = dynavit.create_model("demo_vit", method="dynamicvit", keep_rate=args.keep_rate)
    report = load_checkpoint(model, args.checkpoint, strict=False)
    fresh = [k for k in report.missing if k.startswith("score_predictor")]
    print(f"{args.checkpoint}: keep rate {args.keep_rate}" + (" (fresh predictors)" if fresh else ""))
    criterion = DynamicViTLoss.for_model(model, token_loss="kl")
    images, y = val_images(args.images, 112)
    x = eval_batch(images, 112)
    top1 = lambda z: 100 * (z.argmax(1) == y).float().mean().item()  # noqa: E731
    model.eval()
    with torch.no_grad():
        tokens = model.forward_state(x).x
        cls, aux = model.head(tokens[:, 0]), model.aux_head(tokens[:, 1:]).amax(1)
        print(f"pruned top-1: combined {top1(cls + model.aux_weight * aux):.1f}%, class head alone {top1(cls):.1f}%, "
              f"aux max alone {top1(aux):.1f}%")
        _, t_scores = teacher_outputs(criterion.teacher, x)
        digit = confident_tokens(t_scores, y)
        model.train()
        out, info = model(x, return_info=True)  # info.extra["keep_logp"]: (B, N) per stage
    for s, (d, r, keep) in enumerate(zip(out.decisions, model.reducer.keep_ratios, info.extra["keep_logp"])):
        print(f"stage {s}: training keep {d.float().mean():.3f} (target {r:.3f}); keep log-prob digit "
              f"{keep[digit].mean():.3f}, rest {keep[~digit].mean():.3f}")
    xt, yt = train_batch(args.train_images)
    t_logits, t_tokens = teacher_outputs(criterion.teacher, xt)
    digit = confident_tokens(t_tokens, yt)
    for term, weight in WEIGHTS.items():
        torch.manual_seed(args.seed + 1)  # the same Gumbel noise for every term
        out = model(xt)
        for d in out.decisions:
            d.retain_grad()
        _, parts = dynamicvit_loss(out, yt, t_logits, t_tokens, criterion.keep_ratios, token_loss="kl")
        (weight * parts[term]).backward()
        cells = []
        for s, d in enumerate(out.decisions):
            kept = d.detach() > 0.5
            g = d.grad
            cells.append(f"s{s} digit {g[digit & kept].mean():+.1e} rest {g[~digit & kept].mean():+.1e}")
        print(f"dL/dD {term:<5} ({parts[term].item():.3f}): " + " | ".join(cells))
        model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
