//! Decode against a KV cache: every layout, feature and dtype against the f64 reference on
//! every instruction set; a handle's 50 decode steps against prefills of the same prefix;
//! bad arguments refused with the caches left bit for bit as they were.

use flashattn_core::testing::check_decode;
use flashattn_core::testing::decode::{
    contiguous, decode_cases, decode_nan_reaches_exactly_the_rows_that_see_it,
    decode_steps_equal_prefills, paged, spec,
};
use flashattn_core::{AttentionSpec, Backend, BenchRun, DType};
use flashattn_cpu::{CpuBackend, Isa};

fn backends() -> Vec<(String, CpuBackend)> {
    let mut v = Vec::new();
    for isa in Isa::all_available() {
        for threads in [1, 3] {
            let b = CpuBackend::with_threads(threads).with_isa(isa).unwrap();
            v.push((format!("{isa}, {threads} threads"), b));
        }
    }
    v
}

#[test]
fn decode_matches_the_reference_every_layout_feature_dtype_and_isa() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for (label, backend) in backends() {
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            for (i, (name, spec)) in decode_cases(dtype).into_iter().enumerate() {
                runs += 1;
                if let Err(e) = check_decode(&backend, &spec, 500 + i as u64) {
                    failures.push(format!("[{label}] {name} ({dtype}): {e}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One long cache: 70000 rows, many chunks and a window that ends inside it.
#[test]
fn long_cache_of_70000_rows() {
    let backend = CpuBackend::new();
    let cases = [
        spec(8, 2, 1, 64, paged(&[69_999, 300], 1, 256, 0)).dtype(DType::Bf16),
        spec(4, 1, 2, 64, contiguous(&[70_000], 0, 0))
            .window(30_000, -1)
            .dtype(DType::F16),
    ];
    for (i, spec) in cases.iter().enumerate() {
        check_decode(&backend, spec, 70 + i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// NaN in q or a visible key reaches exactly the rows that see it (core's shared check).
#[test]
fn nan_reaches_exactly_the_rows_that_see_it() {
    for (label, backend) in backends() {
        decode_nan_reaches_exactly_the_rows_that_see_it(&backend, &label);
    }
}

/// A handle appends one token per step and attends; every step equals a prefill over the
/// same prefix (the f64 reference and the CPU forward), and the cache holds what was appended.
#[test]
fn fifty_decode_steps_equal_prefills_of_the_prefix() {
    for (dtype, page, rot) in [
        (DType::F32, Some(3), Some(true)),
        (DType::Bf16, Some(16), None),
        (DType::F16, None, Some(false)),
    ] {
        decode_steps_equal_prefills(&CpuBackend::with_threads(2), dtype, page, rot, 50);
    }
}

/// `bench` with `Pass::Decode`: the step and its copy peer run on resident caches (repeated
/// steps rewrite the same rows, so they never overflow); decode has no naive peer.
#[test]
fn decode_bench_times_the_step_and_the_copy_peer() {
    use flashattn_core::{Algorithm, BenchPlan, Pass};
    let backend = CpuBackend::with_threads(2);
    let spec = spec(8, 2, 1, 64, paged(&[300, 299], 1, 16, 0)).dtype(DType::Bf16);
    let plan = BenchPlan {
        warmup: 1,
        iters: 3,
        seed: 5,
        pass: Pass::Decode,
    };
    for algo in [Algorithm::Flash, Algorithm::Copy] {
        let mut calls = 0;
        let m = backend
            .bench(BenchRun::new(&spec, algo, &plan, &mut || calls += 1))
            .unwrap_or_else(|e| panic!("{algo:?}: {e}"));
        assert_eq!((m.times_ms.len(), calls), (3, 4), "{algo:?}");
        assert!(m.median_ms().is_some_and(|t| t > 0.0), "{algo:?}");
    }
    let e = backend
        .bench(BenchRun::new(&spec, Algorithm::Naive, &plan, &mut || {}))
        .unwrap_err();
    assert!(e.to_string().contains("naive"), "{e}");
    let forward = AttentionSpec::new(1, 1, 1, 1, 8);
    assert!(backend
        .bench(BenchRun::new(&forward, Algorithm::Flash, &plan, &mut || {}))
        .is_err());
}
