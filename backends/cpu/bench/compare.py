"""Back-to-back rounds of flashattn-cpu (examples/cpu_bench) and PyTorch CPU SDPA on the same
shape, so both see the same machine load; prints each round and the median ratio.
--backward compares the backward passes (torch: `out.backward(dout)` alone). --dtype bf16 / f16
runs both in that dtype and also times flashattn-cpu in f32 in each round (its own baseline).

python3 backends/cpu/bench/compare.py BENCH_BINARY [--rounds 5] [--seq 2048] [--heads 8]
    [--dims 64,128] [--iters 5] [--threads 2] [--causal] [--bshd] [--backward] [--dtype f32]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_sdpa_cpu import make_qkv, median_ms, sdpa_backward_fn, shape_args  # noqa: E402


def torch_median_ms(q, k, v, warmup, iters, causal):
    with torch.no_grad():
        for _ in range(warmup):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=5)
    shape_args(ap, iters=5)
    ap.add_argument("--backward", action="store_true", help="compare the backward passes")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dims = [int(x) for x in args.dims.split(",")]
    ratios = {d: [] for d in dims}
    ours_all = {d: [] for d in dims}
    torch_all = {d: [] for d in dims}
    own_f32 = {d: [] for d in dims}
    tdtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    def ours_ms(d, dtype):
        out = subprocess.run(
            [args.binary, "--seq", str(args.seq), "--heads", str(args.heads), "--dims", str(d),
             "--iters", str(args.iters), "--threads", str(args.threads), "--dtype", dtype]
            + (["--causal"] if args.causal else [])
            + (["--backward"] if args.backward else []),
            capture_output=True, text=True, check=True).stdout
        return float(re.search(r"median ([\d.]+) ms", out).group(1))

    for r in range(args.rounds):
        for d in dims:
            ours = ours_ms(d, args.dtype)
            if args.dtype != "f32":
                own_f32[d].append(ours_ms(d, "f32") / ours)
            q, k, v = (t.detach().to(tdtype).requires_grad_(args.backward)
                       for t in make_qkv(args.seq, args.heads, d, args.bshd))
            if args.backward:
                theirs = median_ms(sdpa_backward_fn(q, k, v, args.causal)[0], 2, args.iters)[0]
            else:
                theirs = torch_median_ms(q, k, v, 2, args.iters, args.causal)
            flops = 4 * args.heads * args.seq * args.seq * d
            if args.causal:  # visible pairs only, as AttentionSpec::flops counts them
                flops = 2 * args.heads * args.seq * (args.seq + 1) * d
            if args.backward:  # 2.5 x the forward, as AttentionSpec::backward_flops counts
                flops *= 2.5
            go, gt = flops / ours / 1e6, flops / theirs / 1e6
            ratios[d].append(go / gt)
            ours_all[d].append(go)
            torch_all[d].append(gt)
            vs_f32 = f", {own_f32[d][-1]:.2f}x own f32" if own_f32[d] else ""
            print(f"round {r} d={d} {args.dtype}: flashattn-cpu {go:.1f} GFLOP/s, torch sdpa "
                  f"{gt:.1f} GFLOP/s, ratio {go / gt:.2f}{vs_f32}", flush=True)
    for d in dims:
        print(f"d={d}: flashattn-cpu median {statistics.median(ours_all[d]):.1f} "
              f"(best {max(ours_all[d]):.1f}) GFLOP/s, torch sdpa median "
              f"{statistics.median(torch_all[d]):.1f} (best {max(torch_all[d]):.1f}) GFLOP/s, "
              f"median ratio {statistics.median(ratios[d]):.2f}"
              + (f", median {statistics.median(own_f32[d]):.2f}x own f32" if own_f32[d] else ""))


if __name__ == "__main__":
    main()
