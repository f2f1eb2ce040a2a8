#!/usr/bin/env bash
# The GPU benchmark set (one GPU): training-step throughput, MFU and peak memory of llmforge vs a plain PyTorch loop
# and HF Llama + DeepSpeed for the ~110M, ~340M and ~1B Llama recipes at sequence length 2048 — ZeRO-1 eager, ZeRO-2
# eager and with compiled blocks (train.compile), no activation checkpointing (each fits one 80 GB GPU, per
# `llmforge plan`) — then the activation-checkpointing trade-offs at ~340M, with and without train.loss_chunk and
# train.compile, and the LM head + loss alone at llama-125m's micro-batch (8 x 2048 tokens, d 768, vocabulary
# 32,000): eager, compiled (fused cross-entropy), chunked; and llama-125m with 4 accumulation steps three ways: as
# llmforge runs it, with data.prefetch 0 (inputs read and copied inside the step) and with DeepSpeed's throughput
# timer on (a device synchronisation at every forward and step; off in llmforge). Each throughput table also sets
# `llmforge plan`'s per-GPU total against llmforge's measured peak. Results land in bench/results/gpu-*.md.
# Two more parts: `numerics` holds every shipped ZeRO config (bf16 and fp32, accumulation 1 and 2, tied and untied)
# to the plain-PyTorch fp32 oracle on the GPU, once as shipped and once with overlap_comm on (CUDA streams and
# bucketed, overlapped reduction: what the CPU runs cannot exercise), and FP8 (tensorwise, rowwise) against bf16;
# `fp8` times llama-350m and llama-1b steps with train.fp8 tensorwise and rowwise against bf16.
#
# `docmask`: document-masked attention's CUDA kernel (flex_attention with a block mask) against the CPU path (forward
# and gradients, tests/unit/test_document_mask.py) and timed beside causal and boolean-mask SDPA.
#
#   bash bench/gpu_suite.sh                 # all of it
#   bash bench/gpu_suite.sh 125m 350m loss  # some of it (parts: 125m 350m 1b ckpt loss host numerics fp8 docmask)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
sizes=${*:-125m 350m 1b ckpt loss host numerics fp8 docmask}
for size in $sizes; do
  if [ "$size" = docmask ]; then
    $PY -m pytest -q tests/unit/test_document_mask.py | tee bench/results/gpu-document-mask-tests.txt || true
    $PY bench/document_mask.py --device cuda
    continue
  fi
  if [ "$size" = numerics ]; then  # the tiny-char data (stdlib corpus), 20 steps per variant, one launch per pass
    $PY -m llmforge.cli corpus --out data/stdlib-corpus
    $PY launch/train_tokenizer.py --recipe recipes/tiny-char.yaml
    $PY launch/prepare_data.py --recipe recipes/tiny-char.yaml
    variants=z1.fp32,z2.fp32,z3.fp32,z3off.fp32,z0.fp32,z1.bf16,z2.bf16,z3.bf16,z3off.bf16,z1.bf16.acc2,z2.bf16.acc2
    variants=$variants,z3.bf16.acc2,z2.bf16.untied,z3.bf16.untied,z2.bf16.ckpt-full,z2.bf16.fp8,z2.bf16.fp8row
    for overlap in false true; do
      $PY -m llmforge.cli parity --recipe recipes/tiny-char.yaml --variants "$variants" --steps 20 --one-launch \
        --set deepspeed.overrides.zero_optimization.overlap_comm=$overlap --out "runs/parity-overlap-$overlap" \
        | tee "bench/results/gpu-numerics-overlap-$overlap.txt" || true
    done
    continue
  fi
  if [ "$size" = fp8 ]; then  # FP8 step time and memory against bf16, ZeRO-2, no activation checkpointing
    for model in 350m 1b; do
      for scaling in none tensorwise rowwise; do
        $PY bench/train_throughput.py --recipe "recipes/llama-$model.yaml" --set deepspeed.config=ds_configs/zero2.json \
          --set train.grad_accum_steps=1 --set model.activation_checkpointing.mode=none \
          --set "train.fp8.scaling=$scaling" --steps "${STEPS:-20}" --warmup 5 --rounds 1 \
          --out "bench/results/gpu-llama-$model-fp8-$scaling-throughput.md"
      done
    done
    continue
  fi
  if [ "$size" = ckpt ]; then
    $PY bench/activation_ckpt.py --recipe recipes/llama-350m.yaml --set train.grad_accum_steps=1 --loss-chunk 2048 \
      --compile --out bench/results/gpu-llama-350m-activation-ckpt.md
    continue
  fi
  if [ "$size" = host ]; then  # the host-wait levers: llmforge's defaults, data.prefetch 0, DeepSpeed's timer on
    for variant in default data.prefetch=0 deepspeed.overrides.timers.throughput.enabled=true; do
      set_variant=()
      [ "$variant" = default ] || set_variant=(--set "$variant")
      $PY bench/train_throughput.py --recipe recipes/llama-125m.yaml --set deepspeed.config=ds_configs/zero2.json \
        --set train.grad_accum_steps=4 --set model.activation_checkpointing.mode=none "${set_variant[@]}" \
        --steps "${STEPS:-20}" --warmup 5 --out "bench/results/gpu-llama-125m-host-${variant%%=*}-throughput.md"
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
