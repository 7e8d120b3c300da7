//! Strided inputs: transposed `[b, h, s, d]` views and packed-qkv-like padded rows give the
//! same out, LSE and gradients, bit for bit, as the contiguous inputs (the same kernels read
//! them), and match the f64 reference. Unaddressed elements of the strided buffers are NaN,
//! so a read outside a view shows up as NaN.

mod common;

use flashattn_core::testing::strided::{cases, check_backward, check_forward, with_dtype, Layout};
use flashattn_core::{
    random_inputs, AttentionSpec, Backend, DType, Error, ForwardInputs, InputStrides, Strides,
    TensorRef,
};

const LAYOUTS: [Layout; 2] = [Layout::Transposed, Layout::Padded(2 * 72 + 8)];

fn dtypes() -> [DType; 3] {
    [DType::F32, DType::Bf16, DType::F16]
}

#[test]
fn strided_forward_equals_contiguous_every_isa() {
    for (label, backend) in common::every_isa(&[3]) {
        println!("{label}");
        for (i, case) in cases().iter().enumerate() {
            for dtype in dtypes() {
                let spec = with_dtype(case, dtype);
                check_forward(&backend, &spec, &LAYOUTS, 7 + i as u64);
            }
        }
    }
}

#[test]
fn strided_backward_equals_contiguous() {
    let backend = flashattn_cpu::CpuBackend::with_threads(3);
    for (i, case) in cases().iter().enumerate() {
        for dtype in dtypes() {
            check_backward(&backend, &with_dtype(case, dtype), &LAYOUTS, 70 + i as u64);
        }
    }
}

#[test]
fn long_keys_transposed() {
    let backend = flashattn_cpu::CpuBackend::new();
    let spec = AttentionSpec::new(2, 4, 17, 20_011, 72)
        .heads_kv(2)
        .causal(true)
        .return_lse(true);
    check_forward(&backend, &spec, &[Layout::Transposed], 5);
    check_backward(&backend, &spec, &[Layout::Transposed], 6);
}

#[test]
fn decode_reads_a_strided_q() {
    use flashattn_core::testing::strided::strided_copy;
    use flashattn_core::{DecodeInputs, KvCache};
    let backend = flashattn_cpu::CpuBackend::with_threads(2);
    let (b, hq, hkv, sq, d) = (2, 4, 2, 3, 40);
    let cache = KvCache::contiguous(b, 40, vec![17, 29]);
    let spec = AttentionSpec::new(b, hq, sq, 40, d)
        .heads_kv(hkv)
        .causal(true)
        .return_lse(true)
        .kv_cache(cache);
    let (q, k, v) = random_inputs(&spec, 3);
    let run = |spec: &AttentionSpec, q: TensorRef<'_>| {
        let (mut kc, mut vc) = (k.clone(), v.clone());
        let inputs = DecodeInputs {
            q,
            k_cache: kc.as_mut(),
            v_cache: vc.as_mut(),
            k_new: None,
            v_new: None,
        };
        backend.decode(spec, inputs).unwrap()
    };
    let plain = run(&spec, q.as_ref());
    let (qs, st) = strided_copy(&q, (b, sq, hq, d), Layout::Transposed);
    let strided = spec.clone().strides(InputStrides {
        q: Some(st),
        ..Default::default()
    });
    assert!(run(&strided, qs.as_ref()) == plain);
}

#[test]
fn bad_strides_are_errors_naming_the_value() {
    let backend = flashattn_cpu::CpuBackend::with_threads(2);
    let spec = AttentionSpec::new(2, 2, 5, 5, 8);
    let x = vec![0.0f32; 2 * 5 * 2 * 8];
    let t = TensorRef::F32(&x);
    for (st, needle) in [
        (Strides::new(81, 16, 8), "81"),
        (Strides::new(80, 16, 9), "head: 9"),
        (Strides::new(usize::MAX, 16, 8), "overflows"),
    ] {
        let strided = spec.clone().strides(InputStrides {
            v: Some(st),
            ..Default::default()
        });
        let err = backend
            .forward(&strided, ForwardInputs { q: t, k: t, v: t })
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    argument: "strides.v",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(needle), "{err}");
    }
}
