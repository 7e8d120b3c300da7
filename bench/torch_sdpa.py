#!/usr/bin/env python3
"""PyTorch SDPA (flash and cuDNN backends) on the shapes examples/cuda_bench.rs times, for a
side-by-side comparison on the same GPU in the same session.

    python3 bench/torch_sdpa.py [--seqlens 512,...] [--dims 64,128,256] [--causal both|yes|no]
                                [--dtype bf16|f16] [--iters 20] [--backward]

--backward times the backward pass alone (torch.autograd.grad of the output with a random
gradient, the forward's graph kept), counted as 2.5 x the forward's FLOPs, FlashAttention's
convention and flashattn's (AttentionSpec::backward_flops); extraMB is then the peak beyond
the inputs, output and gradients.

Shapes: batch = 16384 / seqlen, heads = 2048 / head_dim (FlashAttention's benchmark set).
FLOPs count visible (query, key) pairs exactly, as flashattn's AttentionSpec::flops does:
pairs * 2 * (d + d_v). Times are CUDA-event medians after warm-up, on random normal inputs.
"""
import argparse
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def visible_pairs(s, causal):
    return s * (s + 1) // 2 if causal else s * s


def bench(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backward", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    causals = {"both": [False, True], "yes": [True], "no": [False]}[a.causal]
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__} cudnn {torch.backends.cudnn.version()}")
    print(f"{'backend':>8} {'d':>4} {'seq':>5} {'b':>4} {'causal':>6} {'ms':>9} {'TFLOP/s':>9} {'extraMB':>8}")
    for d in map(int, a.dims.split(",")):
        for s in map(int, a.seqlens.split(",")):
            b, h = max(16384 // s, 1), 2048 // d
            # [b, s, h, d] like flashattn, viewed as SDPA's [b, h, s, d].
            q, k, v = (
                torch.randn(b, s, h, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(a.backward)
                for _ in range(3)
            )
            for causal in causals:
                flops = b * h * visible_pairs(s, causal) * 2 * (d + d) * (2.5 if a.backward else 1.0)
                for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
                    try:
                        with sdpa_kernel([backend]):
                            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            fn = sdpa
                            if a.backward:
                                o = sdpa()
                                do = torch.randn_like(o)
                                fn = lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
                            fn()
                            torch.cuda.synchronize()
                            base = torch.cuda.memory_allocated()
                            torch.cuda.reset_peak_memory_stats()
                            out = fn()
                            torch.cuda.synchronize()
                            outs = out if isinstance(out, tuple) else (out,)
                            extra = torch.cuda.max_memory_allocated() - base - sum(t.numel() * t.element_size() for t in outs)
                            del out
                            ms = bench(fn, a.iters)
                        print(f"{name:>8} {d:>4} {s:>5} {b:>4} {str(causal):>6} {ms:>9.3f} {flops / ms / 1e9:>9.1f} {max(extra, 0) / 2**20:>8.1f}")
                    except Exception as e:  # a backend that refuses a shape says so and the rest go on
                        print(f"{name:>8} {d:>4} {s:>5} {b:>4} {str(causal):>6} unavailable: {str(e).splitlines()[0][:80]}")
            del q, k, v
            o = do = None
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
