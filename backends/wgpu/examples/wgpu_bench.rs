//! Flash vs naive attention on the best wgpu adapter, on device-resident random inputs.
//!
//! cargo run --release -p flashattn-wgpu --example wgpu_bench -- [seqlen ...] [--heads H]
//!     [--dim D] [--dtype f32|f16|bf16] [--causal] [--backward] [--iters N] [--warmup N]
//!     [--no-naive] [--no-subgroups]
//!
//! `--backward` times the backward pass (FLOPs counted as 2.5 x the forward's, as
//! FlashAttention does) against the naive backward that materialises P and dS.
//! FLASHATTN_WGPU_TILES="br=32,bc=16" forces tile sizes (for tuning).

use flashattn_core::{Algorithm, AttentionSpec, Backend, BenchPlan, BenchRun, DType, Pass};
use flashattn_wgpu::WgpuBackend;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seqlens = Vec::new();
    let (mut heads, mut dim, mut iters, mut warmup) = (4usize, 64usize, 5usize, 1usize);
    let mut dtype = DType::F32;
    let (mut causal, mut naive, mut no_subgroups) = (false, true, false);
    let mut pass = Pass::Forward;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--heads" => heads = num("--heads"),
            "--dim" => dim = num("--dim"),
            "--iters" => iters = num("--iters"),
            "--warmup" => warmup = num("--warmup"),
            "--causal" => causal = true,
            "--backward" => pass = Pass::Backward,
            "--no-naive" => naive = false,
            "--no-subgroups" => no_subgroups = true,
            "--dtype" => {
                dtype = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("--dtype needs f32, f16 or bf16"))
            }
            s => seqlens.push(
                s.parse::<usize>()
                    .unwrap_or_else(|_| panic!("bad argument {s}")),
            ),
        }
    }
    if seqlens.is_empty() {
        seqlens = vec![1024, 4096];
    }
    let backend = match WgpuBackend::new() {
        Ok(b) if no_subgroups => b.without_subgroups(),
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    println!(
        "device: {}  timing: {:?}  subgroups: {}  max binding: {} bytes",
        backend.device(),
        backend.bench_timing(),
        backend.subgroup_size(),
        backend.max_binding_bytes()
    );
    println!("pass      algo   seqlen  heads  dim  dtype  causal  median_ms  GFLOP/s  extra_bytes");
    for &s in &seqlens {
        let spec = AttentionSpec::new(1, heads, s, s, dim)
            .dtype(dtype)
            .causal(causal)
            .return_lse(true);
        let plan = BenchPlan {
            warmup,
            iters,
            seed: 1,
            pass,
        };
        let flops = match pass {
            Pass::Backward => spec.backward_flops(),
            _ => spec.flops(),
        };
        let algos: &[Algorithm] = if naive {
            &[Algorithm::Flash, Algorithm::Naive]
        } else {
            &[Algorithm::Flash]
        };
        for &algo in algos {
            match backend.bench(BenchRun::new(&spec, algo, &plan, &mut || {})) {
                Ok(m) => {
                    let ms = median(&m.times_ms);
                    println!(
                        "{:<8}  {:<6} {s:>6}  {heads:>5}  {dim:>3}  {dtype:>5}  {causal:>6}  {ms:>9.2}  {:>7.2}  {}",
                        pass.name(),
                        format!("{algo:?}").to_lowercase(),
                        flops / (ms * 1e-3) / 1e9,
                        m.extra_bytes.map_or("-".into(), |b| b.to_string())
                    );
                }
                Err(e) => println!(
                    "{:<8}  {:<6} {s:>6}  error: {e}",
                    pass.name(),
                    format!("{algo:?}").to_lowercase()
                ),
            }
        }
    }
}
