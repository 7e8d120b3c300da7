#!/usr/bin/env bash
# The portable wgpu backend on the lent H100 through Vulkan: correctness through the CLI on
# odd shapes in every dtype, then benchmarks against naive attention. Carry .device/cli and .gl.
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export FLASHATTN_CACHE_DIR=/tmp/flashattn-cache
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
fa=.device/cli/flashattn
log() { echo "\$ $*"; "$@"; echo "exit: $?"; }
{
  log $fa info
  log $fa run --backend wgpu --heads 4 --seqlen-q 333 --head-dim 72 --causal --check
  log $fa run --backend wgpu --dtype f16 --batch 2 --heads 8 --kv-heads 2 --seqlen-q 129 --seqlen-k 1000 --head-dim 128 --window 64,16 --check
  log $fa run --backend wgpu --dtype bf16 --heads 3 --seqlen-q 17 --seqlen-k 4097 --head-dim 200 --head-dim-v 40 --softcap 20 --check
  log $fa run --backend wgpu --heads 16 --seqlen-q 1 --seqlen-k 30000 --head-dim 256 --check
} 2>&1 | tee "$OUT/wgpu-check.log"
timeout 60 $fa bench --backend wgpu --dtype f32 --heads 16 --seqlens 2048 --head-dims 64,128 --compare-naive --warmup 1 --iters 3 --json > "$OUT/wgpu-f32-2k.json"
timeout 60 $fa bench --backend wgpu --dtype f32 --heads 16 --seqlens 8192 --head-dims 64,128 --warmup 1 --iters 3 --json > "$OUT/wgpu-f32-8k.json"
timeout 45 $fa bench --backend wgpu --dtype f16 --heads 16 --seqlens 8192 --head-dims 128 --both-causal --warmup 1 --iters 3 --json > "$OUT/wgpu-f16.json"
python3 - "$OUT" <<'PY'
import json, glob, sys, os
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    for r in json.load(open(f)):
        n = r.get("naive") or {}
        print(f"{r['spec']:48} {r['time_ms'] or 0:9.3f} ms {r['tflops'] or 0:6.2f} TFLOP/s extra={r['extra_bytes']} naive_ms={n.get('time_ms')} naive_extra={n.get('extra_bytes')} err={r['error'] or n.get('error')}")
PY
