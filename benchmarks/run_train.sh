#!/usr/bin/env bash
# Training-step measurements of BENCHMARKS.md (forward + cross-entropy + backward, batch 32), 2 threads and 1 thread.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=benchmarks/results
mkdir -p "$OUT"
M="--model deit_small_patch16_224 --method dense --method dynamicvit:0.7 --method evit:0.7 --method bat:0.7 --method tome:13"
$BIN/dynavit bench $M --batch-size 32 --train --repeats 7 --warmup 1 --json "$OUT/cpu_train_b32.json" | tee "$OUT/cpu_train_b32.md"
$BIN/dynavit bench $M --batch-size 32 --train --repeats 5 --warmup 1 --threads 1 --json "$OUT/cpu_train_b32_t1.json" \
    | tee "$OUT/cpu_train_b32_t1.md"
# DynamicViT's step against dense alone, more rounds (its 1.10x target is within the machine's noise)
M2="--model deit_small_patch16_224 --method dense --method dynamicvit:0.7"
$BIN/dynavit bench $M2 --batch-size 32 --train --repeats 11 --warmup 1 --json "$OUT/cpu_train_dvit_b32.json" \
    | tee "$OUT/cpu_train_dvit_b32.md"
$BIN/dynavit bench $M2 --batch-size 32 --train --repeats 11 --warmup 1 --threads 1 \
    --json "$OUT/cpu_train_dvit_b32_t1.json" | tee "$OUT/cpu_train_dvit_b32_t1.md"
$BIN/dynavit bench --model deit_small_patch16_224 --method dynamicvit:0.7 --method dense --batch-size 32 --train \
    --repeats 11 --warmup 1 --threads 1 --json "$OUT/cpu_train_dvit_b32_t1_reversed.json" \
    | tee "$OUT/cpu_train_dvit_b32_t1_reversed.md"
