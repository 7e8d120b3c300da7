//! The shared feature cases against the f64 reference, per dtype, on both reduction paths,
//! and through the chunking path (a tiny artificial binding limit).

mod common;

use common::assert_forward_cases;
use flashattn_core::testing::feature_cases;
use flashattn_core::{AttentionSpec, DType};
use flashattn_wgpu::WgpuBackend;

#[test]
fn feature_cases_f32() {
    let Some(b) = common::backend() else { return };
    assert_forward_cases(b, &feature_cases(DType::F32), 1000);
}

#[test]
fn feature_cases_f16() {
    let Some(b) = common::backend() else { return };
    if !b.has_f16() {
        eprintln!(
            "SKIP f16: adapter {} has no SHADER_F16",
            b.adapter_info().name
        );
        return;
    }
    assert_forward_cases(b, &feature_cases(DType::F16), 1000);
}

#[test]
fn feature_cases_bf16() {
    let Some(b) = common::backend() else { return };
    assert_forward_cases(b, &feature_cases(DType::Bf16), 1000);
}

#[test]
fn feature_cases_without_subgroups() {
    if common::backend().is_none() {
        return;
    }
    let b = WgpuBackend::new()
        .expect("second device")
        .without_subgroups();
    assert_eq!(b.subgroup_size(), 0);
    assert_forward_cases(&b, &feature_cases(DType::F32), 1000);
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
    assert_forward_cases(b, &[("uncovered tail", spec)], 1000);
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
    if common::backend().is_none() {
        return;
    }
    let b = WgpuBackend::new()
        .expect("second device")
        .with_max_binding_bytes(16 * 1024);
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
    assert_forward_cases(&b, &cases, 1000);
}
