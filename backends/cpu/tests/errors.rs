//! Bad input gives typed errors, never panics; fp8 is rejected with a reason.

use flashattn_core::{
    random_inputs, Algorithm, AttentionSpec, Backend, BackwardInputs, BenchPlan, BenchRun, DType,
    Error, ForwardInputs, Fp8Descale, Pass, Tensor, TensorRef,
};
use flashattn_cpu::CpuBackend;

fn backend() -> CpuBackend {
    CpuBackend::with_threads(2)
}

#[test]
fn fp8_is_unsupported_with_a_reason() {
    let spec = AttentionSpec::new(1, 2, 8, 8, 64)
        .dtype(DType::Fp8E4m3)
        .fp8_descale(Fp8Descale {
            q: vec![1.0; 2],
            k: vec![1.0; 2],
            v: vec![1.0; 2],
        });
    let b = backend();
    match b.supports(&spec) {
        Err(Error::Unsupported { backend, reason }) => {
            assert_eq!(backend, "cpu");
            assert!(reason.contains("fp8"), "reason should name fp8: {reason}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let (q, k, v) = random_inputs(&spec, 1);
    let fwd = b.forward(&spec, ForwardInputs::of(&q, &k, &v));
    assert!(matches!(fwd, Err(Error::Unsupported { .. })), "{fwd:?}");
    let naive = b.naive_forward(&spec, ForwardInputs::of(&q, &k, &v));
    assert!(matches!(naive, Err(Error::Unsupported { .. })), "{naive:?}");
    let plan = BenchPlan {
        warmup: 0,
        iters: 1,
        seed: 1,
        pass: Pass::Forward,
    };
    let bench = b.bench(BenchRun::new(&spec, Algorithm::Flash, &plan, &mut || {}));
    assert!(matches!(bench, Err(Error::Unsupported { .. })), "{bench:?}");
}

#[test]
fn wrong_buffer_lengths_are_errors() {
    let spec = AttentionSpec::new(2, 4, 9, 11, 40)
        .heads_kv(2)
        .head_dim_v(24);
    let (q, k, v) = random_inputs(&spec, 2);
    let b = backend();
    let short = |t: &Tensor| t.to_f32_vec()[1..].to_vec();
    let (qs, ks, vs) = (short(&q), short(&k), short(&v));
    for (name, q, k, v) in [
        ("q", TensorRef::F32(&qs), k.as_ref(), v.as_ref()),
        ("k", q.as_ref(), TensorRef::F32(&ks), v.as_ref()),
        ("v", q.as_ref(), k.as_ref(), TensorRef::F32(&vs)),
        ("q", TensorRef::F32(&[]), k.as_ref(), v.as_ref()),
    ] {
        for result in [
            b.forward(&spec, ForwardInputs { q, k, v }),
            b.naive_forward(&spec, ForwardInputs { q, k, v }),
        ] {
            match result {
                Err(Error::BufferLength { tensor, .. }) => assert_eq!(tensor, name),
                other => panic!("expected BufferLength for {name}, got {other:?}"),
            }
        }
    }
}

#[test]
fn wrong_dtype_is_an_error() {
    let spec = AttentionSpec::new(1, 2, 5, 5, 16);
    let (q, k, v) = random_inputs(&spec, 3);
    let (k16, _, _) = random_inputs(&spec.clone().dtype(DType::F16), 3);
    let _ = k;
    let r = backend().forward(&spec, ForwardInputs::of(&q, &k16, &v));
    assert!(
        matches!(r, Err(Error::DTypeMismatch { tensor: "k", .. })),
        "{r:?}"
    );
}

#[test]
fn invalid_specs_are_errors_naming_the_field() {
    let cases: Vec<(&str, AttentionSpec)> = vec![
        ("heads_kv", AttentionSpec::new(1, 3, 4, 4, 16).heads_kv(2)),
        ("head_dim", AttentionSpec::new(1, 1, 4, 4, 300)),
        (
            "head_dim_v",
            AttentionSpec::new(1, 1, 4, 4, 16).head_dim_v(0),
        ),
        ("batch", AttentionSpec::new(0, 1, 4, 4, 16)),
        (
            "window.left",
            AttentionSpec::new(1, 1, 4, 4, 16).window(-3, 0),
        ),
        (
            "softcap",
            AttentionSpec::new(1, 1, 4, 4, 16).softcap(f32::NAN),
        ),
        ("scale", AttentionSpec::new(1, 1, 4, 4, 16).scale(-1.0)),
        (
            "alibi.slopes",
            AttentionSpec::new(1, 2, 4, 4, 16).alibi(vec![0.5], false),
        ),
        (
            "cu_seqlens_q",
            AttentionSpec::new(1, 1, 10, 10, 16).varlen(vec![0, 6, 4], vec![0, 5, 10]),
        ),
        (
            "cu_seqlens_k",
            AttentionSpec::new(1, 1, 10, 10, 16).varlen(vec![0, 5, 10], vec![0, 5, 11]),
        ),
    ];
    let b = backend();
    for (field, spec) in cases {
        match b.supports(&spec) {
            Err(Error::InvalidSpec { field: f, .. }) => assert_eq!(f, field, "{spec:?}"),
            other => panic!("expected InvalidSpec({field}), got {other:?}"),
        }
        let q = vec![0.0f32; 64];
        let q = TensorRef::F32(&q);
        for r in [
            b.forward(&spec, ForwardInputs { q, k: q, v: q }),
            b.naive_forward(&spec, ForwardInputs { q, k: q, v: q }),
        ] {
            assert!(
                matches!(r, Err(Error::InvalidSpec { .. })),
                "{field}: {r:?}"
            );
        }
    }
}

#[test]
fn non_finite_inputs_do_not_panic() {
    let spec = AttentionSpec::new(1, 2, 20, 30, 64).return_lse(true);
    let (q, k, v) = random_inputs(&spec, 4);
    let mut qv = q.to_f32_vec();
    qv[3] = f32::NAN;
    qv[100] = f32::INFINITY;
    let mut kv = k.to_f32_vec();
    kv[7] = f32::NEG_INFINITY;
    let b = backend();
    let inputs = ForwardInputs {
        q: TensorRef::F32(&qv),
        k: TensorRef::F32(&kv),
        v: v.as_ref(),
    };
    let out = b
        .forward(&spec, inputs)
        .expect("non-finite values are data, not an error");
    assert_eq!(out.out.len(), spec.out_elems().unwrap());
    b.naive_forward(&spec, inputs).expect("naive too");
}

#[test]
fn device_and_name() {
    let b = CpuBackend::with_threads(3);
    assert_eq!(b.name(), "cpu");
    assert_eq!(b.threads(), 3);
    let d = b.device();
    assert!(d.starts_with("CPU: ") && d.contains("3 threads"), "{d}");
    assert!(CpuBackend::new().threads() >= 1);
}

#[test]
fn bad_backward_inputs_are_errors() {
    let b = backend();
    let spec = AttentionSpec::new(1, 2, 9, 11, 16).return_lse(true);
    let (q, k, v) = random_inputs(&spec, 5);
    let fwd = b.forward(&spec, ForwardInputs::of(&q, &k, &v)).unwrap();
    let lse = fwd.lse.clone().unwrap();
    let dout = fwd.out.clone();
    let dout16 = Tensor::from_f32(DType::F16, &dout.to_f32_vec());
    for (what, lse, dout) in [
        ("lse", &lse[1..], dout.as_ref()),
        ("dout", &lse[..], TensorRef::F32(&[0.0; 3])),
        ("dout dtype", &lse[..], dout16.as_ref()),
    ] {
        let inp = BackwardInputs {
            q: q.as_ref(),
            k: k.as_ref(),
            v: v.as_ref(),
            out: fwd.out.as_ref(),
            lse,
            dout,
        };
        for r in [b.backward(&spec, inp), b.naive_backward(&spec, inp)] {
            assert!(
                matches!(
                    r,
                    Err(Error::BufferLength { .. } | Error::DTypeMismatch { .. })
                ),
                "{what}: {r:?}"
            );
        }
    }
    // fp8 and decode specs have no backward here: refused with a reason.
    let fp8 = AttentionSpec::new(1, 2, 8, 8, 64)
        .dtype(DType::Fp8E4m3)
        .fp8_descale(Fp8Descale {
            q: vec![1.0; 2],
            k: vec![1.0; 2],
            v: vec![1.0; 2],
        });
    assert!(matches!(
        b.supports_backward(&fp8),
        Err(Error::Unsupported { .. })
    ));
    let inp = BackwardInputs::of((&q, &k, &v), &fwd.out, &lse, &dout);
    assert!(matches!(
        b.backward(&fp8, inp),
        Err(Error::Unsupported { .. })
    ));
}
