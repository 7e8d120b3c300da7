//! Every invalid input gets a typed error naming the field and the value; nothing panics.

use flashattn_core::{validate_inputs, AttentionSpec, DType, Error, Fp8Descale, Tensor, TensorRef};

fn spec() -> AttentionSpec {
    AttentionSpec::new(2, 4, 8, 8, 16)
}

/// Asserts that `spec` is rejected for `field`, and the message names the bad value.
fn rejects(spec: AttentionSpec, field: &str, value_fragment: &str) {
    match spec.validate() {
        Err(Error::InvalidSpec {
            field: f, value, ..
        }) => {
            assert_eq!(f, field, "wrong field for {spec:?}");
            assert!(
                value.contains(value_fragment),
                "value '{value}' should mention '{value_fragment}'"
            );
            let msg = spec.validate().unwrap_err().to_string();
            assert!(msg.contains(field), "message '{msg}' should name {field}");
        }
        other => panic!("expected an InvalidSpec error for {field}, got {other:?}"),
    }
}

#[test]
fn a_valid_spec_passes() {
    spec().validate().unwrap();
    spec()
        .causal(true)
        .window(3, 0)
        .softcap(30.0)
        .heads_kv(2)
        .return_lse(true)
        .build()
        .unwrap();
}

#[test]
fn zero_sizes_are_rejected() {
    let mut s = spec();
    s.batch = 0;
    rejects(s, "batch", "0");
    let mut s = spec();
    s.heads_q = 0;
    rejects(s, "heads_q", "0");
    rejects(spec().heads_kv(0), "heads_kv", "0");
    let mut s = spec();
    s.seqlen_q = 0;
    rejects(s, "seqlen_q", "0");
    let mut s = spec();
    s.seqlen_k = 0;
    rejects(s, "seqlen_k", "0");
}

#[test]
fn head_dims_out_of_range_are_rejected() {
    rejects(AttentionSpec::new(1, 1, 4, 4, 0), "head_dim", "0");
    rejects(AttentionSpec::new(1, 1, 4, 4, 257), "head_dim", "257");
    rejects(spec().head_dim_v(0), "head_dim_v", "0");
    rejects(spec().head_dim_v(300), "head_dim_v", "300");
    AttentionSpec::new(1, 1, 4, 4, 256).validate().unwrap();
}

#[test]
fn heads_must_divide() {
    rejects(spec().heads_kv(3), "heads_kv", "3");
}

#[test]
fn window_below_minus_one_is_rejected() {
    rejects(spec().window(-2, 0), "window.left", "-2");
    rejects(spec().window(4, -7), "window.right", "-7");
}

#[test]
fn bad_scale_and_softcap_are_rejected() {
    rejects(spec().scale(0.0), "scale", "0");
    rejects(spec().scale(-1.5), "scale", "-1.5");
    rejects(spec().scale(f32::NAN), "scale", "NaN");
    rejects(spec().scale(f32::INFINITY), "scale", "inf");
    rejects(spec().softcap(-2.0), "softcap", "-2");
    rejects(spec().softcap(f32::NAN), "softcap", "NaN");
}

#[test]
fn alibi_slopes_must_match_heads() {
    rejects(
        spec().alibi(vec![0.1; 3], false),
        "alibi.slopes",
        "3 slopes",
    );
    rejects(spec().alibi(vec![0.1; 4], true), "alibi.slopes", "4 slopes");
    rejects(
        spec().alibi(vec![0.1, f32::NAN, 0.1, 0.1], false),
        "alibi.slopes",
        "NaN",
    );
    spec().alibi(vec![0.1; 8], true).validate().unwrap();
}

#[test]
fn cu_seqlens_are_checked() {
    let v = |q: Vec<i32>, k: Vec<i32>| AttentionSpec::new(1, 2, 10, 12, 16).varlen(q, k);
    v(vec![0, 4, 10], vec![0, 6, 12]).validate().unwrap();
    rejects(
        v(vec![1, 4, 10], vec![0, 6, 12]),
        "cu_seqlens_q",
        "cu_seqlens_q[0] = 1",
    );
    rejects(
        v(vec![0, 6, 4], vec![0, 6, 12]),
        "cu_seqlens_q",
        "cu_seqlens_q[2] = 4",
    );
    rejects(
        v(vec![0, 4, 11], vec![0, 6, 12]),
        "cu_seqlens_q",
        "cu_seqlens_q[2] = 11",
    );
    rejects(v(vec![0, 4, 10], vec![0, 6, 13]), "cu_seqlens_k", "13");
    rejects(v(vec![0, 4, 10], vec![0, 12]), "cu_seqlens_k", "2 offsets");
    rejects(v(vec![0], vec![0]), "batch", "0");
}

#[test]
fn fp8_descales_are_checked() {
    let d = |n: usize, x: f32| Fp8Descale {
        q: vec![x; n],
        k: vec![1.0; n],
        v: vec![1.0; n],
    };
    let s = spec().dtype(DType::Fp8E4m3);
    s.clone().fp8_descale(d(8, 1.0)).validate().unwrap();
    rejects(
        s.clone().fp8_descale(d(3, 1.0)),
        "fp8_descale.q",
        "3 values",
    );
    rejects(s.fp8_descale(d(8, 0.0)), "fp8_descale.q", "0");
    rejects(spec().fp8_descale(d(8, 1.0)), "fp8_descale", "set");
}

#[test]
fn element_count_overflow_is_rejected() {
    let s = AttentionSpec::new(usize::MAX / 2, 4, 1 << 20, 1 << 20, 128);
    rejects(s, "shape", "b=");
}

#[test]
fn buffers_must_match_the_spec() {
    let s = AttentionSpec::new(1, 2, 3, 5, 4).heads_kv(1);
    let q = vec![0.5f32; 24];
    let k = vec![0.5f32; 20];
    let v = vec![0.5f32; 20];
    validate_inputs(
        &s,
        &TensorRef::F32(&q),
        &TensorRef::F32(&k),
        &TensorRef::F32(&v),
    )
    .unwrap();
    let short = vec![0.5f32; 19];
    let err = validate_inputs(
        &s,
        &TensorRef::F32(&q),
        &TensorRef::F32(&short),
        &TensorRef::F32(&v),
    )
    .unwrap_err();
    assert!(matches!(
        err,
        Error::BufferLength {
            tensor: "k",
            expected: 20,
            actual: 19,
            ..
        }
    ));
    let h = Tensor::from_f32(DType::F16, &v);
    let err =
        validate_inputs(&s, &TensorRef::F32(&q), &TensorRef::F32(&k), &h.as_ref()).unwrap_err();
    assert!(
        err.to_string()
            .contains("v is f16 but the spec's dtype is f32"),
        "{err}"
    );
}
