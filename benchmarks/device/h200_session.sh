#!/usr/bin/env bash
# One device call per stage; everything it makes goes to $OUT: JSON results, the logs in logs.tgz,
# and for the speedrun a tarball of its reports and plots (a call brings back at most 8 files).
#
#   bash benchmarks/device/h200_session.sh speedrun   # pretrain + SFT + GRPO demo, then MTP speculation if time is left
#   bash benchmarks/device/h200_session.sh decode     # GPU tests, decode vs transformers (+ profile), GRPO step vs TRL
#   bash benchmarks/device/h200_session.sh mtp        # GPU tests, MTP speculation after a short speedrun, serve load
#   bash benchmarks/device/h200_session.sh spec       # its short form: burst GPU tests, MTP after a 0.3-min speedrun
#   bash benchmarks/device/h200_session.sh measure    # GPU tests, GRPO step vs TRL, decode vs transformers (+ kernel
#                                              # profile), MTP speculation after a short speedrun
#   bash benchmarks/device/h200_session.sh fused      # fused decode step: tests, launch shapes tuned (one pass),
#                                              # accuracy and speed per bucket, then decode vs transformers
#                                              # with those shapes (fused and compiled modes)
#   bash benchmarks/device/h200_session.sh tune       # fused decode step: tests, launch shapes tuned, speed per bucket
#   bash benchmarks/device/h200_session.sh step       # the batch decode step: small-batch experts and engine GPU
#                                              # tests, experts shapes swept, where steps at 8 and 32 go
#   bash benchmarks/device/h200_session.sh serve      # serve load at 64 clients
#   bash benchmarks/device/h200_session.sh trl        # GRPO step time: nanoseek vs TRL
#   bash benchmarks/device/h200_session.sh gputests   # every test marked gpu (FP8, fused step, engine)
#   bash benchmarks/device/h200_session.sh fp8check   # FP8 fast path vs twin per GEMM and op
#   bash benchmarks/device/h200_session.sh fp8train   # BF16 vs FP8 training speed on V2-Lite layers
#   bash benchmarks/device/h200_session.sh fp8deep    # expert GEMMs alone; BF16 vs FP8 training, most V2-Lite layers
#   bash benchmarks/device/h200_session.sh parity     # FP8 vs BF16 loss parity (small, 2,000 steps), BF16's seed spread
#   bash benchmarks/device/h200_session.sh shapes     # decode on V2-Lite: fused vs compiled recorded as the
#                                              # default path (shapes-v3: the same on a V3 slice)
#   bash benchmarks/device/h200_session.sh fusedtune  # the fused step's GPU tests at real widths, its launch
#                                              # searched on 8 V2-Lite layers (FUSED_TUNING of shapes)
#   bash benchmarks/device/h200_session.sh fusedtune-v3   # the same search on the V3 slice
#   bash benchmarks/device/h200_session.sh fp8accum   # BF16 vs FP8 training at 16 micro-batches a step
#   bash benchmarks/device/h200_session.sh tma        # the TMA attention kernel's GPU tests, V3's attention
#                                              # swept with its launches
#   bash benchmarks/device/h200_session.sh fp8        # FP8-resident decode vs BF16 on all 27 V2-Lite layers
#   bash benchmarks/device/h200_session.sh fp8fused   # the fused step on FP8 weights: its GPU tests at real widths,
#                                              # then FP8 vs BF16 through it on V2-Lite's 27 layers at batch 1
#   bash benchmarks/device/h200_session.sh fp8paths   # the FP8 model's fused vs compiled step recorded: V2-Lite
#                                              # (8 layers), the V3 slice
#   bash benchmarks/device/h200_session.sh fusedtune-fp8 # the fused step's launch searched on FP8 weights
#   bash benchmarks/device/h200_session.sh fp8fused-v3   # FP8 vs BF16 on the V3 slice, fused and compiled, the
#                                              # FP8 paths recorded
#   bash benchmarks/device/h200_session.sh fp8twin    # FP8 decode at batch 1: the FP8 GEMV kernel vs Inductor's fused
#                                              # dequantization, V2-Lite's 8 layers (profiled), the V3 slice
#   bash benchmarks/device/h200_session.sh verify16   # compiled kernels' engine test, one-row launch, V3 attention
#   bash benchmarks/device/h200_session.sh probe      # the grouped FP8 kernel: compiled code, launch shapes, a TMA candidate
#   bash benchmarks/device/h200_session.sh serving    # serve load, prefix cache
#   bash benchmarks/device/h200_session.sh check      # the engine's decode paths against a no-cache reference
#   bash benchmarks/device/h200_session.sh attention  # MLA decode attention at V3 widths, fused launches swept
#   bash benchmarks/device/h200_session.sh one        # the most needed of shapes and fp8 in one call
#   bash benchmarks/device/h200_session.sh r1-zero    # `nanoseek r1 --stages zero` from a `small` pretrained model
#   bash benchmarks/device/h200_session.sh r1-full    # `nanoseek r1 --stages full` from the same base
#                                              # (each call goes on where the last stopped while the machine
#                                              # stays warm: call again until r1_*.log ends with "report:")
#   bash benchmarks/device/h200_session.sh r1-short   # the same pipeline sized for one call (~8 min on an H100):
#                                              # an 800-step base, 200-step SFTs, 30 + 15 RL steps
#   bash benchmarks/device/h200_session.sh r1-zero-short   # R1-Zero sized for one call: 80 GRPO steps
#   bash benchmarks/device/h200_session.sh multigpu   # on a 2- or 4-GPU kind: DP, EP, EP+DP, 1F1B, DualPipeV
#                                              # (and at 4, DualPipeV+EP overlapped and in turn) against one
#                                              # GPU (benchmarks/scaling.py, small preset)
#   CLAIM=moe bash benchmarks/device/h200_session.sh claim   # papers' claims, gpu scale (8 min each by default)
#
# Environment: LAYERS (fp8deep); MINUTES, GRPO_MINUTES, SPEEDRUN_LIMIT, SPECULATIVE (speedrun);
# R1_LEVEL, R1_BASE (the base's run directory), R1_PRETRAIN_STEPS, R1_ARGS (r1-zero, r1-full: key=value
# settings of nanoseek r1), R1_LIMIT (their seconds, 585 by default); TRL_ARGS (trl, measure);
# CLAIM (claim: one or more of moe, balancing, attention, mtp, fp8, specialization), CLAIM_MINUTES;
# DECODE_ARGS (decode, measure: e.g. "--tuned-option combo_kernels=true"); DECODE_MODES (decode.py --modes);
# FUSED_ARGS (benchmarks/fused_decode.py); FUSED_TUNING (shapes: the fused step's launch, recorded with the
# paths); FP8_FUSED_TUNING (fp8fused, fp8paths: the FP8 rows' fused launch, fusedtune-fp8's JSON);
# SCALING_ARGS (benchmarks/scaling.py, multigpu: e.g. "--preset deepseek-v2-lite --layers 8");
# GIT_COMMIT: the commit the tree is at, recorded in the JSON results (the device's copy of .git may
# still read an older HEAD than the working tree it was sent).
# Wheels the image lacks (fastapi, uvicorn, trl, ...) come in .whl (benchmarks/device/device_wheels.txt).
set -uo pipefail
start=${CALL_START:-$(date +%s)}  # stages chained in one call share its clock (export CALL_START first)
stage=${1:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# once per machine: stages started side by side in one call (staggered) would otherwise rewrite
# /tmp/site while another imports from it
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed
fi
[ -f /tmp/site/.installed ] && export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( $1 - $(elapsed) )); }  # seconds until second $1 of the call
enough() {  # limit, least useful seconds: a part with less time than that is skipped, saying so
  [ "$1" -ge "$2" ] && return 0
  echo "${FUNCNAME[1]} skipped: $1 s left, it needs $2" | tee -a "$OUT/skipped.log"
  return 1
}

quiet() {  # drops Python's warnings, but not those that say something failed (a compile fallback);
          # line by line, so that a call cut off mid-run still brings back the log so far (mawk,
          # Debian's awk, reads a pipe in blocks whatever it flushes: it kept a cut-off log empty)
  grep --line-buffered -v -P '^(?!.*failed).*Warning'
}
# the parts; each takes a time limit in seconds and logs to $OUT
gpu_tests() {  # limit, test files and pytest options
  local limit=$1; shift
  enough "$limit" 30 || return
  # -rA: the log names every test and its outcome (a log of dots shows neither)
  timeout "$limit" python3 -m pytest -m gpu -rA -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  echo "gpu tests done at $(elapsed)s"
}
short_speedrun() {  # limit, minutes: pretrain + SFT only, a model with MTP for speculation
  enough "$1" 120 || return
  timeout "$1" python3 -m nanoseek.cli speedrun --out runs/h200 --minutes "$2" --grpo-minutes 0 2>&1 \
    | tail -12 | tee "$OUT/speedrun.log"
  echo "speedrun done at $(elapsed)s"
}
speculation() {  # limit: MTP K = 1, 2 at batch 1, 8 on the speedrun's SFT model
  enough "$1" 30 || return
  OUT=$OUT timeout "$1" python3 benchmarks/speculative.py --model runs/h200/sft/final --k 1 2 --batches 1 8 \
    --repeat 1 --n 6 --no-compile 2>&1 | tee "$OUT/speculative.log"
  echo "speculative done at $(elapsed)s"
}
fused() {  # limit: the fused decode step's tests on the GPU, then benchmarks/fused_decode.py $FUSED_ARGS
  enough "$1" 60 || return
  local until=$(( $(elapsed) + $1 ))
  timeout "$(( $1 < 150 ? $1 : 150 ))" python3 -m pytest -rA -p no:cacheprovider tests/test_fused_decode.py 2>&1 \
    | tee "$OUT/fused_tests.log" | tail -25
  local rest=$(( until - $(elapsed) ))
  enough "$rest" 60 || return
  OUT=$OUT timeout "$rest" python3 benchmarks/fused_decode.py --profile ${FUSED_ARGS:-} 2>&1 | quiet \
    | tee "$OUT/fused_decode.log"
  echo "fused done at $(elapsed)s"
}
decode() {  # limit: bench-1b decode vs transformers, with the kernel profile
  enough "$1" 200 || return
  OUT=$OUT timeout "$1" python3 benchmarks/decode.py --repeat 3 --modes ${DECODE_MODES:-compiled graphs} --profile ${DECODE_ARGS:-} 2>&1 \
    | quiet | tee "$OUT/decode.log"
  echo "decode done at $(elapsed)s"
}
trl() {  # limit: a GRPO step, nanoseek vs TRL
  enough "$1" 150 || return
  OUT=$OUT timeout "$1" python3 benchmarks/grpo_trl.py --out "$OUT/grpo_trl.json" --compile-rollouts \
    ${TRL_ARGS:-} 2>&1 | tee "$OUT/grpo_trl.log"
  echo "trl done at $(elapsed)s"
}
step() {  # limit: kernels/moe.py's and the engine's GPU tests, then benchmarks/decode_step.py
  enough "$1" 200 || return
  gpu_tests 150 tests/test_moe_kernels.py tests/test_engine.py tests/test_gpu.py
  OUT=$OUT timeout "$(left "$1")" python3 benchmarks/decode_step.py --buckets 8 32 --moe-sweep --profile \
    --repeat 3 2>&1 | quiet | tee "$OUT/decode_step.log"
  echo "step done at $(elapsed)s"
}
serve() {  # limit: 64 streaming clients against serve --compile
  enough "$1" 90 || return
  OUT=$OUT timeout "$1" python3 benchmarks/serve_load.py --preset bench-1b --clients 64 --max-batch 64 \
    --requests 4 --new 128 --compile 2>&1 | tail -20 | tee "$OUT/serve_load.log"
  echo "serve done at $(elapsed)s"
}
r1() {  # limit, zero|full, arithmetic level: the `small` base pretrained once (resumable), then `nanoseek r1`,
        # which resumes a stopped run (runs/ stays on a warm machine); its report, figures and stage results ->
        # $OUT/r1_<stages>.tgz
  local until=$(( $(elapsed) + $1 )) base=${R1_BASE:-runs/r1/base}
  if [ ! -f "$base/final/config.json" ]; then
    timeout "$(left "$until")" python3 -m nanoseek.cli train --preset small --resume --out "$base" \
      --data builtin:arithmetic:level=1:n=30000,builtin:arithmetic:level=2:n=3000,builtin:arithmetic:level=3:n=3000 \
      --steps "${R1_PRETRAIN_STEPS:-1500}" --save-every 250 lr=2e-3 batch_size=32 seq_len=512 warmup=50 compile=true \
      2>&1 | quiet | tail -3 | tee -a "$OUT/r1_base.log"
  fi
  enough "$(left "$until")" 60 || return
  # SIGTERM 30 s before the call's end: the step in flight finishes and is saved (a ~4 s GRPO
  # step and a save), so the next call goes on from there, not from the last save_every
  timeout -k 10 "$(( $(left "$until") - 30 ))" python3 -m nanoseek.cli r1 --model "$base" --task arithmetic \
    --level "${R1_LEVEL:-$3}" --stages "$2" --out "runs/r1/$2" ${R1_ARGS:-} 2>&1 | quiet \
    | tee -a "$OUT/r1_$2.log"
  tar czf "$OUT/r1_$2.tgz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='tb' "runs/r1/$2" 2>/dev/null
  echo "r1 $2 call done at $(elapsed)s"
}

real_decode() {  # limit, decode.py arguments: a real-shape decode run, its JSON and log kept
  enough "$1" 60 || return
  local limit=$1; shift
  OUT=$OUT timeout "$limit" python3 benchmarks/decode.py "$@" 2>&1 | quiet | tee -a "$OUT/decode_shapes.log"
  echo "decode $* done at $(elapsed)s"
}
fp8_weight_tests() {  # log name: the FP8-resident weights' GPU tests (tests/test_fp8_weights.py)
  timeout 120 python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_fp8_weights.py -k "gpu" 2>&1 \
    | tail -12 | tee "$OUT/$1"
}
bench() {  # limit, least seconds, script and its arguments, logged to $OUT/<script>.log
  enough "$1" "$2" || return
  local limit=$1; shift 2
  local name; name=$(basename "$1" .py)
  OUT=$OUT timeout "$limit" python3 "$@" 2>&1 | quiet | tee -a "$OUT/$name.log" | tail -30
  echo "$name done at $(elapsed)s"
}

case $stage in
  gputests)  # every test marked gpu: on an H100 the FP8 files alone took 94 s, so they get a call;
             # first the fast-vs-twin FP8 table, which localises a failing FP8 test to a GEMM or a layer
    bench 90 20 benchmarks/fp8_fast_vs_twin.py
    gpu_tests "$(left 570)" -p no:logging tests/test_fp8.py tests/test_fp8_weights.py tests/test_fused_decode.py \
      tests/test_moe_kernels.py tests/test_inference_config.py tests/test_gpu.py tests/test_engine.py \
      tests/test_decode_paths.py tests/test_engine_speculative.py
    ;;
  fp8check)  # the FP8 fast path against its twin, GEMM by GEMM and op by op (also the tests that are
             # not marked gpu but take the GPU when there is one); training speed is fp8train's
    bench 75 20 benchmarks/fp8_fast_vs_twin.py
    timeout "$(left 150)" python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_fp8.py \
      tests/test_fp8_weights.py tests/test_fused_decode.py -k "fast_fp8 or scaled_mm or w8a8 or model_loss or \
      dequantized_models_tokens or real_layer_widths" 2>&1 | tee "$OUT/fp8_tests.log" | tail -15
    ;;
  fp8train)  # the FP8 kernels against the twin, BF16 vs FP8 training speed on V2-Lite layers (4 micro-batches
             # a step, as a real global batch amortizes AdamW; weights cast or quantized once a step, compiled;
             # each also with fused gradient accumulation) with a kernel table of each, then the FP8 GPU tests
             # in what is left (the compiled once-a-step quantization and the token quantizer first)
    bench 100 20 benchmarks/fp8_fast_vs_twin.py  # its sweep times the kernels' launch shapes for ~50 (N, K)
    bench "$(left 470)" 100 benchmarks/train_throughput.py --preset deepseek-v2-lite --layers 4 --seq 4096 --batch 1 \
      --accum 4 --precision bf16,bf16-fused-accum,fp8,fp8-fused-accum --skip-hf --profile
    python3 benchmarks/profile_categories.py "$OUT"/profile_train_*.txt 2>&1 | tee "$OUT/profile_categories.txt"
    timeout "$(left 590)" python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_train_precision.py \
      tests/test_fp8.py -k "compiled_once_a_step or gpu_grouped or fast_fp8_swiglu or byte_for_byte or fused_acc" 2>&1 \
      | tee "$OUT/fp8_tests.log" | tail -12
    ;;
  fp8deep)  # the expert GEMMs alone, then BF16 vs FP8 training speed on the most V2-Lite layers that fit (8 on
            # an H200's 141 GB, 6 on an H100's 80 GB; LAYERS= to choose), where the expert GEMMs outweigh the
            # BF16 head and AdamW
    # first the expert GEMMs alone, FP8 against BF16, at V2-Lite's and bench-1b's shapes
    bench 90 30 benchmarks/fp8_grouped_gemm.py --preset deepseek-v2-lite
    bench "$(left 140)" 30 benchmarks/fp8_grouped_gemm.py --preset bench-1b --tokens 8192
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    bench "$(left 590)" 100 benchmarks/train_throughput.py --preset deepseek-v2-lite \
      --layers "${LAYERS:-$([ "${mib:-0}" -gt 100000 ] && echo 8 || echo 6)}" --seq 4096 --batch 1 --accum 4 \
      --precision bf16,fp8 --skip-hf
    ;;
  parity)  # FP8 vs BF16 loss parity, 2,000 steps of the small preset with the committed tokenizer: FP8 at
           # seed 1 alone (558 s on an H100 at seed 0; beside two BF16 runs it did not finish in 600 s),
           # then joined with the committed BF16 and FP8 runs, so FP8 gets a seed spread as BF16 has
    enough "$(left 590)" 200 || exit
    R=benchmarks/results/fp8_parity
    OUT=$OUT timeout "$(left 585)" python3 benchmarks/fp8_loss_parity.py --preset small --steps 2000 --batch 8 \
      --seq 256 --compile --only fp8 --seed 1 --tokenizer $R/tokenizer > "$OUT/parity_fp8_seed1.log" 2>&1
    tail -n 3 "$OUT/parity_fp8_seed1.log"
    OUT=$OUT python3 benchmarks/fp8_loss_parity.py --join $R/fp8_loss_parity_bf16_seed1.json \
      "$OUT/fp8_loss_parity_fp8_seed1.json" $R/fp8_loss_parity_bf16.json $R/fp8_loss_parity_bf16_rerun.json \
      2>&1 | tee "$OUT/parity_join_seed1.log"
    ;;
  shapes)  # decode on V2-Lite's 27 layers, fused vs compiled (the fused step takes models without a query LoRA
           # since 90c8ed6), recorded into decode_paths.json (brought back in $OUT), the compiled step's kernels
           # profiled at batch 1 and 32 (decode_profile.txt: where 48% of the roofline goes); transformers is skipped:
           # loading V2-Lite's 27 layers into it and compiling ours took longer than 150 s on an H100
           # (benchmarks/results/h100_first_run); the V3 slice is shapes-v3 (here it ran out of the call)
    real_decode "$(left 585)" --preset deepseek-v2-lite --batches 1 32 --new 64 --repeat 2 --modes compiled fused \
      --record-paths --skip-hf --profile ${FUSED_TUNING:+--fused-tuning "$FUSED_TUNING"}
    cp nanoseek/infer/decode_paths.json "$OUT/"
    ;;
  shapes-v3)  # the same on a V3 slice (two layers), batch 1 and 32
    real_decode "$(left 585)" --preset deepseek-v3 --layers 2 --batches 1 32 --new 64 --repeat 2 --modes compiled \
      fused --record-paths --skip-hf
    cp nanoseek/infer/decode_paths.json "$OUT/"
    ;;
  fp8accum)  # BF16 vs FP8 training at 16 micro-batches a step, where AdamW's share a token is a quarter of 4's,
             # and the wgrad autotuner times its 3-stage launches (64x128, 128x64)
    bench "$(left 585)" 100 benchmarks/train_throughput.py --preset deepseek-v2-lite --layers 4 --seq 4096 --batch 1 \
      --accum 16 --steps 4 --warmup 2 --precision bf16,bf16-fused-accum,fp8-fused-accum --skip-hf
    ;;
  fp8)  # FP8-resident decode against BF16 on V2-Lite's 27 layers, the whole call: on an H100 the BF16 row alone
        # took most of 420 s and the FP8 model's compile did not finish in the rest (the V3 slice: fp8twin)
    real_decode "$(left 585)" --preset deepseek-v2-lite --batches 1 --new 64 --modes compiled --fp8 --fp8-kernels auto \
      --skip-hf
    ;;
  fp8fused)  # the fused step reading FP8 weights in place: FP8 against BF16 through the fused step on V2-Lite's
             # 27 layers at one row (no Inductor compile: the compiled FP8 step on 27 layers did not fit a call),
             # then its GPU tests at V2-Lite's and V3's widths (with the split down and tensor-core up kernels)
    real_decode "$(left 450)" --preset deepseek-v2-lite --batches 1 --new 64 --repeat 3 --modes fused --fp8 \
      --fp8-kernels auto --skip-hf ${FP8_FUSED_TUNING:+--fp8-fused-tuning "$FP8_FUSED_TUNING"}
    timeout "$(left 590)" python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_fused_decode.py -k \
      "(real_layer_widths and (fp8 or down_split or up_dot or attend_tma)) or w8a8" 2>&1 | tail -16 \
      | tee "$OUT/fused_gpu_tests.log"
    ;;
  fp8paths)  # the FP8 model's decode paths recorded (fused against compiled at one row; the table is keyed by the
             # layers' widths, not their number): V2-Lite's first 8 layers, then the V3 slice
    real_decode "$(left 330)" --preset deepseek-v2-lite --layers 8 --batches 1 --new 64 --repeat 3 \
      --modes fused compiled --fp8 --fp8-kernels auto --skip-hf --record-paths fp8 \
      ${FP8_FUSED_TUNING:+--fp8-fused-tuning "$FP8_FUSED_TUNING"}
    real_decode "$(left 585)" --preset deepseek-v3 --layers 2 --batches 1 --new 64 --repeat 3 --modes fused compiled \
      --fp8 --fp8-kernels auto --skip-hf --record-paths fp8
    cp nanoseek/infer/decode_paths.json "$OUT/"
    ;;
  fusedtune-fp8)  # the fused step's launch searched on FP8 weights (8 V2-Lite layers): a weight row is half the
                  # bytes, so the rule's rows a program (set for BF16) may be too few; the search stops
                  # starting trials after TUNE_BUDGET s (240), leaving a chained fp8fused its time
    bench "$(left 585)" 120 benchmarks/fused_decode.py --preset deepseek-v2-lite --layers 8 --buckets 1 --tune 1 \
      --tune-budget "${TUNE_BUDGET:-240}" --repeat 3 --fp8 --profile
    ;;
  fp8fused-v3)  # the same on the V3 slice, beside the compiled step (its faster BF16 path), the FP8 paths recorded
    real_decode "$(left 585)" --preset deepseek-v3 --layers 2 --batches 1 --new 64 --repeat 3 --modes fused compiled \
      --fp8 --fp8-kernels auto --skip-hf --record-paths fp8
    cp nanoseek/infer/decode_paths.json "$OUT/"
    ;;
  fp8gemv)  # the FP8 GPU tests, then the FP8 linear, SwiGLU and one token's experts alone (fp8_gemv.py: GEMV,
            # split and unsplit kernel, BF16 at decode rows; dequantized vs W8A8 vs BF16 at prefill rows;
            # gate+up in one launch vs two; the experts four ways, each compiled: most of its time)
    fp8_weight_tests fp8_gpu_tests.log
    bench "$(left 585)" 30 benchmarks/fp8_gemv.py --repeat 5
    ;;
  gemvprof)  # fp8gemv, then fusedprof's first part, in one call (the device came seldom): the FP8 GEMV
             # defaults decided, then the compiled, gemv-experts and fused steps on 8 V2-Lite layers profiled
    fp8_weight_tests fp8_gpu_tests.log
    bench "$(left 300)" 30 benchmarks/fp8_gemv.py --repeat 3
    real_decode "$(left 585)" --preset deepseek-v2-lite --layers 8 --batches 1 --new 64 --repeat 2 \
      --modes compiled gemv-experts fused --skip-hf --profile
    ;;
  fp8twin)  # FP8-resident decode at batch 1 on V2-Lite's first 8 layers (compiling 27 several times does not
            # fit a call) and the V3 slice: FP8Linear's kernels, weight-only (auto: the GEMV, the routed experts
            # and an MLP's gate and up through it since 1d2b236 and 6468c76) against W8A8 (the issue asks for
            # both; the twin, dequantized in the step, ran at 0.79x), the last kernel named profiled
    real_decode "$(left 330)" --preset deepseek-v2-lite --layers 8 --batches 1 --new 64 --modes compiled --fp8 \
      --fp8-kernels ${FP8_KERNELS:-w8a8 auto} --skip-hf --profile
    real_decode "$(left 585)" --preset deepseek-v3 --layers 2 --batches 1 --new 64 --modes compiled --fp8 \
      --fp8-kernels ${FP8_KERNELS:-w8a8 auto} --skip-hf
    ;;
  fusedtune)  # the fused step's GPU tests at real widths (the down kernel split over its slots among them),
              # then its launch shapes searched at V2-Lite's widths (8 layers, one row: its rule was tuned
              # on bench-1b), its accuracy against float32 and its speed against the compiled step,
              # profiled; fused_tuning_deepseek-v2-lite_8L.json is what decode.py --fused-tuning reads
    timeout 240 python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_fused_decode.py -k \
      "real_layer_widths or as_accurate" 2>&1 | tail -12 | tee "$OUT/fused_gpu_tests.log"
    bench "$(left 585)" 120 benchmarks/fused_decode.py --preset deepseek-v2-lite --layers 8 --buckets 1 --tune 1 \
      --repeat 3 --profile
    ;;
  fusedtune-v3)  # the same search on the V3 slice (its float32 twin would not fit an H100 beside it: no accuracy
                 # rows); with the rule's launch the fused step lost there, 569 to the compiled step's 599 tokens/s
    bench "$(left 585)" 120 benchmarks/fused_decode.py --preset deepseek-v3 --layers 2 --buckets 1 --tune 1 \
      --repeat 3 --no-reference
    ;;
  fp8batch)  # FP8-resident decode past one row (V2-Lite's first 8 layers, batch 4 and 32): the linears' split-K
             # tensor-core kernel and the experts' small-batch kernels on FP8 weights, against BF16
    real_decode "$(left 585)" --preset deepseek-v2-lite --layers 8 --batches 4 32 --new 64 --modes compiled --fp8 \
      --fp8-kernels auto --skip-hf
    ;;
  fusedprof)  # the fused step's kernels beside the compiled step's at one row, V2-Lite's first 8 layers: on all
              # 27 the fused step ran at 0.95x of the compiled one (f7ead35); where its time goes; and the
              # compiled step with the routed down projections by the GEMV (expert path gather_gemv)
    real_decode "$(left 450)" --preset deepseek-v2-lite --layers 8 --batches 1 --new 64 --repeat 2 \
      --modes compiled gemv-experts fused --skip-hf --profile
    # the batch-1 step without coordinate-descent tuning: Inductor then leaves one-row matmuls to
    # cuBLAS instead of decomposing them into reductions fused with the norms (the down projections
    # fused so read at 35-45% of the bandwidth)
    real_decode "$(left 585)" --preset deepseek-v2-lite --layers 8 --batches 1 --new 64 --repeat 2 \
      --modes compiled --skip-hf --tuned-option coordinate_descent_tuning=False
    ;;
  verify16)  # the kernels in compiled steps: the engine's token test on the copying model, the one-row launch
             # at V3's widths, the choice rule; then V3's attention at 32K and 128K with that launch
    timeout 200 python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_latent_attention.py \
      tests/test_fused_decode.py -k "engine_decodes or one_row or choice or real_widths or real_layer" 2>&1 \
      | tail -16 | tee "$OUT/verify16_tests.log"
    fp8_weight_tests verify16_fp8_tests.log
    bench "$(left 585)" 60 benchmarks/attention.py --contexts 32768 131072 --batches 1 16 --mixed
    ;;
  probe)  # the grouped FP8 kernel's compiled code and each launch shape's time, with a TMA-loading candidate
    bench "${PROBE_LIMIT:-170}" 30 benchmarks/fp8_kernel_probe.py
    # the same kernels' registers and spills as this image's Triton compiles them (no GPU time)
    bench 60 20 benchmarks/kernel_resources.py --candidates --attention
    ;;
  one)  # the first of each when only one call is to be had (about 8 minutes): V2-Lite decode (fused vs
        # compiled, FP8 weights), training throughput BF16 vs FP8
    real_decode "$(left 250)" --preset deepseek-v2-lite --batches 1 32 --new 64 --repeat 2 --modes compiled fused --record-paths
    cp nanoseek/infer/decode_paths.json "$OUT/"
    real_decode "$(left 340)" --preset deepseek-v2-lite --batches 1 --new 64 --repeat 2 --modes compiled --fp8 --skip-hf
    bench "$(left 460)" 90 benchmarks/train_throughput.py --preset deepseek-v2-lite --layers 4 --seq 4096 --batch 1 \
      --precision bf16,fp8
    ;;
  verify)  # after the CPU-only changes: the token quantizer's GPU tests; the attention kernels' tests on the GPU
            # (units, padding rows, the engine's compiled step with them, V3 widths); BF16 vs FP8 training (~8 min)
    timeout 150 python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_fp8.py \
      -k "byte_for_byte or fast_fp8_swiglu or grouped_kernels or launch_shape" 2>&1 \
      | tee "$OUT/verify_fp8_tests.log" | tail -8
    timeout 200 python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_latent_attention.py \
      tests/test_fused_decode.py -k "units or padding or latent or decode_attention or engine_decodes or real_layer" \
      2>&1 | tee "$OUT/verify_attention_tests.log" | tail -14
    bench "$(left 585)" 100 benchmarks/train_throughput.py --preset deepseek-v2-lite --layers 4 --seq 4096 --batch 1 \
      --accum 4 --precision bf16,fp8 --skip-hf --profile
    python3 benchmarks/profile_categories.py "$OUT"/profile_train_*.txt 2>&1 | tee "$OUT/profile_categories.txt"
    ;;
  longctx)  # the compiled decode step's MLA attention, kernels against the absorbed attention, in engines whose
           # cache (32K) is longer than their requests (1K prompts), as a server's is: V3's widths, then V2-Lite's
    real_decode "$(left "${V3_END:-300}")" --preset deepseek-v3 --layers 2 --prompt 1024 --new 64 --batches 1 16 \
      --repeat 2 --modes kernel-attention torch-attention --max-len 32768 --skip-hf
    real_decode "$(left "${END:-580}")" --preset deepseek-v2-lite --layers 8 --prompt 1024 --new 64 --batches 1 16 --repeat 2 \
      --modes kernel-attention torch-attention --max-len 32768 --skip-hf
    ;;
  check)  # which engine path leaves the no-cache reference's greedy tokens; the attention kernels' tests;
          # the grouped FP8 kernels (the accumulating one too) and FP8 steps compiled, fused accumulation or not;
          # an FP8 checkpoint's experts in a prefill
    timeout 220 python3 benchmarks/decode_attention_check.py --trace 2>&1 | quiet \
      | tee "$OUT/decode_attention_check.log"
    timeout 170 python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_latent_attention.py \
      tests/test_fused_decode.py -k "not fused_decode or real_layer" 2>&1 | tail -30 \
      | tee "$OUT/check_attention_tests.log"
    timeout 170 python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_fp8.py tests/test_fp8_weights.py \
      -k "gpu_grouped_kernels or compile_with_fullgraph or fp8_experts" 2>&1 | tail -10 | tee "$OUT/check_fp8_tests.log"
    ;;
  attention)  # MLA decode attention at V3's widths (compute-bound at 128 heads), 4K-128K, batch 1 and 16, the
              # fused launch swept (~4 min); then V2-Lite's 16 heads (memory-bound) as time allows
    bench 420 30 benchmarks/attention.py --contexts 4096 32768 131072 --batches 1 16 --mixed --sweep
    bench "$(left 580)" 60 benchmarks/attention.py --preset deepseek-v2-lite --contexts 4096 32768 131072 \
      --batches 1 16 --mixed --sweep
    ;;
  tma)  # the TMA attention kernel (attend_tma: 64 heads on wgmma, the latent copied by TMA): its GPU tests, then
        # V3's attention at 32K and 128K with its launches swept, beside the rule's and the engine's op (the
        # target: 75% of the bandwidth); TMA_UNTIL: the second of the call it must end by (585)
    timeout 150 python3 -m pytest -rA -p no:cacheprovider -p no:logging tests/test_latent_attention.py -k \
      real_widths 2>&1 | tail -12 | tee "$OUT/tma_gpu_tests.log"
    bench "$(left "${TMA_UNTIL:-585}")" 60 benchmarks/attention.py --contexts 32768 131072 --batches 1 16 --sweep-tma
    ;;
  serving)  # the server under 64 clients, prefix caching, then the engine alone at the load's batch, greedy and
            # sampled as the load samples (the server's decode steps took ~5x decode.json's: which part is it?)
    bench 300 60 benchmarks/serve_load.py --preset bench-1b --clients 64 --max-batch 64 --requests 4 --new 128 --compile
    bench "$(left 400)" 60 benchmarks/prefix_cache.py --preset bench-1b --requests 64 --system-tokens 2000 --compile
    for t in 0 0.8; do
      mkdir -p "$OUT/temperature_$t"
      OUT=$OUT/temperature_$t bench "$(left 590)" 60 benchmarks/decode.py --preset bench-1b --prompt 32 --new 128 \
        --batches 64 --modes compiled --skip-hf --repeat 2 --temperature $t
    done
    ;;
  speedrun)
    timeout "${SPEEDRUN_LIMIT:-570}" python3 -m nanoseek.cli speedrun --out runs/h200 --minutes "${MINUTES:-1.5}" \
      --grpo-minutes "${GRPO_MINUTES:-4.5}" 2>&1 | tee "$OUT/speedrun.log"
    echo "speedrun done at $(elapsed)s"
    if [ "${SPECULATIVE:-1}" = 1 ] && [ -d runs/h200/sft/final ]; then
      speculation "$(left 585)"
    fi
    tar czf "$OUT/speedrun_h200.tgz" --exclude='*.safetensors' --exclude='checkpoint*' \
      --exclude='*.pt' runs/h200 2>/dev/null
    ;;
  decode)  # GPU tests, decode vs transformers (+ kernel profile), GRPO step vs TRL
    gpu_tests 240 tests/test_gpu.py tests/test_engine.py
    decode "$(left 470)"
    trl "$(left 585)"
    ;;
  mtp)  # GPU tests, MTP speculation on a short speedrun's model, then serve load
    gpu_tests 150 tests/test_gpu.py tests/test_engine.py tests/test_engine_speculative.py
    short_speedrun 300 "${MINUTES:-0.6}"
    speculation "$(left 460)"
    serve "$(left 585)"
    ;;
  spec)  # the short form of mtp (~5 min): the burst GPU tests, a 0.3-minute speedrun, MTP speculation
    gpu_tests 70 tests/test_engine.py -k captured
    short_speedrun 180 "${MINUTES:-0.3}"
    speculation "$(left 265)"
    ;;
  measure)  # all but serving: GPU tests, GRPO step vs TRL, decode vs transformers, MTP speculation
    gpu_tests 100 tests/test_gpu.py tests/test_engine.py
    trl 200
    decode "$(left 400)"
    short_speedrun "$(left 500)" "${MINUTES:-0.6}"
    speculation "$(left 580)"
    ;;
  fused)  # the fused decode step: its tests, launch shapes tuned, accuracy and speed per bucket, then decode
          # vs transformers with those shapes (fused and compiled modes)
    FUSED_ARGS="--tune 1 --no-compiled ${FUSED_ARGS:-}" fused 200
    tuned=""; [ -f "$OUT/fused_tuning.json" ] && tuned="--fused-tuning $OUT/fused_tuning.json"
    DECODE_MODES=${DECODE_MODES:-fused compiled} DECODE_ARGS="${DECODE_ARGS:-} $tuned" decode "$(left 585)"
    ;;
  tune)  # the fused step's tests, then its launch shapes tuned at batch 1 and its speed per bucket
    FUSED_ARGS="--tune 2 --no-compiled ${FUSED_ARGS:-}" fused 585
    ;;
  multigpu)  # N = 1, 2 (and 4 where there are 4 GPUs) processes; NVLink multicast off in every one. The overlap
             # alone: SCALING_ARGS="--gpus 1 4 --configs DualPipeV+EP DualPipeV+EP-no-overlap"
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    gpus=$(nvidia-smi -L | wc -l)
    counts="1 2"; [ "$gpus" -ge 4 ] && counts="1 2 4"
    bench "$(left 530)" 120 benchmarks/scaling.py --gpus $counts --run-timeout 150 ${SCALING_ARGS:-}
    ;;
  claim)  # the papers' claims at the gpu scale (CLAIM="mtp fp8": moe|balancing|attention|mtp|fp8|specialization),
          # the call's time shared among them; 8 minutes each at the default budget, CLAIM_MINUTES sets it.
          # Each result folder comes back under $OUT/claims/gpu/<name>/
    # CLAIM_PARALLEL=1 runs them at once on the one GPU (small eager models leave most of it idle), each
    # with the call's whole time and a share of the CPU threads
    read -ra claims <<< "${CLAIM:?set CLAIM to experiment names}"
    claim() {  # limit, name
      timeout "$1" python3 -m nanoseek.cli experiment "$2" --device cuda --out "$OUT/claims" \
        ${CLAIM_MINUTES:+--budget-minutes "$CLAIM_MINUTES"} 2>&1 | quiet > "$OUT/claim_$2.log"
      echo "claim $2 done at $(elapsed)s"
    }
    limit=$(( (590 - $(elapsed)) / ${#claims[@]} ))
    [ -n "${CLAIM_PARALLEL:-}" ] && limit=$(left 590)
    enough "$limit" 200 || exit
    for c in "${claims[@]}"; do
      if [ -n "${CLAIM_PARALLEL:-}" ]; then
        OMP_NUM_THREADS=$(( $(nproc) / ${#claims[@]} )) claim "$limit" "$c" &
      else
        claim "$limit" "$c"
      fi
    done
    wait
    tail -n 12 "$OUT"/claim_*.log
    ;;
  step) step 585 ;;
  serve) serve 585 ;;
  trl) trl 585 ;;
  r1-zero) r1 "${R1_LIMIT:-585}" zero 2 ;;
  # at level 2 the base answered 93.6% and the cold start 99.6%: no room for RL
  r1-full) r1 "${R1_LIMIT:-585}" full 3 ;;
  r1-short)  # on an H100 beside the check stage: base 123 s, then the six stages 291 s (456 s with the wheels)
    R1_PRETRAIN_STEPS=${R1_PRETRAIN_STEPS:-800} R1_ARGS=${R1_ARGS:-"cold_start_steps=200 sft_steps=200 \
reasoning_steps=30 final_steps=15 curve_points=3 rejection_prompts=1000 eval_n=400"} r1 "${R1_LIMIT:-585}" full 3 ;;
  r1-zero-short)  # R1-Zero in one call, as the two-call run but 80 steps: the 1,500-step base ~145 s, ~3.6 s a
                  # step and four held-out evaluations of 500 (the run's rollouts started climbing near step 60)
    R1_BASE=${R1_BASE:-runs/r1/base1500} R1_PRETRAIN_STEPS=${R1_PRETRAIN_STEPS:-1500} \
      R1_ARGS=${R1_ARGS:-"zero_steps=80 curve_points=4 eval_n=500"} r1 "${R1_LIMIT:-585}" zero 2 ;;
  *) echo "unknown stage $stage: gputests, fp8check, fp8train, fp8deep, parity, shapes, fp8, one, serving, speedrun," \
       "decode, mtp, spec, measure, fused, tune, probe, multigpu, step, serve, trl, r1-zero, r1-full, r1-short,"\
       "r1-zero-short or claim" >&2
     exit 2 ;;
esac
echo "stage $stage: $(elapsed)s"
# a call returns at most 8 files: everything travels as one archive
(cd "$OUT" && tar czf /tmp/results.tgz . && rm -rf ./* && mv /tmp/results.tgz .)
