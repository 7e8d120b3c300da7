//! Times one decode step of the CPU backend against a resident KV cache, side by side with
//! a copy of the same K/V bytes on the same threads (the memory-bandwidth limit), in
//! back-to-back rounds, and prints GB/s of both and their ratio.
//!
//! cargo run --release -p flashattn-cpu --example cpu_decode_bench -- [--keys 32768]
//!     [--heads 32] [--heads-kv 8] [--dim 128] [--dtype bf16] [--page N] [--new 1]
//!     [--iters 10] [--rounds 3] [--threads N] [--isa avx2|portable]
//!
//! The step appends `--new` rows after `keys - new` cached ones and attends to all `keys`.

use flashattn_core::alloc_meter::MeteredAlloc;
use flashattn_core::{
    decode_bytes, Algorithm, AttentionSpec, Backend, BenchPlan, BenchRun, DType, KvCache, Pass,
};

mod common;

#[global_allocator]
static ALLOC: MeteredAlloc = MeteredAlloc;

fn main() {
    let args = common::Args::from_env();
    let num = |name: &str, default: usize| args.num(name, default);
    let keys = num("--keys", 32768);
    let heads = num("--heads", 32);
    let heads_kv = num("--heads-kv", 8);
    let dim = num("--dim", 128);
    let new = num("--new", 1);
    let iters = num("--iters", 10);
    let rounds = num("--rounds", 3);
    let dtype: DType = args
        .opt("--dtype")
        .map_or(DType::Bf16, |s| s.parse().expect("--dtype"));
    let backend = args.backend();
    let used = vec![(keys - new) as i32];
    let cache = match args.opt("--page") {
        Some(p) => {
            let page: usize = p.parse().expect("--page");
            let pages = keys.div_ceil(page);
            KvCache::paged(pages, page, (0..pages as i32).collect(), pages, used)
        }
        None => KvCache::contiguous(1, keys, used),
    };
    let spec = AttentionSpec::new(1, heads, 1, 1, dim)
        .heads_kv(heads_kv)
        .dtype(dtype)
        .causal(true)
        .kv_cache(cache.seqlen_new(new));
    let bytes = decode_bytes(&spec) as f64;
    println!("{}", backend.device());
    println!(
        "decode step {spec}: {:.1} MiB of K/V read per step",
        bytes / (1 << 20) as f64
    );
    let plan = BenchPlan {
        warmup: 2,
        iters,
        seed: 7,
        pass: Pass::Decode,
    };
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let mut medians = [0.0; 2];
        for (slot, algo) in [Algorithm::Flash, Algorithm::Copy].into_iter().enumerate() {
            let m = backend
                .bench(BenchRun::new(&spec, algo, &plan, &mut || {}))
                .expect("bench failed");
            let median = m.median_ms().expect("timings");
            let best = m.times_ms.iter().copied().fold(f64::INFINITY, f64::min);
            medians[slot] = median;
            println!(
                "round {round} {:<5} median {median:.3} ms  {:.2} GB/s  (min {best:.3} ms = {:.2} GB/s)  extra {:.2} MiB",
                format!("{algo:?}").to_lowercase(),
                bytes / median / 1e6,
                bytes / best / 1e6,
                m.extra_bytes.unwrap_or(0) as f64 / (1 << 20) as f64
            );
        }
        ratios.push(medians[1] / medians[0]);
        println!(
            "round {round} decode / copy bandwidth: {:.2}",
            medians[1] / medians[0]
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median decode / copy bandwidth over {rounds} rounds: {:.2}",
        ratios[ratios.len() / 2]
    );
}
