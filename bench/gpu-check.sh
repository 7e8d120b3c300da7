#!/usr/bin/env bash
# The CUDA backend on a lent GPU (H100/H200) in one call of under 8 minutes: every GPU test
# executable, `flashattn run --check` on a few specs per kernel family, and the issue-12
# benchmarks beside PyTorch's SDPA (flash and cuDNN). The device image has CUDA, NVRTC and
# PyTorch but no cargo: build here first with bench/build-gpu-check.sh, which puts everything
# in .device/gpu-check/, then (device tool) run
#     bash bench/gpu-check.sh          with carry [".device"] and timeout_s 540.
# Each step runs under its own timeout, so one hang cannot eat the call. The tool returns at
# most 8 files from $OUT: summary.txt (one PASS/FAIL/SKIP line per step, the last thing
# printed too), env.log, tests.log, cli.log, bench.log, torch.log, tiles.log.
set -u
OUT="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
BIN=.device/gpu-check
FA="$BIN/flashattn"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export FLASHATTN_CACHE_DIR=/tmp/flashattn-cache PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
# The whole script stays under 8 minutes: no step runs past this many seconds from the start
# (planned, not yet timed on a GPU: setup and compiles, tests, benchmarks, CLI checks).
BUDGET=${GPU_CHECK_BUDGET:-460}

# step NAME LOG SECONDS CMD...: runs CMD with a time limit (capped by what is left of the
# budget), appends its output to $OUT/LOG, records PASS (exit 0), FAIL (exit code), TIMEOUT
# or SKIP (no time left) in the summary.
step() {
    local name=$1 log=$2 secs=$3
    shift 3
    local left=$((BUDGET - SECONDS))
    if [ $left -lt 10 ]; then
        skip "$name" "time budget of ${BUDGET}s spent"
        return 0
    fi
    [ "$secs" -gt $left ] && secs=$left
    local t0=$SECONDS
    {
        echo
        echo "=== $name: $*"
    } >>"$OUT/$log"
    timeout --kill-after=10 "$secs" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    local verdict=PASS
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        verdict="TIMEOUT after ${secs}s"
    elif [ $rc -ne 0 ]; then
        verdict="FAIL (exit $rc)"
    fi
    printf '%-44s %s (%ss, %s)\n' "$name" "$verdict" "$((SECONDS - t0))" "$log" | tee -a "$SUMMARY"
    return 0
}

skip() { printf '%-44s SKIP (%s)\n' "$1" "$2" | tee -a "$SUMMARY"; }

step_environment() {
    {
        date -u
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
        ls -l "$BIN" "$BIN/tests"
        ldconfig -p | grep -E 'libcuda.so|libnvrtc' | head -5
    } >>"$OUT/env.log" 2>&1
    # NVRTC: the toolkit's, else the pip wheel's (the backend looks in /usr/local/cuda itself).
    if [ -z "${FLASHATTN_NVRTC_PATH:-}" ] && ! ls /usr/local/cuda/lib64/libnvrtc.so.1[23] >/dev/null 2>&1; then
        local lib
        lib=$(find /usr/local/cuda* /opt /usr/lib -name 'libnvrtc.so.1[23]' 2>/dev/null | head -1)
        [ -n "$lib" ] && export FLASHATTN_NVRTC_PATH="${lib%/*}"
    fi
    echo "FLASHATTN_NVRTC_PATH=${FLASHATTN_NVRTC_PATH:-unset}" >>"$OUT/env.log"
    step "info" env.log 30 "$FA" info
    # Every variant of this GPU's arch, compiled in parallel into the cubin cache, so the steps
    # below load instead of compiling one by one (9.0 -> sm_90a, as the backend names it).
    local cc arch
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    arch="sm_${cc:-90}"
    [ "$arch" = sm_90 ] && arch=sm_90a
    step "compile all variants ($arch)" env.log 120 "$FA" cuda compile --arch "$arch" --out /tmp/flashattn-cubins
}

# Every GPU test executable of backends/cuda (tests/gpu*.rs), each with the GPU required.
step_tests() {
    local t found=0
    for t in "$BIN"/tests/gpu*; do
        [ -x "$t" ] || continue
        found=1
        step "tests $(basename "$t")" tests.log 240 env FLASHATTN_REQUIRE_BACKENDS=cuda "$t" --test-threads=1 --nocapture
    done
    [ $found = 1 ] || skip "tests" "no $BIN/tests/gpu* (run bench/build-gpu-check.sh)"
}

# The CLI's own check against the f64 reference, on odd shapes, per kernel family.
step_cli() {
    local kernel
    for kernel in mma auto hopper; do
        local k=(env "FLASHATTN_CUDA_KERNEL=$([ $kernel = auto ] && echo '' || echo $kernel)")
        step "run --check $kernel bf16 d128 gqa causal" cli.log 60 "${k[@]}" "$FA" run --backend cuda --dtype bf16 --batch 2 --heads 16 --kv-heads 4 --seqlen-q 1000 --seqlen-k 1500 --head-dim 128 --causal --check
        [ $kernel = hopper ] && continue  # the rest are shapes the Hopper kernel does not take
        step "run --check $kernel f16 d72 window softcap" cli.log 60 "${k[@]}" "$FA" run --backend cuda --dtype f16 --heads 8 --seqlen-q 777 --head-dim 72 --window 128,0 --softcap 30 --check
        step "run --check $kernel bf16 d200/dv128 1x20k" cli.log 60 "${k[@]}" "$FA" run --backend cuda --dtype bf16 --heads 4 --seqlen-q 1 --seqlen-k 20000 --head-dim 200 --head-dim-v 128 --check
        step "run --check $kernel bf16 d96 8k" cli.log 60 "${k[@]}" "$FA" run --backend cuda --dtype bf16 --heads 8 --seqlen-q 2048 --seqlen-k 8192 --head-dim 96 --check
    done
}

# Issue 12's forward goal: mma.sync path forced, bf16, seqlen 8k, d 64/96/128, non-causal and
# causal, FlashAttention's benchmark shapes (batch x seqlen = 16k tokens, heads x d = 2048),
# beside PyTorch SDPA (flash = FlashAttention-2, cuDNN) on the same shapes; the Hopper kernel
# (automatic choice) beside them where it applies.
step_bench_forward() {
    local d
    for d in 64 96 128; do
        local heads=$((2048 / d))
        step "bench mma bf16 8k d$d" bench.log 60 env FLASHATTN_CUDA_KERNEL=mma "$FA" bench --backend cuda --dtype bf16 --batch 2 --heads $heads --seqlens 8192 --head-dims $d --both-causal --warmup 3 --iters 20
    done
    step "bench auto bf16 8k d64,128" bench.log 60 "$FA" bench --backend cuda --dtype bf16 --batch 2 --heads 16 --seqlens 8192 --head-dims 64,128 --both-causal --warmup 3 --iters 20
    step "torch sdpa bf16 8k d64,96,128" torch.log 90 python3 bench/torch_sdpa.py --seqlens 8192 --dims 64,96,128 --iters 20
    # The mma.sync tile choices against the alternatives, for the next tuning round.
    step "cuda_bench mma tiles d64,96,128" tiles.log 90 "$BIN/cuda_bench" --kernels mma --mma-tiles default,128x64w8,64x64w4 --dims 64,96,128 --seqlens 8192 --causal no --iters 10
}

# Issue 13's FP8 goal: the FP8 e4m3 Hopper build (first GPU run: its correctness is in
# step_tests, tests/gpu.rs hopper_fp8_cases), `run --check` against the f64 reference, then
# FA3's FP8 benchmark shape (batch x seqlen = 16k tokens, heads x d = 2048), non-causal and
# causal, goal >= 1200 TFLOP/s at d256 16k non-causal; beside PyTorch's bf16 cuDNN/flash SDPA on
# the same shapes (PyTorch has no FP8 SDPA). The time includes the V transpose pre-pass.
# SOFTMAX_UNDER_PV=1 is the d256 schedule that spills 4 bytes per tile (hopper_fwd.cu): A/B.
step_fp8() {
    step "run --check fp8 d128 gqa causal" cli.log 60 "$FA" run --backend cuda --dtype fp8e4m3 --batch 2 --heads 16 --kv-heads 4 --seqlen-q 1000 --seqlen-k 1500 --head-dim 128 --causal --check
    step "run --check fp8 d256 window 20k keys" cli.log 60 "$FA" run --backend cuda --dtype fp8e4m3 --heads 4 --seqlen-q 300 --seqlen-k 20000 --head-dim 256 --window 4000,0 --check
    step "run --check fp8 d128 softcap" cli.log 60 "$FA" run --backend cuda --dtype fp8e4m3 --heads 8 --seqlen-q 777 --head-dim 128 --softcap 30 --check
    step "bench fp8 16k d256" bench.log 60 "$FA" bench --backend cuda --dtype fp8e4m3 --batch 1 --heads 8 --seqlens 16384 --head-dims 256 --both-causal --warmup 3 --iters 20
    step "bench fp8 16k d128" bench.log 60 "$FA" bench --backend cuda --dtype fp8e4m3 --batch 1 --heads 16 --seqlens 16384 --head-dims 128 --both-causal --warmup 3 --iters 20
    step "bench fp8 16k d256 SOFTMAX_UNDER_PV=1" bench.log 60 env FLASHATTN_CUDA_EXTRA_DEFINES=-DSOFTMAX_UNDER_PV=1 "$FA" bench --backend cuda --dtype fp8e4m3 --batch 1 --heads 8 --seqlens 16384 --head-dims 256 --warmup 3 --iters 20
    step "torch sdpa bf16 16k d128,256" torch.log 90 python3 bench/torch_sdpa.py --seqlens 16384 --dims 128,256 --iters 20
}

# Issue 12's backward goal: bf16, seqlen 8k, d 64/128, FlashAttention's benchmark shapes
# (batch 2, heads x d = 2048), non-causal and causal, dq by f32 atomics (the default), beside PyTorch SDPA's backward (flash = FlashAttention-2, cuDNN) on the
# same shapes. `run --backward --check` first: a backward that is wrong is not timed. The GPU
# tests of the backward kernels (tests/gpu_backward.rs) run in step_tests.
step_backward() {
    local d
    step "run --backward --check bf16 d128 gqa causal" cli.log 60 "$FA" run --backend cuda --backward --dtype bf16 --batch 2 --heads 16 --kv-heads 4 --seqlen-q 1000 --seqlen-k 1500 --head-dim 128 --causal --check
    step "run --backward --check f16 d72 window softcap" cli.log 60 "$FA" run --backend cuda --backward --dtype f16 --heads 8 --seqlen-q 777 --head-dim 72 --window 128,0 --softcap 30 --check
    for d in 64 128; do
        local heads=$((2048 / d))
        step "bench backward bf16 8k d$d" bench.log 90 "$FA" bench --backend cuda --backward --dtype bf16 --batch 2 --heads $heads --seqlens 8192 --head-dims $d --both-causal --warmup 3 --iters 10
    done
    step "torch sdpa backward bf16 8k d64,128" torch.log 120 python3 bench/torch_sdpa.py --backward --seqlens 8192 --dims 64,128 --iters 10
}
# Issue 12's decode goal: 1 query x 32k cached keys (+1 appended), 32/8 heads, d 128, bf16,
# contiguous and paged (page 16); `bench --decode` times the whole step (append, split-KV,
# combine) beside a device copy of the same K/V bytes (the bandwidth limit, same run). The
# GPU decode tests (tests/gpu_decode.rs) run in step_tests; the CLI checks add rotary, page 1
# and f32 (the CUDA-core kernel) at full size.
step_decode() {
    local page
    for page in none 16; do
        local p=()
        [ $page = none ] || p=(--page-size "$page")
        step "bench decode bf16 1x32k 32/8 d128 page $page" bench.log 60 "$FA" bench --backend cuda --decode --dtype bf16 --batch 1 --heads 32 --kv-heads 8 --head-dims 128 --seqlens 32768 "${p[@]}" --warmup 10 --iters 100
    done
    step "bench decode bf16 32/8 d128 sweep 1k..64k" bench.log 90 "$FA" bench --backend cuda --decode --dtype bf16 --batch 1 --heads 32 --kv-heads 8 --head-dims 128 --seqlens 1024,8192,65536 --page-size 16 --warmup 5 --iters 50
    step "run --decode --check bf16 32k page 16 rotary" cli.log 60 "$FA" run --backend cuda --decode --dtype bf16 --heads 32 --kv-heads 8 --head-dim 128 --cache-len 32767 --page-size 16 --rotary-dim 128 --check
    step "run --decode --check f16 4 new page 1 neox" cli.log 60 "$FA" run --backend cuda --decode --dtype f16 --heads 8 --kv-heads 1 --head-dim 72 --cache-len 3001 --new-tokens 4 --causal --page-size 1 --rotary-dim 32 --rotary-neox --check
    step "run --decode --check f32 d128 contiguous" cli.log 60 "$FA" run --backend cuda --decode --dtype f32 --heads 32 --kv-heads 8 --head-dim 128 --cache-len 20000 --check
}

if [ ! -x "$FA" ]; then
    skip "everything" "$FA missing: run bench/build-gpu-check.sh here and carry .device"
    exit 1
fi
# Most important first: a step the budget cannot fit is skipped, never cut short silently.
step_environment
step_tests
step_bench_forward
step_fp8
step_backward
step_cli
step_decode
echo "total ${SECONDS} s" | tee -a "$SUMMARY"
echo "--- summary ---"
cat "$SUMMARY"
grep -qE 'FAIL|TIMEOUT' "$SUMMARY" && exit 1
exit 0
