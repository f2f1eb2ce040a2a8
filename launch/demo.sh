#!/usr/bin/env bash
# The demo, end to end on 2 CPU ranks: stdlib corpus → char tokenizer → shards → pre-train (ZeRO-2, precision auto) → sample.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=recipes/tiny-char.yaml
start=$(date +%s)
llmforge corpus --out data/stdlib-corpus
python launch/train_tokenizer.py --recipe "$RECIPE"
python launch/prepare_data.py --recipe "$RECIPE"
rm -rf runs/tiny-char  # the demo always trains from scratch
# train.precision: auto — bf16 where the CPU computes it natively (AVX512-BF16, AMX), fp32 elsewhere (logged)
deepspeed --num_gpus 2 launch/pretrain.py --recipe "$RECIPE" --resume none
llmforge summary --run runs/tiny-char
llmforge plot runs/tiny-char
echo "--- sample (prompt: 'def ') ---"
python launch/generate.py --checkpoint runs/tiny-char --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 40
echo "--- demo finished in $(( $(date +%s) - start )) s ---"
