#!/usr/bin/env bash
# The GPU benchmark set (one GPU): training-step throughput, MFU and peak memory of llmforge vs a plain PyTorch loop
# and HF Llama + DeepSpeed for the ~110M, ~340M and ~1B Llama recipes at sequence length 2048 — ZeRO-1 eager, ZeRO-2
# eager and with compiled blocks (train.compile), no activation checkpointing (each fits one 80 GB GPU, per
# `llmforge plan`) — then the activation-checkpointing trade-offs at ~340M, with and without train.loss_chunk and
# train.compile, and the LM head + loss alone at llama-125m's micro-batch (8 x 2048 tokens, d 768, vocabulary
# 32,000): eager, compiled (fused cross-entropy), chunked; and llama-125m with 4 accumulation steps with data.prefetch
# 0 and 2 (inputs read and copied inside the step, or ahead into pinned memory). Each throughput table also sets
# `llmforge plan`'s per-GPU total against llmforge's measured peak. Results land in bench/results/gpu-*.md.
#
#   bash bench/gpu_suite.sh                 # all of it
#   bash bench/gpu_suite.sh 125m 350m loss  # some of it (parts: 125m 350m 1b ckpt loss prefetch; minutes each)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
sizes=${*:-125m 350m 1b ckpt loss prefetch}
for size in $sizes; do
  if [ "$size" = ckpt ]; then
    $PY bench/activation_ckpt.py --recipe recipes/llama-350m.yaml --set train.grad_accum_steps=1 --loss-chunk 2048 \
      --compile --out bench/results/gpu-llama-350m-activation-ckpt.md
    continue
  fi
  if [ "$size" = prefetch ]; then  # data.prefetch 0 (read and copy in the step) against the default 2
    for depth in 0 2; do
      $PY bench/train_throughput.py --recipe recipes/llama-125m.yaml --set deepspeed.config=ds_configs/zero2.json \
        --set train.grad_accum_steps=4 --set model.activation_checkpointing.mode=none --set "data.prefetch=$depth" \
        --steps "${STEPS:-20}" --warmup 5 --out "bench/results/gpu-llama-125m-prefetch$depth-throughput.md"
    done
    continue
  fi
  if [ "$size" = loss ]; then
    $PY bench/lm_loss.py --tokens 16384 --d-model 768 --vocab 32000 --chunk 2048 --steps 30 \
      --out bench/results/gpu-llama-125m-lm-loss.md
    continue
  fi
  rounds=6
  [ "$size" = 1b ] && rounds=1  # three ~1B trainers do not fit in one GPU together
  for stage in 1 2; do
    extra=()
    [ "$stage" = 2 ] && extra=(--compile)
    $PY bench/train_throughput.py --recipe "recipes/llama-$size.yaml" \
      --set "deepspeed.config=ds_configs/zero$stage.json" --set train.grad_accum_steps=1 --set model.activation_checkpointing.mode=none \
      --steps "${STEPS:-20}" --warmup 5 --rounds "$rounds" "${extra[@]}" \
      --out "bench/results/gpu-llama-$size-zero$stage-throughput.md"
  done
done
