"""PyTorch CPU peers for the CPU backend's headline shape: F.scaled_dot_product_attention
and a naive matmul-softmax-matmul, on [1, 8, 2048, D] f32, 2 threads, median of runs.
FLOPs = 4 * b * h * sq * sk * d (same count as AttentionSpec::flops for non-causal, d == dv).
--backward times `out.backward(dout)` alone (the forward runs before the timer), FLOPs
2.5 x the forward's, as AttentionSpec::backward_flops counts them.

python3 backends/cpu/bench/torch_sdpa_cpu.py [--seq 2048] [--heads 8] [--dims 64,128] [--iters 10]
    [--threads 2] [--causal] [--bshd] [--backward]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    cpu0 = time.process_time()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    cpu_per_run = (time.process_time() - cpu0) / iters
    return statistics.median(times), min(times), cpu_per_run


def make_qkv(seq, heads, d, bshd, requires_grad=False):
    """Inputs uniform in [-1, 1), seeded; [1, h, s, d], or with bshd a transposed view of
    flashattn's [1, s, h, d] layout."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(3):
        if bshd:
            t = (torch.rand((1, seq, heads, d), generator=g) * 2 - 1).transpose(1, 2)
        else:
            t = torch.rand((1, heads, seq, d), generator=g) * 2 - 1
        out.append(t.detach().requires_grad_(requires_grad))
    return out


def sdpa_backward_fn(q, k, v, causal):
    """A function that times the backward alone: the forward graph is built once and kept
    (retain_graph), the gradients are cleared before each backward."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    dout = (torch.rand(out.shape, generator=torch.Generator().manual_seed(8)) * 2 - 1).to(out.dtype)

    def run():
        q.grad = k.grad = v.grad = None
        out.backward(dout, retain_graph=True)

    return run, out.grad_fn.name()


def shape_args(ap, iters):
    """The shape, thread and layout flags of this script and compare.py."""
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--bshd", action="store_true",
                    help="flashattn's memory layout [b, s, h, d] (SDPA gets a transposed view)")


def main():
    ap = argparse.ArgumentParser()
    shape_args(ap, iters=10)
    ap.add_argument("--backward", action="store_true",
                    help="time the backward pass (out.backward(dout)) instead of the forward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for d in [int(x) for x in args.dims.split(",")]:
        q, k, v = make_qkv(args.seq, args.heads, d, args.bshd, args.backward)
        flops = 4 * args.heads * args.seq * args.seq * d
        if args.causal:
            flops = 2 * args.heads * args.seq * (args.seq + 1) * d
        if args.backward:
            flops *= 2.5
            run, kernel = sdpa_backward_fn(q, k, v, args.causal)
            med, best, cpu = median_ms(run, 2, args.iters)
            print(
                f"torch sdpa backward ({kernel}) b=1 h={args.heads} s={args.seq} d={d} f32"
                f"{' causal' if args.causal else ''}: median {med:.2f} ms  "
                f"{flops / med / 1e6:.1f} GFLOP/s  (min {best:.2f} ms)  "
                f"{flops / cpu / 1e9:.1f} GFLOP per CPU-s"
            )
            continue

        def sdpa():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

        def naive():
            with torch.no_grad():
                s = (q @ k.transpose(-1, -2)) * (d ** -0.5)
                if args.causal:
                    mask = torch.ones(args.seq, args.seq, dtype=torch.bool).tril()
                    s = s.masked_fill(~mask, float("-inf"))
                return torch.softmax(s, dim=-1) @ v

        for name, fn in [("sdpa", sdpa), ("naive", naive)]:
            med, best, cpu = median_ms(fn, 2, args.iters)
            print(
                f"torch {name} b=1 h={args.heads} s={args.seq} d={d} f32"
                f"{' causal' if args.causal else ''}: median {med:.2f} ms  "
                f"{flops / med / 1e6:.1f} GFLOP/s  (min {best:.2f} ms)  "
                f"{flops / cpu / 1e9:.1f} GFLOP per CPU-s"
            )


if __name__ == "__main__":
    main()
