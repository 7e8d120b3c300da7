//! Benchmarks the CUDA backend (flash and naive) on the standard FlashAttention shapes, to
//! compare with bench/torch_sdpa.py run on the same GPU. Also checks each benchmarked shape
//! once against the f64 reference (on a shorter sequence) so a fast wrong kernel cannot pass.
//!
//! cargo run --release --example cuda_bench -p flashattn-cuda -- [--iters N] [--naive] [--no-check]
//!   [--seqlens 512,1024,...] [--dims 64,128,256] [--causal both|yes|no] [--dtype bf16|f16]
//!   [--block-n 0,176] [--stages 0,3]   (Hopper tile tuning; 0 = default)
//!   [--kernels auto,hopper,mma,generic] (each kernel family forced in turn; default auto)
//!   [--mma-tiles 128x32w4,128x64w8]     (mma.sync tiles; default: tiles.rs's choice)
//! --naive also times naive attention (materialised scores) up to seqlen 2048.
//! Total tokens per batch are 16k (batch = 16384 / seqlen), heads = 2048 / head_dim, as in
//! FlashAttention's benchmarks. Prints one line per shape: median ms and TFLOP/s.

use flashattn_core::testing::check_backend;
use flashattn_core::{Algorithm, AttentionSpec, Backend, BenchPlan, DType, Pass};
use flashattn_cuda::{CudaBackend, KernelKind, MmaTiles};

fn arg_list(args: &[String], name: &str, default: &str) -> Vec<String> {
    let v = args
        .iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or(default);
    v.split(',').map(str::to_string).collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut backend = match CudaBackend::new() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cuda backend unavailable: {e}");
            std::process::exit(2);
        }
    };
    let iters: usize = arg_list(&args, "--iters", "20")[0].parse().unwrap_or(20);
    let seqlens: Vec<usize> = arg_list(&args, "--seqlens", "512,1024,2048,4096,8192,16384")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let dims: Vec<usize> = arg_list(&args, "--dims", "64,128,256")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let causal = match arg_list(&args, "--causal", "both")[0].as_str() {
        "yes" => vec![true],
        "no" => vec![false],
        _ => vec![false, true],
    };
    let dtype: DType = arg_list(&args, "--dtype", "bf16")[0]
        .parse()
        .unwrap_or(DType::Bf16);
    let naive = args.iter().any(|a| a == "--naive");
    // --block-n 128,176: time the Hopper kernel at each keys-per-block (0 = default).
    let block_ns: Vec<usize> = arg_list(&args, "--block-n", "0")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    // --stages 2,3: ... and at each K/V ring depth (0 = default).
    let stage_list: Vec<usize> = arg_list(&args, "--stages", "0")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let tunings: Vec<(usize, usize)> = block_ns
        .iter()
        .flat_map(|&b| stage_list.iter().map(move |&s| (b, s)))
        .collect();
    // --kernels auto,mma: each family forced in turn (auto: the backend's choice).
    let kernels: Vec<Option<KernelKind>> = arg_list(&args, "--kernels", "auto")
        .iter()
        .map(|k| KernelKind::from_name(k))
        .collect();
    // --mma-tiles 128x32w4,128x64w8: the mma.sync kernel's tiles in turn.
    let mma_tiles: Vec<Option<MmaTiles>> = arg_list(&args, "--mma-tiles", "default")
        .iter()
        .map(|t| t.parse::<MmaTiles>().ok())
        .collect();
    println!("device: {}", backend.device());
    println!(
        "{:>6} {:>4} {:>5} {:>4} {:>6} {:>9} {:>9} {:>22} {:>8}",
        "algo", "d", "seq", "b", "causal", "ms", "TFLOP/s", "kernel", "extraMB"
    );
    for &d in &dims {
        // Correctness of the exact kernel variants we time, on a short sequence
        // (--no-check skips it, for repeated tuning runs of already checked kernels).
        for &c in causal
            .iter()
            .filter(|_| !args.iter().any(|a| a == "--no-check"))
        {
            let spec = AttentionSpec::new(2, 2048 / d, 1000, 1000, d)
                .dtype(dtype)
                .causal(c)
                .return_lse(true);
            for &kernel in &kernels {
                for &tiles in &mma_tiles {
                    backend.force_kernel(kernel);
                    backend.set_mma_tiles(tiles);
                    let name = backend
                        .variant_for(&spec)
                        .map(|v| v.name())
                        .unwrap_or_else(|e| e.to_string());
                    match check_backend(&backend, &spec, 7) {
                        Ok(r) => println!("check d={d} causal={c} {name}: rel_l2 {:.2e}", r.rel_l2),
                        Err(e) => println!("CHECK FAILED d={d} causal={c} {name}: {e}"),
                    }
                }
            }
            backend.force_kernel(None);
            backend.set_mma_tiles(None);
        }
        for &s in &seqlens {
            for &c in &causal {
                let spec = AttentionSpec::new((16384 / s).max(1), 2048 / d, s, s, d)
                    .dtype(dtype)
                    .causal(c);
                let algos: &[Algorithm] = if naive && s <= 2048 {
                    &[Algorithm::Flash, Algorithm::Naive]
                } else {
                    &[Algorithm::Flash]
                };
                let configs = kernels.iter().flat_map(|&k| {
                    let tunings = &tunings;
                    mma_tiles
                        .iter()
                        .flat_map(move |&t| tunings.iter().map(move |&bs| (k, t, bs)))
                });
                for (i, (kernel, tiles, (bn, st))) in configs.enumerate() {
                    backend.force_kernel(kernel);
                    backend.set_mma_tiles(tiles);
                    backend.set_block_n((bn != 0).then_some(bn));
                    backend.set_stages((st != 0).then_some(st));
                    let algos = if i == 0 {
                        algos
                    } else {
                        &[Algorithm::Flash][..]
                    };
                    for &algo in algos {
                        let plan = BenchPlan {
                            warmup: 3,
                            iters,
                            seed: 1,
                            pass: Pass::Forward,
                        };
                        let kernel = match algo {
                            Algorithm::Flash => backend
                                .variant_for(&spec)
                                .map(|v| v.name())
                                .unwrap_or_default(),
                            Algorithm::Naive => "naive".into(),
                            Algorithm::Copy => "copy".into(),
                        };
                        match backend.bench(&spec, algo, &plan, &mut || {}) {
                            Ok(m) => {
                                let ms = median(&m.times_ms);
                                let tflops = spec.flops() / (ms * 1e-3) / 1e12;
                                let extra = m.extra_bytes.unwrap_or(0) as f64 / 1048576.0;
                                println!(
                                "{:>6} {d:>4} {s:>5} {:>4} {c:>6} {ms:>9.3} {tflops:>9.1} {kernel:>22} {extra:>8.1}",
                                format!("{algo:?}").to_lowercase(),
                                spec.batch
                            );
                            }
                            Err(e) => println!("{algo:?} d={d} s={s} causal={c}: {e}"),
                        }
                    }
                }
                backend.force_kernel(None);
                backend.set_mma_tiles(None);
                backend.set_block_n(None);
                backend.set_stages(None);
            }
        }
    }
}
