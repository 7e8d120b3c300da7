//! Hostile and extreme inputs against the f64 reference: NaN in one key or one query row
//! (the rows that see it are NaN in out and LSE, the others exact, fully masked rows still
//! 0 / -inf), windows at i64::MAX, and benchmark plans whose run count overflows.

mod common;

use flashattn_core::testing::{check_backend, check_cases};
use flashattn_core::{
    lse_max_error, random_inputs, reference_attention, rel_l2_error, Algorithm, AttentionSpec,
    Backend, BenchPlan, BenchRun, DType, Error, ForwardInputs, Pass, Tensor,
};
use flashattn_cpu::CpuBackend;

/// Where to put the NaN.
#[derive(Clone, Copy, Debug)]
enum Poison {
    /// Element `x` of key row (token, kv head).
    Key { token: usize, head: usize, x: usize },
    /// Element `x` of query row (token, head).
    Query { token: usize, head: usize, x: usize },
    /// Element `x` of value row (token, kv head); only without a mask (a masked row's zero
    /// weight times NaN is NaN in a block product, as in FlashAttention's kernels).
    Value { token: usize, head: usize, x: usize },
}

/// Runs `spec` with one NaN planted, on the flash and the naive path, and compares each row
/// with the reference: NaN exactly where the reference is NaN (out row and LSE), the rest
/// within the dtype's tolerance (fully masked rows: out 0, LSE -inf).
fn check_nan(backend: &CpuBackend, label: &str, spec: &AttentionSpec, poison: Poison) {
    let (q, k, v) = random_inputs(spec, 11);
    let (mut q, mut k, mut v) = (q.to_f32_vec(), k.to_f32_vec(), v.to_f32_vec());
    match poison {
        Poison::Key { token, head, x } => {
            k[(token * spec.heads_kv + head) * spec.head_dim + x] = f32::NAN
        }
        Poison::Query { token, head, x } => {
            q[(token * spec.heads_q + head) * spec.head_dim + x] = f32::NAN
        }
        Poison::Value { token, head, x } => {
            v[(token * spec.heads_kv + head) * spec.head_dim_v + x] = f32::NAN
        }
    }
    let [q, k, v] = [q, k, v].map(|t| Tensor::from_f32(spec.dtype, &t));
    let want = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    assert!(
        want.out.iter().any(|x| x.is_nan()),
        "the NaN reaches no row of {spec}: test is void"
    );
    for (path, got) in [
        (
            "flash",
            backend.forward(spec, ForwardInputs::of(&q, &k, &v)),
        ),
        (
            "naive",
            backend.naive_forward(spec, ForwardInputs::of(&q, &k, &v)),
        ),
    ] {
        let got = got.unwrap_or_else(|e| panic!("[{label}] {path}: {e}"));
        let at = format!("[{label}] {path} {poison:?} on {spec}");
        let (out, out_want) = split_nan(&got.out.to_f32_vec(), &want.out, &format!("{at}: out"));
        let err = rel_l2_error(&out, &out_want);
        assert!(
            err <= spec.dtype.tolerance(),
            "{at}: finite out rel L2 {err:e}"
        );
        let (lse, lse_want) = split_nan(&got.lse.unwrap(), &want.lse, &format!("{at}: LSE"));
        let err = lse_max_error(&lse, &lse_want);
        assert!(
            err <= spec.dtype.lse_tolerance(),
            "{at}: finite LSE error {err:e}"
        );
    }
}

/// Checks that `got` is NaN exactly where `want` is, and returns the other elements of both.
fn split_nan(got: &[f32], want: &[f64], at: &str) -> (Vec<f32>, Vec<f64>) {
    assert_eq!(got.len(), want.len(), "{at}: length");
    let mut rest = (Vec::new(), Vec::new());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.is_nan(),
            w.is_nan(),
            "{at}: element {i} is {g}, reference {w}"
        );
        if !w.is_nan() {
            rest.0.push(g);
            rest.1.push(w);
        }
    }
    rest
}

#[test]
fn nan_reaches_exactly_the_rows_that_see_it() {
    let dense = AttentionSpec::new(2, 4, 70, 150, 64)
        .heads_kv(2)
        .return_lse(true);
    // Causal with sq > sk: the first rows are fully masked (0 / -inf), the NaN key (token 9
    // of batch 1) is seen only by the rows at and after its diagonal.
    let causal = AttentionSpec::new(2, 2, 60, 40, 72)
        .causal(true)
        .return_lse(true);
    let window = AttentionSpec::new(1, 2, 300, 300, 40)
        .window(30, 10)
        .softcap(8.0)
        .return_lse(true);
    let cases = [
        (
            dense.clone(),
            Poison::Key {
                token: 150 + 77,
                head: 1,
                x: 5,
            },
        ),
        (
            dense.clone(),
            Poison::Query {
                token: 3,
                head: 2,
                x: 63,
            },
        ),
        (
            dense,
            Poison::Value {
                token: 12,
                head: 0,
                x: 9,
            },
        ),
        (
            causal.clone(),
            Poison::Key {
                token: 40 + 9,
                head: 0,
                x: 0,
            },
        ),
        (
            causal,
            Poison::Query {
                token: 60 + 45,
                head: 1,
                x: 7,
            },
        ),
        (
            window.clone(),
            Poison::Key {
                token: 200,
                head: 1,
                x: 39,
            },
        ),
        (
            window,
            Poison::Query {
                token: 299,
                head: 0,
                x: 1,
            },
        ),
    ];
    for (label, backend) in common::every_isa(&[1, 3]) {
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            for (spec, poison) in &cases {
                check_nan(&backend, &label, &spec.clone().dtype(dtype), *poison);
            }
        }
    }
}

/// Windows at the ends of i64: longer than any sequence, so unbounded (after core's clamp),
/// never an overflow or an empty result.
#[test]
fn extreme_windows_match_the_reference() {
    let base = |sq, sk| AttentionSpec::new(1, 2, sq, sk, 64).return_lse(true);
    let cases = vec![
        ("(-1, MAX)", base(37, 130).window(-1, i64::MAX)),
        ("(MAX, 0)", base(130, 37).window(i64::MAX, 0)),
        ("(MAX, MAX)", base(50, 50).window(i64::MAX, i64::MAX)),
        (
            "(0, MAX) causal",
            base(50, 80).window(0, i64::MAX).causal(true),
        ),
        (
            "(MAX, -1) varlen",
            base(60, 60)
                .window(i64::MAX, -1)
                .varlen(vec![0, 20, 60], vec![0, 45, 60]),
        ),
    ];
    let mut failures = Vec::new();
    for (label, backend) in common::every_isa(&[1, 3]) {
        for e in check_cases(&backend, &cases, 40, check_backend) {
            failures.push(format!("[{label}] {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bench_plans_that_overflow_or_time_nothing_are_errors() {
    let b = CpuBackend::with_threads(2);
    let spec = AttentionSpec::new(1, 1, 8, 8, 16);
    for pass in [Pass::Forward, Pass::Backward] {
        for algo in [Algorithm::Flash, Algorithm::Naive] {
            let plan = |warmup, iters| BenchPlan {
                warmup,
                iters,
                seed: 1,
                pass,
            };
            let mut runs = 0;
            let r = b.bench(BenchRun::new(
                &spec,
                algo,
                &plan(usize::MAX, 1),
                &mut || runs += 1,
            ));
            assert!(
                matches!(r, Err(Error::InvalidArgument { .. })),
                "{pass:?} {algo:?}: {r:?}"
            );
            let r = b.bench(BenchRun::new(&spec, algo, &plan(1, 0), &mut || runs += 1));
            assert!(
                matches!(r, Err(Error::InvalidArgument { .. })),
                "{pass:?} {algo:?}: {r:?}"
            );
            assert_eq!(runs, 0, "nothing may run before the plan is checked");
        }
    }
}
