#!/usr/bin/env bash
# Throughput of recipes/tiny-char.yaml on N CPU ranks (default 2): trains STEPS steps from scratch after `make demo`
# has prepared data/, then writes bench/results/tiny-char-cpu.md from the run's metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS=${RANKS:-2}
STEPS=${STEPS:-300}
run=bench-tiny-char-$RANKS
rm -rf "runs/$run"
start=$(date +%s)
deepspeed --num_gpus "$RANKS" launch/pretrain.py --recipe recipes/tiny-char.yaml --resume none \
  --set run.name="$run" --set train.max_steps="$STEPS" --set eval.interval=0 --set train.precision=bf16 --set checkpoint.interval=0 >/dev/null 2>&1
wall=$(( $(date +%s) - start ))
summary=$(llmforge summary --run "runs/$run" || true)
{
  echo "# tiny-char on $RANKS CPU ranks"
  echo
  echo "Command: \`RANKS=$RANKS STEPS=$STEPS bash bench/tiny_char_cpu.sh\` on $(nproc) cores, $(python -c 'from importlib.metadata import version as v; print("torch", v("torch") + ", deepspeed", v("deepspeed"))')."
  echo "Measured $(date -u +%Y-%m-%d). Global batch 12 x 256 tokens per rank per step, ZeRO-2, bf16."
  echo
  echo "- wall time of the launch (start-up included): ${wall} s for $STEPS steps"
  echo "- $summary"
  echo
  echo "tokens/s is the median over logging windows of 20 steps (global tokens per wall second)."
} > bench/results/tiny-char-cpu.md
cat bench/results/tiny-char-cpu.md
