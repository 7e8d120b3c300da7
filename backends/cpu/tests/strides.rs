//! Strided inputs: transposed `[b, h, s, d]` views and packed-qkv-like padded rows give the
//! same out, LSE and gradients, bit for bit, as the contiguous inputs (the same kernels read
//! them), and match the f64 reference. Unaddressed elements of the strided buffers are NaN,
//! so a read outside a view shows up as NaN.

mod common;

use flashattn_core::testing::backward_tolerance;
use flashattn_core::testing::strided::{strided_inputs, Layout};
use flashattn_core::{
    random_inputs, random_tensor, reference_attention, reference_backward, rel_l2_error,
    AttentionSpec, Backend, BackwardInputs, DType, Error, InputStrides, Strides, TensorRef,
};
use rand::SeedableRng;

/// Odd sizes, GQA, causal and windowed masks, head dims 40 and 72, varlen, one query row.
fn cases() -> Vec<AttentionSpec> {
    vec![
        AttentionSpec::new(2, 4, 17, 129, 40)
            .heads_kv(2)
            .causal(true),
        AttentionSpec::new(3, 2, 129, 129, 72).causal(true),
        AttentionSpec::new(2, 3, 1, 17, 72)
            .head_dim_v(40)
            .softcap(20.0),
        AttentionSpec::new(1, 6, 129, 17, 40)
            .heads_kv(3)
            .window(8, 0),
        AttentionSpec::new(3, 4, 1, 1, 40)
            .heads_kv(1)
            .varlen(vec![0, 1, 18, 147], vec![0, 17, 146, 147])
            .causal(true),
    ]
}

const LAYOUTS: [Layout; 2] = [Layout::Transposed, Layout::Padded(2 * 72 + 8)];

fn dtypes() -> [DType; 3] {
    [DType::F32, DType::Bf16, DType::F16]
}

fn with_dtype(spec: &AttentionSpec, dtype: DType) -> AttentionSpec {
    let mut s = spec.clone().dtype(dtype).return_lse(true);
    if s.is_varlen() {
        // The varlen cases' total token counts.
        let v = s.varlen.clone().unwrap();
        s.seqlen_q = *v.cu_seqlens_q.last().unwrap() as usize;
        s.seqlen_k = *v.cu_seqlens_k.last().unwrap() as usize;
    }
    s
}

/// Forward with strided views == forward on contiguous copies, bitwise; both match the
/// reference. Returns a failure description per case.
fn check_forward(backend: &dyn Backend, spec: &AttentionSpec, layout: Layout, seed: u64) {
    spec.validate().unwrap();
    let (q, k, v) = random_inputs(spec, seed);
    let plain = backend
        .forward(spec, q.as_ref(), k.as_ref(), v.as_ref())
        .unwrap();
    let s = strided_inputs(spec, (&q, &k, &v), None, layout);
    let got = backend
        .forward(&s.spec, s.q.as_ref(), s.k.as_ref(), s.v.as_ref())
        .unwrap_or_else(|e| panic!("{spec} {layout:?}: {e}"));
    assert!(got == plain, "{spec} {layout:?}: strided output differs");
    let want = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let err = rel_l2_error(&got.out.to_f32_vec(), &want.out);
    assert!(
        err <= spec.dtype.tolerance(),
        "{spec} {layout:?}: rel L2 {err:.2e}"
    );
}

fn check_backward(backend: &dyn Backend, spec: &AttentionSpec, layout: Layout, seed: u64) {
    let (q, k, v) = random_inputs(spec, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xd0);
    let dout = random_tensor(&mut rng, spec.dtype.output(), spec.out_elems().unwrap());
    let fwd = backend
        .forward(spec, q.as_ref(), k.as_ref(), v.as_ref())
        .unwrap();
    let lse = fwd.lse.clone().unwrap();
    let plain = backend
        .backward(
            spec,
            BackwardInputs {
                q: q.as_ref(),
                k: k.as_ref(),
                v: v.as_ref(),
                out: fwd.out.as_ref(),
                lse: &lse,
                dout: dout.as_ref(),
            },
        )
        .unwrap();
    let s = strided_inputs(spec, (&q, &k, &v), Some((&fwd.out, &dout)), layout);
    let (out, d_out) = (s.out.as_ref().unwrap(), s.dout.as_ref().unwrap());
    let got = backend
        .backward(
            &s.spec,
            BackwardInputs {
                q: s.q.as_ref(),
                k: s.k.as_ref(),
                v: s.v.as_ref(),
                out: out.as_ref(),
                lse: &lse,
                dout: d_out.as_ref(),
            },
        )
        .unwrap_or_else(|e| panic!("{spec} {layout:?}: {e}"));
    assert!(got == plain, "{spec} {layout:?}: strided gradients differ");
    let want = reference_backward(spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    let tol = backward_tolerance(spec.dtype);
    for (name, g, w) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        let err = rel_l2_error(&g.to_f32_vec(), w);
        assert!(err <= tol, "{spec} {layout:?}: {name} rel L2 {err:.2e}");
    }
}

#[test]
fn strided_forward_equals_contiguous_every_isa() {
    for (label, backend) in common::every_isa(&[3]) {
        println!("{label}");
        for (i, case) in cases().iter().enumerate() {
            for dtype in dtypes() {
                for layout in LAYOUTS {
                    check_forward(&backend, &with_dtype(case, dtype), layout, 7 + i as u64);
                }
            }
        }
    }
}

#[test]
fn strided_backward_equals_contiguous() {
    let backend = flashattn_cpu::CpuBackend::with_threads(3);
    for (i, case) in cases().iter().enumerate() {
        for dtype in dtypes() {
            for layout in LAYOUTS {
                check_backward(&backend, &with_dtype(case, dtype), layout, 70 + i as u64);
            }
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
    check_forward(&backend, &spec, Layout::Transposed, 5);
    check_backward(&backend, &spec, Layout::Transposed, 6);
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
        let err = backend.forward(&strided, t, t, t).unwrap_err();
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
