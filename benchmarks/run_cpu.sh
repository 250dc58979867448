#!/usr/bin/env bash
# The CPU measurements of BENCHMARKS.md, in order. Results land in benchmarks/results/ (JSON + printed tables).
# `dynavit bench` re-executes itself with GLIBC_TUNABLES raising glibc's malloc thresholds (docs/methods.md 8).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=benchmarks/results
mkdir -p "$OUT"
M="--model deit_small_patch16_224 --method dense --method dynamicvit:0.7 --method evit:0.7 --method bat:0.7 --method tome:13"
# 1. the issue's "done when" command: batch 32, float32, + batch-1 latency, + reducer share
$BIN/dynavit bench $M --batch-size 32 --reducer-share --json "$OUT/cpu_b32.json" | tee "$OUT/cpu_b32.md"
# 1b. the same with one thread (robust to a shared CPU: no OpenMP barrier waits on a descheduled thread)
$BIN/dynavit bench $M --batch-size 32 --threads 1 --b1-repeats 0 --json "$OUT/cpu_b32_t1.json" | tee "$OUT/cpu_b32_t1.md"
# 2. training steps: benchmarks/run_train.sh (more rounds, 2 threads and 1 thread)
# 3. where BAT's time goes (op table + reducer share)
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 \
    $BIN/python benchmarks/profile_method.py --method bat:0.7 --batch-size 32 --json "$OUT/profile_bat.json" \
    | tee "$OUT/profile_bat.txt"
# 4. GMACs per stage
for m in "" "--method dynamicvit --keep-rate 0.7" "--method evit --keep-rate 0.7" "--method bat --keep-rate 0.7" \
         "--method tome --r 13"; do
    $BIN/dynavit flops --model deit_small_patch16_224 $m
done | tee "$OUT/flops.md"
# 5. DynamicCNN / DynamicSwin against their dense ConvNeXt-T / Swin-T: whole model and stage 3 (docs/dynamic-hierarchical.md)
$BIN/python benchmarks/dynamic_hier.py --batch 8 --threads 1 --repeats 5 --json "$OUT/dynamic_hier_cpu_b8_t1.json" \
    | tee "$OUT/dynamic_hier_cpu_b8_t1.md"
