#!/usr/bin/env bash
# Runs on the lent GPU machine (no cargo there): the CUDA backend's GPU tests and benchmark,
# built here and carried in .device/, then PyTorch SDPA on the same shapes. Logs go to $OUT.
#   backends/cuda/device-run.sh [tests|bench|all] [bench args...]
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
what="${1:-all}"; shift || true
export FLASHATTN_CACHE_DIR=/tmp/flashattn-cache PYTHONUNBUFFERED=1
dev=.device
{
  date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
  ldconfig -p | grep -E 'libcuda.so|libnvrtc' | head -5
} 2>&1 | tee "$OUT/env.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  t=$(ls $dev/gpu-* | head -1)
  FLASHATTN_REQUIRE_BACKENDS=cuda timeout 300 "$t" --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log" | grep -vE '^ok ' | tail -60
  echo "tests exit: ${PIPESTATUS[0]}"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 200 $dev/cuda_bench "$@" 2>&1 | tee "$OUT/bench.log"
  echo "bench exit: ${PIPESTATUS[0]}"
  args=(); for a in "$@"; do [ "$a" != --naive ] && args+=("$a"); done
  timeout 150 python3 bench/torch_sdpa.py "${args[@]}" 2>&1 | tee "$OUT/torch.log"
fi
