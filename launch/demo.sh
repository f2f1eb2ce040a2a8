#!/usr/bin/env bash
# The demo, end to end on 2 CPU ranks: stdlib corpus → char tokenizer → shards → pre-train (ZeRO-2, bf16) → sample.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=recipes/tiny-char.yaml
start=$(date +%s)
llmforge corpus --out data/stdlib-corpus
python launch/train_tokenizer.py --recipe "$RECIPE"
python launch/prepare_data.py --recipe "$RECIPE"
rm -rf runs/tiny-char  # the demo always trains from scratch
precision=()
# bf16 on an x86 CPU without AVX512-BF16 or AMX runs ~2.3x slower than fp32 (emulated): train the demo in fp32 there
if [ "$(uname -m)" = x86_64 ] && ! grep -q -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
  echo "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): the demo trains in fp32"
  precision=(--set train.precision=fp32)
fi
deepspeed --num_gpus 2 launch/pretrain.py --recipe "$RECIPE" --resume none "${precision[@]}"
llmforge summary --run runs/tiny-char
llmforge plot runs/tiny-char
echo "--- sample (prompt: 'def ') ---"
python launch/generate.py --checkpoint runs/tiny-char --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 40
echo "--- demo finished in $(( $(date +%s) - start )) s ---"
