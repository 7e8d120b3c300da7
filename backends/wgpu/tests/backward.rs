//! The backward pass against the f64 reference backward (`core::testing::check_backward`):
//! every feature case per dtype, random specs, long keys and long rows (many bounded passes),
//! chunked bindings, determinism, the naive peer, and the benchmark's memory.

mod common;

use common::assert_cases;
use flashattn_core::testing::nan::backward_nan_stays_in_its_head_group;
use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::testing::{check_backward, feature_cases, BackwardCase};
use flashattn_core::{reference_backward, rel_l2_error, AttentionSpec, Backend, DType, Pass};
use flashattn_wgpu::WgpuBackend;
use proptest::prelude::*;

fn lse(s: AttentionSpec) -> AttentionSpec {
    s.return_lse(true)
}

#[test]
fn feature_cases_every_dtype() {
    let Some(b) = common::backend() else { return };
    for dtype in common::dtypes(b) {
        assert_cases(b, &feature_cases(dtype), 500, check_backward);
    }
}

/// The workgroup-memory reduction (where the adapter has subgroups, the tests above use them).
#[test]
fn without_subgroups() {
    let Some(b) = common::backend_without_subgroups() else {
        return;
    };
    let cases: Vec<_> = feature_cases(DType::F32)
        .into_iter()
        .filter(|(n, _)| ["odd sizes", "head_dim 200", "gqa", "varlen", "softcap"].contains(n))
        .collect();
    assert_cases(&b, &cases, 800, check_backward);
}

/// Keys and rows far beyond one dispatch's bound: dQ walks many key slices, dK/dV many slices
/// of (query head x row); the f32 accumulators add them in order.
#[test]
fn long_keys_and_rows() {
    let Some(b) = common::backend() else { return };
    let cases = [
        ("33 x 20000", lse(AttentionSpec::new(1, 2, 33, 20_000, 64))),
        (
            "1 x 30000 bf16",
            lse(AttentionSpec::new(1, 2, 1, 30_000, 64).dtype(DType::Bf16)),
        ),
        (
            "mqa causal 1500 x 700",
            lse(AttentionSpec::new(1, 4, 1500, 700, 32)
                .heads_kv(1)
                .causal(true)),
        ),
        (
            "window alibi softcap 600 x 3000",
            lse(AttentionSpec::new(1, 2, 600, 3000, 40)
                .window(700, 50)
                .alibi(vec![0.01, 0.03], false)
                .softcap(6.0)),
        ),
    ];
    assert_cases(b, &cases, 900, check_backward);
}

/// A 16 KiB binding limit cuts q-side and k-side buffers (and the accumulators) into many
/// token ranges: every (query chunk, key chunk) pair must still add up exactly once.
#[test]
fn chunked_bindings() {
    let Some(b) = common::backend_with_binding_limit(16 * 1024) else {
        return;
    };
    let cases = [
        ("dense", lse(AttentionSpec::new(2, 2, 37, 129, 40))),
        (
            "causal gqa",
            lse(AttentionSpec::new(1, 8, 65, 65, 32)
                .heads_kv(2)
                .causal(true)),
        ),
        (
            "bf16 odd dims",
            lse(AttentionSpec::new(1, 6, 41, 50, 21)
                .head_dim_v(13)
                .dtype(DType::Bf16)),
        ),
        (
            "varlen with an uncovered tail",
            lse(AttentionSpec::new(1, 8, 70, 95, 32)
                .varlen(vec![0, 7, 7, 60], vec![0, 40, 41, 90])
                .causal(true)),
        ),
    ];
    assert_cases(&b, &cases, 1000, check_backward);
}

/// The same inputs give bitwise the same gradients on every run and on a second device
/// (fixed-order accumulation, no atomics), through passes and chunks.
#[test]
fn deterministic() {
    let Some(b) = common::backend() else { return };
    let other = WgpuBackend::new()
        .expect("second device")
        .with_max_binding_bytes(1 << 20);
    for dtype in [DType::F32, DType::Bf16] {
        let spec = lse(AttentionSpec::new(2, 4, 300, 700, 40)
            .heads_kv(2)
            .causal(true)
            .dtype(dtype));
        let case = BackwardCase::new(b, &spec, 21).unwrap();
        let inputs = case.inputs();
        let first = b.backward(&spec, inputs).unwrap();
        for (run, backend) in [(1, b), (2, b), (3, &other)] {
            let again = backend.backward(&spec, inputs).unwrap();
            for (name, x, y) in [
                ("dq", &first.dq, &again.dq),
                ("dk", &first.dk, &again.dk),
                ("dv", &first.dv, &again.dv),
            ] {
                assert!(
                    x.as_ref().as_bytes() == y.as_ref().as_bytes(),
                    "{dtype}: {name} of run {run} differs from the first"
                );
            }
        }
    }
}

/// The naive backward (the benchmark's peer) is right too.
#[test]
fn naive_backward_matches_the_reference() {
    let Some(b) = common::backend() else { return };
    for (name, spec) in feature_cases(DType::F32) {
        if spec.is_varlen() {
            continue;
        }
        let case = BackwardCase::new(b, &spec, 31).unwrap();
        let inputs = case.inputs();
        let got = pollster::block_on(b.naive_backward_async(&spec, inputs))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (q, k, v, dout) = (
            case.q.as_ref(),
            case.k.as_ref(),
            case.v.as_ref(),
            case.dout.as_ref(),
        );
        let want = reference_backward(&spec, q, k, v, dout).unwrap();
        for (g, w, which) in [
            (&got.dq, &want.dq, "dq"),
            (&got.dk, &want.dk, "dk"),
            (&got.dv, &want.dv, "dv"),
        ] {
            let err = rel_l2_error(&g.to_f32_vec(), w);
            assert!(err < 2e-4, "{name}: {which} rel L2 {err:.3e}");
        }
    }
}

/// The benchmark times both backward passes and measures their extra memory: flash keeps
/// O(N) statistics, naive the score matrices.
#[test]
fn bench_backward_uses_far_less_memory_than_naive() {
    let Some(b) = common::backend() else { return };
    // Naive holds P (then dS), 2 x 256 x 256 f32; flash the f32 statistics of 2 x 256 rows.
    let spec = AttentionSpec::new(1, 2, 256, 256, 64);
    common::assert_bench_memory(b, &spec, Pass::Backward, 2 * 256 * 256 * 4, 10);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_match_the_reference(
        spec in specs(SpecSpace::new(&[DType::F32, DType::F16, DType::Bf16])),
        seed in any::<u64>(),
    ) {
        let Some(b) = common::backend() else { return Ok(()) };
        if spec.dtype == DType::F16 && !b.has_f16() {
            return Ok(());
        }
        if let Err(e) = check_backward(b, &spec, seed) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// NaN in one key reaches exactly its head group's gradients (core's shared check).
#[test]
fn nan_stays_in_its_head_group() {
    let Some(b) = common::backend() else { return };
    for dtype in common::dtypes(b) {
        backward_nan_stays_in_its_head_group(b, dtype).unwrap_or_else(|e| panic!("{e}"));
    }
}
