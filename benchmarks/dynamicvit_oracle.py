"""Can the demo backbone be pruned by DynamicViT at all? An oracle predictor against what training learns.

    python benchmarks/dynamicvit_oracle.py [--checkpoint RUN] [--images 500]

On `demo_vit` at keep rate 0.7 (docs/demo.md, "Why DynamicViT misses"):
  1. digit locality: a logistic regression on the tokens entering each pruning location, trained on the digit's box
     (patches at least a quarter inside it) of training images; its AUC on validation images;
  2. that probe used as the predictor of every stage (sign +1: keep the digit; -1: drop it; and the fresh
     predictors): inference top-1 (combined / class head alone / aux max over kept tokens) and the fraction of
     digit patches still held by a token after the last stage;
  3. the DynamicViT training loss (class CE, logit KL, token KL; ratio 0) at those decisions, held fixed: the
     loss surface ranks them as top-1 does;
  4. with --checkpoint: the same AUC and recall for a trained DynamicViT run's own predictors.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dynavit
import dynavit.methods.dynamicvit as dvm
from dynavit.checkpoint import load_checkpoint
from dynavit.data import demo as demo_data
from dynavit.data.transforms import eval_batch
from dynavit.assets import ASSET_DIR
from dynavit.methods.dynamicvit import DynamicViTLoss, dynamicvit_loss, teacher_outputs

SIZE, GRID = 112, 14


def digit_patches(split: str, index: int) -> np.ndarray:
    """(196,) bool: patches at least 1/4 inside the digit's box of image `index` (`demo.digit_box`)."""
    top, left, side = demo_data.digit_box(0, split, index, SIZE)
    box = np.zeros((SIZE, SIZE))
    box[top:top + side, left:left + side] = 1
    p = SIZE // GRID
    return box.reshape(GRID, p, GRID, p).mean((1, 3)).reshape(-1) > 0.25


def batch(split: str, n: int):
    ds = demo_data.DemoDataset(split, n=n, size=SIZE)
    items = [ds[i] for i in range(n)]
    x = eval_batch(torch.stack([im for im, _ in items]), SIZE)
    return x, torch.tensor([y for _, y in items]), torch.from_numpy(np.stack([digit_patches(split, i) for i in range(n)]))


class FixedScores(nn.Module):
    """A predictor that keeps the top-k tokens by a per-patch score fixed at the first stage (train or eval)."""

    def __init__(self, stage: int, shared: dict, counts: list):
        super().__init__()
        self.stage, self.shared, self.counts = stage, shared, counts

    def forward(self, x, policy=None):  # x (B, T, C) -> log p (B, T, 2)
        if self.stage == 0:
            self.shared["current"] = self.shared["score_fn"](x)  # (B, N) in patch order
        score = self.shared["current"]
        if self.stage > 0 and not self.training:  # eval: the tokens were gathered in descending score order
            score = score.sort(dim=1, descending=True).values[:, :x.shape[1]]
        if self.training:  # hard decisions = the top-k of the scores (nested, as top-k of the same scores)
            keep = torch.zeros_like(score).scatter(1, score.topk(self.counts[self.stage], dim=1).indices, 1.0)
            logit = 20 * keep - 10
        else:  # inference takes the top-k itself; the scores keep their order
            logit = score
        return torch.stack([logit, -logit], dim=-1).log_softmax(-1)


def auc(score: torch.Tensor, mask: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(mask.reshape(-1).numpy(), score.reshape(-1).numpy()))


def main(argv=None) -> None:
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a demo_vit DynamicViT run (model.safetensors) to compare")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--train-images", type=int, default=512)
    ap.add_argument("--keep-rate", type=float, default=0.7)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    weights = str(ASSET_DIR / "demo_vit.safetensors")
    model = dynavit.create_model("demo_vit", method="dynamicvit", keep_rate=args.keep_rate)
    load_checkpoint(model, weights, strict=False)
    reducer = model.reducer
    xt, yt, mt = batch("train", args.train_images)
    xv, yv, mv = batch("val", args.images)

    dense = dynavit.create_model("demo_vit")
    load_checkpoint(dense, weights)
    dense.eval()

    def tokens_at(x, block):  # patch tokens entering `block` of the dense model (B, N, C)
        with torch.no_grad():
            h = dense.embed(x)
            for blk in dense.blocks[:block]:
                h = blk(h)
        return h[:, 1:]

    print("1. digit locality (linear probe on the tokens entering each pruning location, validation AUC)")
    loc = reducer.locations[0]
    probe = LogisticRegression(max_iter=2000).fit(tokens_at(xt, loc).reshape(-1, dense.embed_dim).numpy(),
                                                  mt.reshape(-1).numpy())
    w = torch.tensor(probe.coef_[0], dtype=torch.float32)
    b = float(probe.intercept_[0])
    for block in reducer.locations:
        feats = tokens_at(xv, block)
        print(f"   block {block}: AUC {auc(feats @ w + b, mv):.3f}")

    print(f"2. the probe as DynamicViT's predictor at keep rate {args.keep_rate:g} ({reducer.keep_counts} tokens)")
    top1 = lambda z, y: 100 * (z.argmax(1) == y).float().mean().item()  # noqa: E731
    shared: dict = {}
    fresh = list(model.score_predictor)
    for s in range(len(fresh)):
        model.score_predictor[s] = FixedScores(s, shared, reducer.keep_counts)
    criterion = DynamicViTLoss.for_model(model, token_loss="kl")
    t_logits, t_tokens = teacher_outputs(criterion.teacher, xt[:64])
    gumbel = dvm.F.gumbel_softmax
    dvm.F.gumbel_softmax = lambda logp, hard=True: F.one_hot(logp.argmax(-1), 2).to(logp.dtype)  # decisions = scores
    try:
        for name, fn in {"keep the digit": lambda x: x @ w + b, "drop the digit": lambda x: -(x @ w + b),
                         "random scores": lambda x: torch.randn(x.shape[:2])}.items():
            shared["score_fn"] = fn
            model.eval()
            with torch.no_grad():
                tokens = model.forward_state(xv).x
                cls, aux = model.head(tokens[:, 0]), model.aux_head(tokens[:, 1:]).amax(1)
                _, info = model(xv, return_info=True)
            recall = (info.patch_to_token[-1] >= 0)[mv].float().mean().item()
            model.train()
            with torch.no_grad():
                out = model(xt[:64])
                _, parts = dynamicvit_loss(out, yt[:64], t_logits, t_tokens, reducer.keep_ratios, ratio_weight=0.0,
                                           token_loss="kl")
            print(f"   {name:<15} top-1 {top1(cls + model.aux_weight * aux, yv):5.1f}% (class head "
                  f"{top1(cls, yv):.1f}%, aux max {top1(aux, yv):.1f}%), digit patches kept {recall:.3f}; "
                  f"3. training loss at these decisions: CE {parts['cls'].item():.3f}, KL {parts['kl'].item():.3f}, "
                  f"token KL {parts['token'].item():.3f}")
    finally:
        dvm.F.gumbel_softmax = gumbel
        for s, p in enumerate(fresh):
            model.score_predictor[s] = p

    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, strict=False)
        model.eval()
        with torch.no_grad():
            _, info = model(xv, return_info=True)
        recall = (info.patch_to_token[-1] >= 0)[mv].float().mean().item()
        print(f"4. {args.checkpoint}: stage-1 predictor AUC {auc(info.extra['keep_logp'][0], mv):.3f}, "
              f"digit patches kept {recall:.3f}")


if __name__ == "__main__":
    main()
