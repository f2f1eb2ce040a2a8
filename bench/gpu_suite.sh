#!/usr/bin/env bash
# The GPU benchmark set (one GPU): training-step throughput and MFU of llmforge vs a plain PyTorch loop and HF Llama +
# DeepSpeed for the ~110M, ~340M and ~1B Llama recipes at sequence length 2048 under ZeRO-1 and ZeRO-2, then the
# activation-checkpointing trade-offs at ~340M. Results land in bench/results/<gpu>-<date>-*.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
for size in 125m 350m 1b; do
  for stage in 1 2; do
    $PY bench/train_throughput.py --recipe "recipes/llama-$size.yaml" --set "deepspeed.config=ds_configs/zero$stage.json" \
      --set train.grad_accum_steps=1 --steps "${STEPS:-20}" --warmup 5 \
      --out "bench/results/gpu-llama-$size-zero$stage-throughput.md"
  done
done
$PY bench/activation_ckpt.py --recipe recipes/llama-350m.yaml --set train.grad_accum_steps=1 \
  --out bench/results/gpu-llama-350m-activation-ckpt.md
