#!/usr/bin/env bash
# One device call per stage; everything it makes goes to $OUT (logs, JSON, one tarball of the
# run reports and plots, since a call brings back at most 8 files).
#
#   bash benchmarks/h200_session.sh speedrun   # pretrain + SFT + GRPO demo, then MTP speculative decoding
#   bash benchmarks/h200_session.sh serving    # decode vs transformers, serve load at 64 clients
#   bash benchmarks/h200_session.sh engine     # decode vs transformers with a kernel profile, MTP speculation
#   bash benchmarks/h200_session.sh measure    # TRL side by side, decode, MTP speculation after a short speedrun
#   bash benchmarks/h200_session.sh trl        # GRPO step time: nanoseek vs TRL
#
# Wheels the image lacks (fastapi, uvicorn, trl, ...) come in .whl (benchmarks/device_wheels.txt).
set -uo pipefail
stage=$1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

case $stage in
  speedrun)
    timeout "${SPEEDRUN_LIMIT:-570}" python3 -m nanoseek.cli speedrun --out runs/h200 --minutes "${MINUTES:-1.5}" \
      --grpo-minutes "${GRPO_MINUTES:-4.5}" 2>&1 | tee "$OUT/speedrun.log"
    echo "speedrun done at $(elapsed)s"
    if [ "${SPECULATIVE:-1}" = 1 ] && [ -d runs/h200/sft/final ] && [ "$(elapsed)" -lt 480 ]; then
      OUT=$OUT python3 benchmarks/speculative.py --model runs/h200/sft/final --k 1 2 --batches 1 8 \
        --repeat 2 2>&1 | tee "$OUT/speculative.log"
    fi
    tar czf "$OUT/speedrun_h200.tgz" --exclude='*.safetensors' --exclude='checkpoint*' \
      --exclude='*.pt' runs/h200 2>/dev/null
    ;;
  serving)
    if [ ! -d runs/h200/sft/final ]; then  # a fresh machine: a short MTP-trained model first
      python3 -m nanoseek.cli speedrun --out runs/h200 --minutes 1 --grpo-minutes 0 2>&1 | tail -5
    fi
    OUT=$OUT python3 benchmarks/speculative.py --model runs/h200/sft/final --k 1 2 --batches 1 8 \
      --repeat 2 2>&1 | tee "$OUT/speculative.log"
    echo "speculative done at $(elapsed)s"
    OUT=$OUT python3 benchmarks/decode.py --repeat 3 --profile 2>&1 | grep -v Warning | tee "$OUT/decode.log"
    echo "decode done at $(elapsed)s"
    OUT=$OUT python3 benchmarks/serve_load.py --preset bench-1b --clients 64 --max-batch 64 --requests 4 \
      --new 128 --compile 2>&1 | tail -20 | tee "$OUT/serve_load.log"
    echo "serve done at $(elapsed)s"
    ;;
  engine)  # issue 4: decode vs transformers (+ per-kernel profile), then MTP speculation on a trained model
    OUT=$OUT python3 benchmarks/decode.py --repeat 2 --profile 2>&1 | grep -v Warning | tee "$OUT/decode.log"
    echo "decode done at $(elapsed)s"
    python3 -m nanoseek.cli speedrun --out runs/h200 --minutes "${MINUTES:-1.5}" --grpo-minutes 0 2>&1 \
      | tail -12 | tee "$OUT/speedrun.log"
    echo "speedrun done at $(elapsed)s"
    OUT=$OUT timeout $((575 - $(elapsed))) python3 benchmarks/speculative.py --model runs/h200/sft/final \
      --k 1 2 --batches 1 8 --repeat 2 2>&1 | tee "$OUT/speculative.log"
    ;;
  measure)  # GPU tests, GRPO step vs TRL (compiled rollouts), decode vs transformers, MTP speculation
    timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_engine.py 2>&1 \
      | tail -15 | tee "$OUT/gpu_tests.log"
    OUT=$OUT python3 benchmarks/grpo_trl.py --out "$OUT/grpo_trl.json" --compile-rollouts ${TRL_ARGS:-} 2>&1 \
      | tee "$OUT/grpo_trl.log"
    echo "trl done at $(elapsed)s"
    OUT=$OUT python3 benchmarks/decode.py --repeat 3 --modes compiled graphs --profile 2>&1 | grep -v Warning \
      | tee "$OUT/decode.log"
    echo "decode done at $(elapsed)s"
    python3 -m nanoseek.cli speedrun --out runs/h200 --minutes "${MINUTES:-0.6}" --grpo-minutes 0 2>&1 \
      | tail -12 | tee "$OUT/speedrun.log"
    echo "speedrun done at $(elapsed)s"
    OUT=$OUT timeout $((580 - $(elapsed))) python3 benchmarks/speculative.py --model runs/h200/sft/final \
      --k 1 2 --batches 1 8 --repeat 1 --n 6 --no-compile 2>&1 | tee "$OUT/speculative.log"
    ;;
  all)  # serve load, decode, TRL side by side, then speculative decoding if a trained model is here
    OUT=$OUT python3 benchmarks/serve_load.py --preset bench-1b --clients 64 --max-batch 64 --requests 4 \
      --new 128 --compile 2>&1 | tail -20 | tee "$OUT/serve_load.log"
    echo "serve done at $(elapsed)s"
    OUT=$OUT python3 benchmarks/decode.py --repeat 2 2>&1 | grep -v Warning | tee "$OUT/decode.log"
    echo "decode done at $(elapsed)s"
    OUT=$OUT python3 benchmarks/grpo_trl.py --out "$OUT/grpo_trl.json" --compile-rollouts ${TRL_ARGS:-} 2>&1 \
      | tee "$OUT/grpo_trl.log"
    echo "trl done at $(elapsed)s"
    model=$(ls -d runs/*/sft/final 2>/dev/null | head -1)
    if [ -n "$model" ] && [ "$(elapsed)" -lt 450 ]; then
      OUT=$OUT timeout $((570 - $(elapsed))) python3 benchmarks/speculative.py --model "$model" --k 1 --batches 1 8 \
        --repeat 2 2>&1 | tee "$OUT/speculative.log"
    fi
    ;;
  trl)
    OUT=$OUT python3 benchmarks/grpo_trl.py --compile-rollouts ${TRL_ARGS:-} 2>&1 | tee "$OUT/grpo_trl.log"
    ;;
esac
echo "stage $stage: $(elapsed)s"
