//! The shared feature cases against the f64 reference, per dtype, on both reduction paths,
//! and through the chunking path (a tiny artificial binding limit).

mod common;

use common::assert_cases;
use flashattn_core::testing::nan::same_nans_and_close;
use flashattn_core::testing::{check_backend, feature_cases};
use flashattn_core::{
    random_inputs, reference_attention, AttentionSpec, Backend, DType, ForwardInputs, Tensor,
};

#[test]
fn feature_cases_every_dtype() {
    let Some(b) = common::backend() else { return };
    for dtype in common::dtypes(b) {
        assert_cases(b, &feature_cases(dtype), 1000, check_backend);
    }
}

#[test]
fn feature_cases_without_subgroups() {
    let Some(b) = common::backend_without_subgroups() else {
        return;
    };
    assert_eq!(b.subgroup_size(), 0);
    assert_cases(&b, &feature_cases(DType::F32), 1000, check_backend);
}

/// Varlen tokens past cu_seqlens_q[batch] belong to no sequence: out 0 and LSE -inf, even
/// when a pooled buffer held other data before.
#[test]
fn varlen_tokens_outside_every_sequence() {
    let Some(b) = common::backend() else { return };
    let dense = AttentionSpec::new(1, 2, 30, 30, 16);
    flashattn_core::testing::check_backend(b, &dense, 1).expect("fills the pool");
    let spec = AttentionSpec::new(1, 2, 30, 30, 16)
        .varlen(vec![0, 10, 20], vec![0, 15, 30])
        .return_lse(true);
    assert_cases(b, &[("uncovered tail", spec)], 1000, check_backend);
}

#[test]
fn fp8_is_unsupported_with_a_reason() {
    let Some(b) = common::backend() else { return };
    let spec = AttentionSpec::new(1, 1, 4, 4, 16).dtype(DType::Fp8E4m3);
    let err = b.check_supported(&spec).unwrap_err();
    assert!(err.to_string().contains("fp8"), "{err}");
}

/// A 16 KiB binding limit forces q/out and k/v into many token ranges, partial results for
/// every key range and the combine kernel: every feature must still match the reference.
#[test]
fn chunked_bindings_match_the_reference() {
    let Some(b) = common::backend_with_binding_limit(16 * 1024) else {
        return;
    };
    let lse = |s: AttentionSpec| s.return_lse(true);
    let cases = vec![
        ("dense", lse(AttentionSpec::new(2, 2, 37, 129, 40))),
        (
            "causal gqa",
            lse(AttentionSpec::new(1, 8, 65, 65, 32)
                .heads_kv(2)
                .causal(true)),
        ),
        (
            "window alibi softcap",
            lse(AttentionSpec::new(1, 4, 50, 70, 48)
                .window(9, 3)
                .alibi(vec![0.3, 0.1, 0.2, 0.05], false)
                .softcap(4.0)),
        ),
        (
            "dv differs, odd",
            lse(AttentionSpec::new(1, 8, 33, 47, 20).head_dim_v(13)),
        ),
        (
            "bf16 odd dv",
            lse(AttentionSpec::new(1, 12, 21, 40, 64)
                .head_dim_v(7)
                .dtype(DType::Bf16)),
        ),
        (
            "bf16 causal",
            lse(AttentionSpec::new(2, 8, 31, 31, 64)
                .causal(true)
                .dtype(DType::Bf16)),
        ),
        (
            "varlen",
            lse(AttentionSpec::new(1, 8, 60, 90, 32)
                .varlen(vec![0, 7, 7, 60], vec![0, 40, 41, 90])
                .causal(true)),
        ),
    ];
    assert_cases(&b, &cases, 1000, check_backend);
}

/// NaN in gives NaN out exactly in what sees it, as in the f64 reference: a NaN key makes the
/// rows that see it NaN (output and LSE), a NaN value the output element of the rows that see
/// it, a NaN query its row; rows that see none stay exact and fully masked rows give 0 and
/// -inf. Through the direct path, split-KV and several passes per row.
#[test]
fn nan_reaches_exactly_what_sees_it() {
    let Some(b) = common::backend() else { return };
    // (spec, key with a NaN in k, key with a NaN in v, query row with a NaN)
    let cases = [
        (
            AttentionSpec::new(1, 2, 70, 50, 32).causal(true),
            30,
            10,
            60,
        ),
        (
            AttentionSpec::new(1, 2, 70, 50, 32)
                .causal(true)
                .dtype(DType::Bf16),
            30,
            10,
            60,
        ),
        (AttentionSpec::new(1, 3, 1, 3000, 64), 2000, 100, 0),
        (
            AttentionSpec::new(1, 2, 130, 1500, 64).causal(true),
            1400,
            1380,
            129,
        ),
    ];
    for (spec, k_nan, v_nan, q_nan) in cases {
        let spec = spec.return_lse(true);
        let (q, k, v) = random_inputs(&spec, 3);
        let poison = |t: &Tensor, at: usize| {
            let mut x = t.to_f32_vec();
            x[at] = f32::NAN;
            Tensor::from_f32(spec.dtype, &x)
        };
        // kv head 0, element 3 of key k_nan and element 5 of value v_nan; the last query head.
        let k = poison(&k, k_nan * spec.heads_kv * spec.head_dim + 3);
        let v = poison(&v, v_nan * spec.heads_kv * spec.head_dim_v + 5);
        let q = poison(
            &q,
            (q_nan * spec.heads_q + spec.heads_q - 1) * spec.head_dim + 1,
        );
        let want = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
        let got = b
            .forward(&spec, ForwardInputs::of(&q, &k, &v))
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert!(
            want.lse.iter().any(|x| x.is_nan()),
            "{spec}: the case has NaN rows"
        );
        assert!(
            want.lse.iter().any(|x| x.is_finite()),
            "{spec}: and finite ones"
        );
        same_nans_and_close(&got.out.to_f32_vec(), &want.out, spec.dtype.tolerance())
            .unwrap_or_else(|e| panic!("{spec}: out: {e}"));
        same_nans_and_close(&got.lse.unwrap(), &want.lse, 1e-3)
            .unwrap_or_else(|e| panic!("{spec}: lse: {e}"));
    }
}

/// Windows longer than any sequence are unbounded (core's Mask drops them on the host), as in
/// the reference, which tests every pair itself: no all-zero output, no overflow.
#[test]
fn extreme_windows_match_the_reference() {
    let Some(b) = common::backend() else { return };
    let base = || AttentionSpec::new(1, 2, 40, 70, 32).return_lse(true);
    let cases = [
        ("window (-1, i64::MAX)", base().window(-1, i64::MAX)),
        (
            "window (i64::MAX, i64::MAX)",
            base().window(i64::MAX, i64::MAX),
        ),
        ("window (i64::MAX, 0)", base().window(i64::MAX, 0)),
        ("window (5, i64::MAX)", base().window(5, i64::MAX)),
        (
            "causal + window (i64::MAX, -1)",
            base().causal(true).window(i64::MAX, -1),
        ),
    ];
    assert_cases(b, &cases, 77, check_backend);
}
