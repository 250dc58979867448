#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go (sized for a lent GPU session: about 6 minutes on an H100/H200).
# Uses whatever python3 holds a CUDA torch (PYTHON=...); runs from the source tree, nothing installed.
#   bash benchmarks/run_gpu.sh            # results in benchmarks/results/ (or $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_machine.txt"
# 1. the CUDA tests (values vs CPU, bf16, policy_attention, autocast training step, inductor, bench)
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
M="--model deit_small_patch16_224 --method dense --method dynamicvit:0.7 --method evit:0.7 --method bat:0.7 --method tome:13"
# 2. the issue's GPU target: batch 256, bfloat16, fused attention, eager then compiled
timeout 150 $PY -m dynavit bench $M --device cuda --dtype bfloat16 --batch-size 256 --json "$OUT/gpu_b256_bf16.json" \
    | tee "$OUT/gpu_b256_bf16.md"
timeout 240 $PY -m dynavit bench $M --device cuda --dtype bfloat16 --batch-size 256 --compile \
    --json "$OUT/gpu_b256_bf16_compile.json" | tee "$OUT/gpu_b256_bf16_compile.md"
# 3. training steps (bf16 weights and activations; forward + backward)
timeout 150 $PY -m dynavit bench $M --device cuda --dtype bfloat16 --batch-size 128 --train \
    --json "$OUT/gpu_train_b128_bf16.json" | tee "$OUT/gpu_train_b128_bf16.md"
