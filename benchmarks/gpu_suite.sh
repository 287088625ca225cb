#!/usr/bin/env bash
# The GPU figures of the default-skipping work in one command (repository root, GPU machine):
#   bash benchmarks/gpu_suite.sh [python-with-torch]
# 1. train step, ResNet-110, batch 128: constant vs lax.cond skipping vs compact, fp32 and bf16
# 2. whole epochs of 45k images: constant depth vs the default ('auto') and compact multiples
#    1, 2, 4 (granularity), fp32; constant vs default in bf16
# 3. ours vs PyTorch (eager and torch.compile, fp32 and bf16) in one table
# 4. a user's stock-Flax wrapped branch, survival 0.5 vs 1.0 (convolutions not rerouted on GPU)
# Each appends to benchmarks/results/ (step_gpu.md, train.md, vs_torch_gpu.md, torch_cuda.md).
set -euo pipefail
TORCH_PY="${1:-python}"
python benchmarks/bench_step.py --variants constant,skip-remat-convs,compact --dtype float32 \
    --compile-depths 110,1202
python benchmarks/bench_step.py --variants constant,skip-remat-convs,compact --dtype bfloat16 \
    --compile-depths ""
python benchmarks/bench_train.py --whole-epochs constant,auto,compact-1,compact-2,compact-4 \
    --epochs 3 --train-images 45000
python benchmarks/bench_train.py --whole-epochs constant,auto --dtype bfloat16 \
    --epochs 3 --train-images 45000
python benchmarks/compare_torch.py --torch-python "$TORCH_PY"
python benchmarks/bench_step.py --user-branch --variants constant,skip
