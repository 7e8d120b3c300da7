#!/usr/bin/env bash
# Runs on the lent H100 machine (no cargo there) with the release `flashattn` binary carried in
# .device/cli/ and Vulkan loaders carried in .gl/: the CLI's own view of the machine, CUDA
# correctness and benchmarks through `flashattn run/bench`, PyTorch SDPA on the same shapes,
# and the portable wgpu backend through Vulkan. Logs go to $OUT.
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export FLASHATTN_CACHE_DIR=/tmp/flashattn-cache PYTHONUNBUFFERED=1
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
fa=.device/cli/flashattn
log() { echo "\$ $*"; "$@"; echo "exit: $?"; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  log $fa info
  # The CUDA backend's own GPU tests (feature cases, Hopper pipeline cases, random specs).
  FLASHATTN_REQUIRE_BACKENDS=cuda timeout 150 .device/cli/gpu-test --test-threads=1 2>&1 | tail -12
  # Correctness through the CLI on odd shapes with every kind of mask.
  log $fa run --backend cuda --dtype bf16 --batch 2 --heads 16 --kv-heads 4 --seqlen-q 1000 --seqlen-k 1500 --head-dim 128 --causal --check
  log $fa run --backend cuda --dtype f16 --heads 8 --seqlen-q 777 --head-dim 64 --window 128,0 --softcap 30 --check
  log $fa run --backend cuda --dtype bf16 --heads 4 --seqlen-q 1 --seqlen-k 5000 --head-dim 256 --check
  log $fa -v run --dtype bf16 --heads 16 --seqlen-q 2048 --head-dim 128 --check
  log $fa run --backend wgpu --heads 4 --seqlen-q 333 --head-dim 72 --causal --check
} 2>&1 | tee "$OUT/cli.log"
# Issue 4 goals: bf16, seqlen 8k, batch x seqlen = 16k tokens, heads x head_dim = 2048.
timeout 60 $fa bench --backend cuda --dtype bf16 --batch 2 --heads 16 --seqlens 8192 --head-dims 128 --both-causal --warmup 3 --iters 20 --json > "$OUT/cuda-d128.json"
timeout 60 $fa bench --backend cuda --dtype bf16 --batch 2 --heads 8 --seqlens 8192 --head-dims 256 --both-causal --warmup 3 --iters 20 --json > "$OUT/cuda-d256.json"
timeout 90 $fa bench --backend cuda --dtype bf16 --batch 8 --heads 16 --seqlens 2048 --head-dims 128 --compare-naive --warmup 2 --iters 10 --json > "$OUT/cuda-naive.json"
timeout 60 python3 bench/torch_sdpa.py --seqlens 8192 --dims 128,256 --iters 20 2>&1 | tee "$OUT/torch.log"
# The portable WGSL kernels on the H100 through Vulkan (f32 FMA peak of an H100 SXM ~67 TFLOP/s).
timeout 60 $fa bench --backend wgpu --dtype f32 --batch 1 --heads 16 --seqlens 2048 --head-dims 64,128 --compare-naive --warmup 1 --iters 3 --json > "$OUT/wgpu-f32-2k.json"
timeout 60 $fa bench --backend wgpu --dtype f32 --batch 1 --heads 16 --seqlens 8192 --head-dims 64,128 --warmup 1 --iters 3 --json > "$OUT/wgpu-f32-8k.json"
timeout 45 $fa bench --backend wgpu --dtype f16 --batch 1 --heads 16 --seqlens 8192 --head-dims 128 --both-causal --warmup 2 --iters 5 --json > "$OUT/wgpu-f16.json"
python3 - "$OUT" <<'PY'
import json, glob, sys, os
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    for r in json.load(open(f)):
        n = r.get("naive") or {}
        print(f"{os.path.basename(f):16} {r['backend']:5} {r['spec']:48} {r['time_ms'] or 0:9.3f} ms {r['tflops'] or 0:8.2f} TFLOP/s extra={r['extra_bytes']} naive_ms={n.get('time_ms')} naive_extra={n.get('extra_bytes')} err={r['error'] or n.get('error')}")
PY
