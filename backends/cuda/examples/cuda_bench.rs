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
use flashattn_core::{Algorithm, AttentionSpec, Backend, BenchPlan, BenchRun, DType, Pass};
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

/// The command line, parsed.
struct Options {
    iters: usize,
    seqlens: Vec<usize>,
    dims: Vec<usize>,
    causal: Vec<bool>,
    dtype: DType,
    naive: bool,
    check: bool,
    /// (keys per block, K/V ring depth) of the Hopper kernel in turn (0 = default).
    tunings: Vec<(usize, usize)>,
    /// Each kernel family forced in turn (`None`: the backend's choice).
    kernels: Vec<Option<KernelKind>>,
    /// The mma.sync kernel's tiles in turn (`None`: tiles.rs's choice).
    mma_tiles: Vec<Option<MmaTiles>>,
}

fn numbers(args: &[String], name: &str, default: &str) -> Vec<usize> {
    arg_list(args, name, default)
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

impl Options {
    fn parse(args: &[String]) -> Options {
        let block_ns = numbers(args, "--block-n", "0");
        let stages = numbers(args, "--stages", "0");
        Options {
            iters: arg_list(args, "--iters", "20")[0].parse().unwrap_or(20),
            seqlens: numbers(args, "--seqlens", "512,1024,2048,4096,8192,16384"),
            dims: numbers(args, "--dims", "64,128,256"),
            causal: match arg_list(args, "--causal", "both")[0].as_str() {
                "yes" => vec![true],
                "no" => vec![false],
                _ => vec![false, true],
            },
            dtype: arg_list(args, "--dtype", "bf16")[0]
                .parse()
                .unwrap_or(DType::Bf16),
            naive: args.iter().any(|a| a == "--naive"),
            check: !args.iter().any(|a| a == "--no-check"),
            tunings: block_ns
                .iter()
                .flat_map(|&b| stages.iter().map(move |&s| (b, s)))
                .collect(),
            kernels: arg_list(args, "--kernels", "auto")
                .iter()
                .map(|k| KernelKind::from_name(k))
                .collect(),
            mma_tiles: arg_list(args, "--mma-tiles", "default")
                .iter()
                .map(|t| t.parse::<MmaTiles>().ok())
                .collect(),
        }
    }
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
    let o = Options::parse(&args);
    println!("device: {}", backend.device());
    println!(
        "{:>6} {:>4} {:>5} {:>4} {:>6} {:>9} {:>9} {:>22} {:>8}",
        "algo", "d", "seq", "b", "causal", "ms", "TFLOP/s", "kernel", "extraMB"
    );
    for &d in &o.dims {
        // Correctness of the exact kernel variants we time, on a short sequence
        // (--no-check skips it, for repeated tuning runs of already checked kernels).
        if o.check {
            for &c in &o.causal {
                check_variants(&mut backend, &o, d, c);
            }
        }
        for &s in &o.seqlens {
            for &c in &o.causal {
                bench_shape(&mut backend, &o, d, s, c);
            }
        }
    }
}

/// Checks every kernel / tile choice of the run against the f64 reference at d, causal c.
fn check_variants(backend: &mut CudaBackend, o: &Options, d: usize, c: bool) {
    let spec = AttentionSpec::new(2, 2048 / d, 1000, 1000, d)
        .dtype(o.dtype)
        .causal(c)
        .return_lse(true);
    for &kernel in &o.kernels {
        for &tiles in &o.mma_tiles {
            backend.force_kernel(kernel);
            backend.set_mma_tiles(tiles);
            let name = backend
                .variant_for(&spec)
                .map(|v| v.name())
                .unwrap_or_else(|e| e.to_string());
            match check_backend(&*backend, &spec, 7) {
                Ok(r) => println!("check d={d} causal={c} {name}: rel_l2 {:.2e}", r.rel_l2),
                Err(e) => println!("CHECK FAILED d={d} causal={c} {name}: {e}"),
            }
        }
    }
    backend.force_kernel(None);
    backend.set_mma_tiles(None);
}

/// Times one shape under every kernel / tile / tuning choice of the run (and naive once,
/// with --naive, up to 2048).
fn bench_shape(backend: &mut CudaBackend, o: &Options, d: usize, s: usize, c: bool) {
    let spec = AttentionSpec::new((16384 / s).max(1), 2048 / d, s, s, d)
        .dtype(o.dtype)
        .causal(c);
    let configs = o.kernels.iter().flat_map(|&k| {
        o.mma_tiles
            .iter()
            .flat_map(move |&t| o.tunings.iter().map(move |&bs| (k, t, bs)))
    });
    for (i, (kernel, tiles, (bn, st))) in configs.enumerate() {
        backend.force_kernel(kernel);
        backend.set_mma_tiles(tiles);
        backend.set_block_n((bn != 0).then_some(bn));
        backend.set_stages((st != 0).then_some(st));
        let algos: &[Algorithm] = if i == 0 && o.naive && s <= 2048 {
            &[Algorithm::Flash, Algorithm::Naive]
        } else {
            &[Algorithm::Flash]
        };
        for &algo in algos {
            time_one(backend, o, &spec, algo);
        }
    }
    backend.force_kernel(None);
    backend.set_mma_tiles(None);
    backend.set_block_n(None);
    backend.set_stages(None);
}

/// One timing line: median ms, TFLOP/s, the kernel that ran and its extra memory.
fn time_one(backend: &CudaBackend, o: &Options, spec: &AttentionSpec, algo: Algorithm) {
    let plan = BenchPlan {
        warmup: 3,
        iters: o.iters,
        seed: 1,
        pass: Pass::Forward,
    };
    let kernel = match algo {
        Algorithm::Flash => backend
            .variant_for(spec)
            .map(|v| v.name())
            .unwrap_or_default(),
        Algorithm::Naive => "naive".into(),
        Algorithm::Copy => "copy".into(),
    };
    let (d, s, c) = (spec.head_dim, spec.seqlen_q, spec.causal);
    match backend.bench(BenchRun::new(spec, algo, &plan, &mut || {})) {
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
