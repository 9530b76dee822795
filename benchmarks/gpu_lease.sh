#!/usr/bin/env bash
# One prepared run for a lent GPU machine (15 minutes of device time a session, 10 per command): the product's loop
# beside the bare step with its start-up, the memory estimate under CUDA autocast, the speed levers, caching
# throughput, each stage under its own timeout.
# The device tool returns at most 8 files: $OUT gets two, rewritten after every stage (so a cut run keeps what
# finished): results.md (every stage's tables) and lease.tar.gz (each stage's .md, .json and log).
#   here, once:   bash ../shared/gpu/pack-for-gpu.sh          # .device/bundle.tar.xz: Ray, diffusers, quanto, DeepSpeed
#   optional:     pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#                   -d .device torchao==0.17.0               # 3 MB; the fp8 stage runs only with it (torch 2.11 there)
#   device tool:  run command="bash benchmarks/gpu_lease.sh 2>&1 | tail -c 11000" carry=[".device"] timeout_s=590
# Then copy the tables of results.md into benchmarks/RESULTS.md with the card's name.
#   rehearsal:    SMOKE=1 bash benchmarks/gpu_lease.sh       # on a CPU at reduced size (gpu.py --cpu-smoke): checks
#                                                            # every stage runs before device minutes are spent on it
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled RAY_DEDUP_LOGS=0
OUT=${OUT:-/tmp/gpu-lease}; mkdir -p "$OUT"
RUN=$(mktemp -d)  # each stage's files; packed into $OUT after each stage
SMOKE=${SMOKE:-0}
T0=$(date +%s); DEADLINE=${DEADLINE:-570}
(( SMOKE == 1 )) && DEADLINE=${DEADLINE_SMOKE:-1500}  # a 2-core CPU takes longer than the GPU will
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
stage() {  # stage NAME SECONDS SCRIPT ARGS...: run benchmarks/SCRIPT ARGS under a timeout that fits what is left
  local name=$1 limit=$2 script=$3; shift 3
  local t=$(( $(left) - 10 < limit ? $(left) - 10 : limit ))
  if (( t < 30 )); then echo "=== $name: skipped, ${t}s left"; return; fi
  echo "=== t=$(( $(date +%s) - T0 ))s $name (timeout ${t}s)"
  local extra=(); [[ $script == gpu.py ]] && extra=(--json "$RUN/$name.json")
  [[ $script == gpu.py && $SMOKE == 1 ]] && extra+=(--cpu-smoke)
  timeout "$t" python3 "benchmarks/$script" "$@" "${extra[@]}" --results "$RUN/$name.md" > "$RUN/$name.log" 2>&1
  echo "$name rc=$?"
  grep -E "images/s|x the bare|baseline|SD3.5 Large \\| (attention|4) |\| (Ray Data|single)|fit\(\)|\| (bare|product) \|" "$RUN/$name.log" | tail -10 |
    cut -c1-240
  cat "$RUN"/*.md > "$OUT/results.md" 2>/dev/null; tar czf "$OUT/lease.tar.gz" -C "$RUN" .
  # A killed stage's Ray would keep the GPU. Not in a rehearsal: it would also stop any other Ray on the machine.
  [[ $SMOKE == 1 ]] || ray stop --force > /dev/null 2>&1
}
if [[ -f .device/bundle.tar.xz ]]; then
  mkdir -p ~/site && tar xJf .device/bundle.tar.xz -C ~/site && export PYTHONPATH=~/site:$PWD
fi
for wheel in .device/torchao-*.whl; do [[ -f $wheel ]] && python3 -m zipfile -e "$wheel" ~/site; done
W=${BENCH_DIR:-$HOME/bench-gpu}  # shaped pipelines, caches and runs
SIZE="--resolutions 1024 --batch 2" ATTN="cudnn flash" LARGE_PIPE=$W/pipeline-large-38x38 CACHE_RES=1024 CACHE_IMAGES=64
if [[ $SMOKE == 1 ]]; then  # gpu.py --cpu-smoke's own sizes (2 layers x 4 heads, 256 px, batch 1)
  W=${BENCH_DIR:-$HOME/bench-gpu-smoke} SIZE="" ATTN=math CACHE_RES=256 CACHE_IMAGES=8; LARGE_PIPE=$W/pipeline-large-2x4
else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
# Large first: the bare step, three levers on the same model, then the product's loop on a Large-shaped pipeline
# (product/bare, MFU, and the start-up of a Large run with a warm cache); 3 steps of each profiled (device busy,
# syncs, top kernels).
stage large 280 gpu.py --models large $SIZE --steps 10 --warmup 3 --product --profile 3 --workdir "$W" \
  --levers skip-lora-casts $ATTN
# The memory estimate under CUDA's own autocast (2 blocks of each model, seconds): what the CPU checks emulate.
ESTIMATE=(--device cuda); [[ $SMOKE == 1 ]] && ESTIMATE=(--device cpu --models "SD3 Medium" --kinds int8)
stage estimate 60 estimate.py "${ESTIMATE[@]}"
stage medium 170 gpu.py --models medium $SIZE --steps 10 --warmup 3 --product --profile 3 --workdir "$W" \
  --levers skip-lora-casts
# Caching throughput through Ray Data's pools on the Large-shaped pipeline (SD3's VAE, T5-XXL-wide encoders).
stage caching 100 caching.py --model "$LARGE_PIPE" --resolution $CACHE_RES --images $CACHE_IMAGES --repeats 1
stage compile 130 gpu.py --models large $SIZE --steps 8 --warmup 2 --levers compile compile-graphs
if python3 -c "import bitsandbytes" 2>/dev/null; then  # not in the bundle (43 MB): only where the image has it
  [[ $SMOKE == 1 ]] || stage lowvram 90 gpu.py --models large --resolutions 512 --batch 1 --quantize nf4 --optimizer lion8bit_paged \
    --gradient-checkpointing --steps 6 --warmup 2
else echo "=== lowvram: skipped, no bitsandbytes on this machine"; fi
# FP8 for the frozen base (torchao float8, compiled) against compile alone, on top of it: last, as it may not pay.
if python3 -c "import torchao" 2>/dev/null; then
  stage fp8 120 gpu.py --models large $SIZE --steps 8 --warmup 2 --levers compile fp8
else echo "=== fp8: skipped, no torchao (see the header)"; fi
echo "=== done at t=$(( $(date +%s) - T0 ))s"
