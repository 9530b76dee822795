#!/usr/bin/env bash
# One prepared run for a lent GPU machine (15 minutes of device time a session, 10 per command): the product's loop
# beside the bare step, then the speed levers, each stage under its own timeout, logs and JSON under $OUT.
#   here, once:   bash ../shared/gpu/pack-for-gpu.sh          # .device/bundle.tar.xz: Ray, diffusers, quanto, DeepSpeed
#   device tool:  run command="bash benchmarks/gpu_lease.sh 2>&1 | tail -c 11000" carry=[".device"] timeout_s=590
# Then copy the tables (each stage's .md) into benchmarks/RESULTS.md with the card's name.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled RAY_DEDUP_LOGS=0
OUT=${OUT:-/tmp/gpu-lease}; mkdir -p "$OUT"
T0=$(date +%s); DEADLINE=${DEADLINE:-570}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
stage() {  # stage NAME SECONDS ARGS...: run benchmarks/gpu.py ARGS under a timeout that fits what is left
  local name=$1 limit=$2; shift 2
  local t=$(( $(left) - 10 < limit ? $(left) - 10 : limit ))
  if (( t < 30 )); then echo "=== $name: skipped, ${t}s left"; return; fi
  echo "=== t=$(( $(date +%s) - T0 ))s $name (timeout ${t}s)"
  timeout "$t" python3 benchmarks/gpu.py "$@" --json "$OUT/$name.json" --results "$OUT/$name.md" \
    > "$OUT/$name.log" 2>&1; echo "$name rc=$?"
  grep -E "images/s|x the bare|baseline" "$OUT/$name.log" | tail -4 | cut -c1-240
  ray stop --force > /dev/null 2>&1  # a killed stage's Ray would keep the GPU
}
if [[ -f .device/bundle.tar.xz ]]; then
  mkdir -p ~/site && tar xJf .device/bundle.tar.xz -C ~/site && export PYTHONPATH=~/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
W=$HOME/bench-gpu
stage medium-product 200 --models medium --resolutions 1024 --batch 2 --steps 10 --warmup 3 --product --workdir "$W"
stage large-product 230 --models large --resolutions 1024 --batch 2 --steps 10 --warmup 3 --product --workdir "$W"
stage large-cudnn 60 --models large --resolutions 1024 --batch 2 --steps 8 --warmup 2 --attention cudnn
stage large-flash 60 --models large --resolutions 1024 --batch 2 --steps 8 --warmup 2 --attention flash
stage large-compile 120 --models large --resolutions 1024 --batch 2 --steps 8 --warmup 2 --compile
if python3 -c "import bitsandbytes" 2>/dev/null; then  # not in the bundle (43 MB): only where the image has it
  stage lowvram 120 --models large --resolutions 512 --batch 1 --quantize nf4 --optimizer lion8bit_paged \
    --gradient-checkpointing --steps 6 --warmup 2
else echo "=== lowvram: skipped, no bitsandbytes on this machine"; fi
echo "=== done at t=$(( $(date +%s) - T0 ))s"
