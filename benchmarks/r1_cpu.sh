#!/usr/bin/env bash
# The CPU smoke-scale run of `nanoseek r1` (benchmarks/results/r1/cpu/): a tiny base pretrained
# briefly, then R1-Zero and the full pipeline at a scale a shared 2-core CPU finishes in about an
# hour. It shows the pipeline working end to end, not the H200 run the recipe is sized for
# (benchmarks/device/h200_session.sh r1-zero / r1-full). Every step resumes when run again.
#
#   bash benchmarks/r1_cpu.sh [RUNS_DIR]      # default runs/r1_cpu; results copied to benchmarks/results/r1/cpu
set -euo pipefail
RUNS=${1:-runs/r1_cpu}
RESULTS=benchmarks/results/r1/cpu
NANOSEEK="nice -n 10 ${PYTHON:-python3} -m nanoseek.cli"
BASE_STEPS=${BASE_STEPS:-200}

if [ ! -f "$RUNS/base/final/config.json" ]; then
  $NANOSEEK train --preset tiny --resume --out "$RUNS/base" --steps "$BASE_STEPS" --save-every 100 \
    --data builtin:arithmetic:level=1:n=30000,builtin:arithmetic:level=2:n=3000 \
    lr=5e-3 batch_size=8 seq_len=256 warmup=30
fi
COMMON="eval_n=200 max_new_tokens=64 group_size=8 prompts_per_step=4 grpo_lr=1e-4 save_every=10"
$NANOSEEK r1 --model "$RUNS/base" --task arithmetic --level 1 --stages zero --out "$RUNS/zero" \
  $COMMON zero_steps=30 curve_points=3
$NANOSEEK r1 --model "$RUNS/base" --task arithmetic --level 1 --stages full --out "$RUNS/full" \
  $COMMON cold_start_n=1000 cold_start_steps=100 sft_steps=100 reasoning_steps=20 final_steps=10 \
  curve_points=2 rejection_prompts=100 rejection_samples=4

for run in zero full; do  # the reports, settings, stage results, RL metrics and curves; no weights
  src=$RUNS/$run dst=$RESULTS/$run
  mkdir -p "$dst"
  cp "$src/report.md" "$src/r1.json" "$dst/"
  cp -r "$src/plots" "$dst/"
  for stage in "$src"/*/; do
    name=$(basename "$stage")
    [ -f "$stage/stage.json" ] || continue
    mkdir -p "$dst/$name"
    cp "$stage"/stage.json "$dst/$name/"
    for f in grpo_config.json metrics.jsonl rejection.stats.json; do
      [ -f "$stage/$f" ] && [ "$f" != metrics.jsonl -o -f "$stage/grpo_config.json" ] && cp "$stage/$f" "$dst/$name/"
    done
  done
done
echo "results in $RESULTS"
