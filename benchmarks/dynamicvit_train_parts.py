"""Where DynamicViT's training-step overhead goes: its parts timed interleaved against the dense ones.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 \
        .venv/bin/python benchmarks/dynamicvit_train_parts.py --batch-size 32 --threads 1

DeiT-S shapes (B, 6 heads, 197 tokens, 64 per head; C = 384). Each call is a forward plus a backward:
- attention of one block: fused SDPA (what dense runs), the authors' explicit masked softmax through autograd
  (`softmax_with_policy`, what DynamicViT training ran before), and `policy_attention` (what it runs now),
  with a hard policy keeping 70 % of the patch tokens;
- one score predictor (B, 196, C) against one dense transformer block (B, 197, C).
A whole training step adds 9 masked attentions (blocks 3-11) and 3 predictors to the dense step's 12 blocks.
Calls are interleaved (A B C A B C ...); medians of wall time are printed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dynavit.layers import Block
from dynavit.methods.dynamicvit import ScorePredictor, policy_attention, softmax_with_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=11)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, H, T, d = args.batch_size, 6, 197, 64
    C, scale = H * d, d ** -0.5
    qkv = torch.randn(B, T, 3, H, d, requires_grad=True)
    policy = torch.cat([torch.ones(B, 1), (torch.rand(B, T - 1) < 0.7).float()], dim=1).requires_grad_()
    grad = torch.randn(B, T, H, d).transpose(1, 2)
    block, predictor = Block(C, H), ScorePredictor(C)
    xb = torch.randn(B, T, C, requires_grad=True)
    xp, keep = torch.randn(B, T - 1, C, requires_grad=True), policy[:, 1:, None].detach()

    def attention(kind):
        def call():
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, d) views, as in layers.Attention
            if kind == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v)
            elif kind == "explicit":
                out = softmax_with_policy((q @ k.transpose(-2, -1)) * scale, policy) @ v
            else:
                out = policy_attention(q, k, v, policy, scale)
            out.backward(grad)
        return call

    parts = {"attention: fused SDPA (dense)": attention("sdpa"),
             "attention: explicit masked softmax (autograd)": attention("explicit"),
             "attention: policy_attention": attention("policy"),
             "dense block (B, 197, C)": lambda: block(xb).sum().backward(),
             "score predictor (B, 196, C)": lambda: predictor(xp, keep).sum().backward()}
    times = {name: [] for name in parts}
    for rnd in range(args.repeats + 1):
        for name, call in parts.items():
            t0 = time.perf_counter()
            call()
            if rnd:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(f"batch {B}, threads {torch.get_num_threads()}, torch {torch.__version__}, median of {args.repeats} "
          f"interleaved forward + backward calls")
    sdpa, blk = med["attention: fused SDPA (dense)"], med["dense block (B, 197, C)"]
    print("| part | ms | vs fused SDPA | vs dense block |\n|---|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.1f} | {ms / sdpa:.2f} | {ms / blk:.3f} |")
    extra = lambda attn: (9 * (med[attn] - sdpa) + 3 * med["score predictor (B, 196, C)"]) / (12 * blk)  # noqa: E731
    print(f"estimated step overhead (9 masked attentions + 3 predictors over 12 dense blocks): "
          f"explicit {1 + extra('attention: explicit masked softmax (autograd)'):.3f}x, "
          f"policy_attention {1 + extra('attention: policy_attention'):.3f}x (embedding, head and loss left out)")


if __name__ == "__main__":
    main()
