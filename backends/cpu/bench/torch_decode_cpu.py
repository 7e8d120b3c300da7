"""PyTorch CPU peer of the CPU backend's decode step: F.scaled_dot_product_attention for one
query token against a KV cache (default: 32 query heads / 8 KV heads, 32768 cached keys,
d 128, bf16, 2 threads), median of runs, GB/s of K/V read (2 * keys * heads_kv * d * 2 bytes).

Torch variants (the best one is the peer):
  gqa      q [1, 32, 1, d], k/v [1, 8, S, d], enable_gqa=True
  grouped  the 4 query heads of a KV head as 4 query rows: q [1, 8, 4, d] (no K/V expansion)
  bshd     as grouped, with the cache in flashattn's [b, s, h, d] layout (a transposed view)

With --compare BINARY (flashattn-cpu's cpu_decode_bench), runs back-to-back rounds of
flashattn-cpu (decode and the copy of the same bytes) and torch, so all see the same
machine load, and prints each round and the median ratios.

python3 backends/cpu/bench/torch_decode_cpu.py [--keys 32768] [--heads 32] [--heads-kv 8]
    [--dim 128] [--dtype bf16] [--iters 10] [--threads 2] [--rounds 3] [--compare BINARY]
"""
import argparse
import re
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F


def median_ms(fn, warmup, iters):
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_variants(args):
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(7)
    h, hkv, d, s = args.heads, args.heads_kv, args.dim, args.keys
    rand = lambda *shape: (torch.rand(shape, generator=g) * 2 - 1).to(dtype)
    q = rand(1, h, 1, d)
    k, v = rand(1, hkv, s, d), rand(1, hkv, s, d)
    kb, vb = rand(1, s, hkv, d).transpose(1, 2), rand(1, s, hkv, d).transpose(1, 2)
    qg = q.view(1, hkv, h // hkv, d)
    return {
        "gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "grouped": lambda: F.scaled_dot_product_attention(qg, k, v),
        "bshd": lambda: F.scaled_dot_product_attention(qg, kb, vb),
    }


def run_ours(args):
    cmd = [args.compare, "--keys", str(args.keys), "--heads", str(args.heads),
           "--heads-kv", str(args.heads_kv), "--dim", str(args.dim), "--dtype", args.dtype,
           "--threads", str(args.threads), "--iters", str(args.iters), "--rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    got = {}
    for algo in ("flash", "copy"):
        m = re.search(rf"round 0 {algo}\s+median ([0-9.]+) ms", out)
        got[algo] = float(m.group(1))
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", help="flashattn-cpu's cpu_decode_bench binary")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = {"bf16": 2, "f16": 2, "f32": 4}[args.dtype]
    gb = 2 * args.keys * args.heads_kv * args.dim * size / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"hq={args.heads} hkv={args.heads_kv} keys={args.keys} d={args.dim} {args.dtype}: "
          f"{gb * 1e3:.1f} MB of K/V per step")
    variants = torch_variants(args)
    ratios = {"decode/torch": [], "decode/copy": []}
    for r in range(args.rounds):
        line = []
        if args.compare:
            ours = run_ours(args)
            line += [f"flashattn-cpu {ours['flash']:.2f} ms ({gb / ours['flash'] * 1e3:.2f} GB/s)",
                     f"copy {ours['copy']:.2f} ms ({gb / ours['copy'] * 1e3:.2f} GB/s)"]
        best = None
        for name, fn in variants.items():
            ms = median_ms(fn, 2, args.iters)
            line.append(f"torch {name} {ms:.2f} ms ({gb / ms * 1e3:.2f} GB/s)")
            best = ms if best is None else min(best, ms)
        if args.compare:
            ratios["decode/torch"].append(best / ours["flash"])
            ratios["decode/copy"].append(ours["copy"] / ours["flash"])
            line.append(f"speed vs best torch {best / ours['flash']:.2f}x, "
                        f"bandwidth vs copy {ours['copy'] / ours['flash']:.2f}")
        print(f"round {r}: " + "; ".join(line))
    if args.compare:
        for k, v in ratios.items():
            print(f"median {k} over {args.rounds} rounds: {statistics.median(v):.2f}")


if __name__ == "__main__":
    main()
