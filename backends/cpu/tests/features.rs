//! Every named feature case, for every dtype, instruction set and a few thread counts,
//! against the f64 reference.

mod common;

use flashattn_core::testing::{check_backend, check_cases, feature_cases};
use flashattn_core::{AttentionSpec, Backend, DType};
use flashattn_cpu::CpuBackend;

fn run_cases(backend: &dyn Backend, label: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        let cases = feature_cases(dtype);
        for e in check_cases(backend, &cases, 1000, check_backend) {
            failures.push(format!("[{label}] ({dtype}) {e}"));
        }
    }
    failures
}

#[test]
fn feature_cases_every_isa_and_thread_count() {
    let mut failures = Vec::new();
    for (label, backend) in common::every_isa(&[1, 3]) {
        failures.extend(run_cases(&backend, &label));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Layouts that switch the kernel between reading K / V in place and packing them
/// (one kv head: contiguous rows; a 4 KiB row stride: packed; other strides: K in place).
#[test]
fn in_place_and_packed_kv_layouts() {
    let cases = [
        AttentionSpec::new(1, 8, 70, 150, 128), // 4 KiB K stride: packed
        AttentionSpec::new(1, 8, 70, 150, 128).heads_kv(4), // 2 KiB: K in place
        AttentionSpec::new(2, 4, 33, 300, 256).causal(true), // 4 KiB: packed
        AttentionSpec::new(1, 3, 200, 257, 64).heads_kv(1), // contiguous: K and V in place
        AttentionSpec::new(1, 2, 50, 129, 40).heads_kv(1), // contiguous K, dv padded
    ];
    let cases: Vec<_> = cases
        .into_iter()
        .map(|s| (s.to_string(), s.return_lse(true)))
        .collect();
    let mut failures = Vec::new();
    for (label, backend) in common::every_isa(&[2]) {
        for e in check_cases(&backend, &cases, 77, check_backend) {
            failures.push(format!("[{label}] {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Sequences long enough for full-size query blocks (up to 384 rows) and several key
/// blocks, where whole blocks and row groups are skipped along the mask's diagonal.
#[test]
fn long_masked_sequences() {
    let cases = [
        AttentionSpec::new(1, 2, 800, 800, 64).causal(true),
        AttentionSpec::new(1, 2, 500, 900, 32).causal(true),
        AttentionSpec::new(1, 1, 900, 700, 64).window(100, 50),
        AttentionSpec::new(1, 2, 640, 640, 16)
            .window(-1, 0)
            .alibi(vec![0.1, 0.02], false),
        AttentionSpec::new(1, 2, 900, 900, 64)
            .varlen(vec![0, 400, 900], vec![0, 500, 900])
            .causal(true),
    ];
    let cases: Vec<_> = cases
        .into_iter()
        .map(|s| (s.to_string(), s.return_lse(true)))
        .collect();
    for threads in [1, 3] {
        let failures = check_cases(
            &CpuBackend::with_threads(threads),
            &cases,
            300,
            check_backend,
        );
        assert!(
            failures.is_empty(),
            "{threads} threads: {}",
            failures.join("\n")
        );
    }
}

#[test]
fn default_backend_passes_feature_cases() {
    let backend = CpuBackend::new();
    let failures = run_cases(&backend, "default");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn naive_path_matches_reference() {
    for threads in [1, 3] {
        let failures = run_cases(&common::Naive(CpuBackend::with_threads(threads)), "naive");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
