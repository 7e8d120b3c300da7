//! Times the CPU backend on the headline shape and prints GFLOP/s (median of runs after
//! warm-up), plus the measured extra heap bytes. `--backward` times the backward pass (its
//! FLOPs counted as 2.5 x the forward's, FlashAttention's convention).
//!
//! cargo run --release -p flashattn-cpu --example cpu_bench -- [--seq 2048] [--heads 8]
//!     [--dims 64,128] [--iters 10] [--threads N] [--dtype f32] [--causal] [--naive] [--isa avx2]
//!     [--backward]

use flashattn_core::alloc_meter::MeteredAlloc;
use flashattn_core::{Algorithm, AttentionSpec, Backend, BenchPlan, BenchRun, DType, Pass};

mod common;

#[global_allocator]
static ALLOC: MeteredAlloc = MeteredAlloc;

fn main() {
    let args = common::Args::from_env();
    let flag = |name: &str| args.flag(name);
    let seq = args.num("--seq", 2048);
    let heads = args.num("--heads", 8);
    let iters = args.num("--iters", 10);
    let dims: Vec<usize> = args
        .opt("--dims")
        .unwrap_or_else(|| "64,128".into())
        .split(',')
        .map(|s| s.parse().expect("--dims"))
        .collect();
    let dtype: DType = args
        .opt("--dtype")
        .map_or(DType::F32, |s| s.parse().expect("--dtype"));
    let backend = args.backend();
    let algo = if flag("--naive") {
        Algorithm::Naive
    } else {
        Algorithm::Flash
    };
    println!("{}", backend.device());
    for d in dims {
        let spec = AttentionSpec::new(1, heads, seq, seq, d)
            .dtype(dtype)
            .causal(flag("--causal"));
        let backward = flag("--backward");
        let plan = BenchPlan {
            warmup: 2,
            iters,
            seed: 7,
            pass: if backward {
                Pass::Backward
            } else {
                Pass::Forward
            },
        };
        let flops = if backward {
            spec.backward_flops()
        } else {
            spec.flops()
        };
        let cpu0 = process_cpu_seconds();
        let m = backend
            .bench(BenchRun::new(&spec, algo, &plan, &mut || {}))
            .expect("bench failed");
        // CPU seconds per run over all threads (input generation and warm-up included):
        // a throughput per busy core that the other processes on the machine disturb less.
        let cpu_per_run = (process_cpu_seconds() - cpu0) / plan.runs().expect("runs") as f64;
        let mut t = m.times_ms.clone();
        t.sort_by(f64::total_cmp);
        let median = t[t.len() / 2];
        println!(
            "{algo:?} {} {spec}: median {median:.2} ms  {:.1} GFLOP/s  (min {:.2} ms = {:.1} GFLOP/s)  {:.1} GFLOP per CPU-s  extra {:.2} MiB",
            plan.pass.name(),
            flops / median / 1e6,
            t[0],
            flops / t[0] / 1e6,
            flops / cpu_per_run / 1e9,
            m.extra_bytes.unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }
}

/// User + system CPU time of this process (all threads), from /proc/self/stat; 0 elsewhere.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the ")" that ends the command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0 // USER_HZ
}
