//! Packed qkv `[b, s, 3, h, d]` and kv `[b, s, 2, h_kv, d]` buffers read in place: the same
//! out and gradients, bit for bit, as the CPU backend on contiguous copies, matching the f64
//! reference; the runtime routes strided inputs to a backend that takes them.

use flashattn::cpu::CpuBackend;
use flashattn::testing::backend_or_skip;
use flashattn::{
    attention_backward, kv_packed, kv_packed_views, qkv_packed, qkv_packed_views, random_inputs,
    random_tensor, reference_attention, rel_l2_error, AttentionSpec, Backend, BackwardInputs,
    DType, Error, ForwardInputs, Runtime, Tensor, TensorRef,
};
use rand::SeedableRng;
use std::sync::Arc;

/// Contiguous `[tokens, heads, d]` tensors interleaved as `[tokens, parts, heads, d]`.
fn pack(parts: &[&Tensor], heads: usize, d: usize) -> Tensor {
    let vals: Vec<Vec<f32>> = parts.iter().map(|t| t.to_f32_vec()).collect();
    let row = heads * d;
    let tokens = vals[0].len() / row;
    let mut buf = Vec::with_capacity(tokens * parts.len() * row);
    for t in 0..tokens {
        for v in &vals {
            buf.extend_from_slice(&v[t * row..(t + 1) * row]);
        }
    }
    Tensor::from_f32(parts[0].dtype(), &buf)
}

fn qkv_cases() -> Vec<AttentionSpec> {
    vec![
        AttentionSpec::new(2, 3, 129, 129, 40)
            .causal(true)
            .dtype(DType::Bf16),
        AttentionSpec::new(3, 2, 147, 147, 72)
            .varlen(vec![0, 17, 18, 147], vec![0, 17, 18, 147])
            .causal(true),
        AttentionSpec::new(1, 1, 1, 1, 40).dtype(DType::F16),
    ]
}

#[test]
fn qkv_packed_equals_contiguous_and_the_reference() {
    let cpu = CpuBackend::new();
    for (i, spec) in qkv_cases().into_iter().enumerate() {
        let spec = spec.return_lse(true);
        let (q, k, v) = random_inputs(&spec, 40 + i as u64);
        let plain = cpu.forward(&spec, ForwardInputs::of(&q, &k, &v)).unwrap();
        let qkv = pack(&[&q, &k, &v], spec.heads_q, spec.head_dim);
        let got = qkv_packed(&spec, qkv.as_ref()).unwrap();
        assert!(got == plain, "{spec}: packed output differs");
        let want = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
        let err = rel_l2_error(&got.out.to_f32_vec(), &want.out);
        assert!(err <= spec.dtype.tolerance(), "{spec}: rel L2 {err:.2e}");

        // The backward of the packed call: the same spec and views.
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        let dout = random_tensor(&mut rng, spec.dtype, spec.out_elems().unwrap());
        let lse = plain.lse.clone().unwrap();
        let inputs = BackwardInputs::of((&q, &k, &v), &plain.out, &lse, &dout);
        let grads_plain = cpu.backward(&spec, inputs).unwrap();
        let (pspec, [pq, pk, pv]) = qkv_packed_views(&spec, qkv.as_ref()).unwrap();
        let out = got.out.as_ref();
        let grads = attention_backward(&pspec, pq, pk, pv, out, &lse, dout.as_ref()).unwrap();
        assert!(grads == grads_plain, "{spec}: packed gradients differ");
    }
}

#[test]
fn kv_packed_with_gqa_equals_contiguous() {
    let cpu = CpuBackend::new();
    let spec = AttentionSpec::new(2, 4, 17, 129, 72)
        .heads_kv(2)
        .causal(true)
        .dtype(DType::F16)
        .return_lse(true);
    let (q, k, v) = random_inputs(&spec, 9);
    let plain = cpu.forward(&spec, ForwardInputs::of(&q, &k, &v)).unwrap();
    let kv = pack(&[&k, &v], spec.heads_kv, spec.head_dim);
    let got = kv_packed(&spec, q.as_ref(), kv.as_ref()).unwrap();
    assert!(got == plain);
    let want = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let err = rel_l2_error(&got.out.to_f32_vec(), &want.out);
    assert!(err <= spec.dtype.tolerance(), "rel L2 {err:.2e}");
}

#[test]
fn packed_shapes_that_do_not_fit_are_errors() {
    let spec = AttentionSpec::new(1, 4, 8, 8, 16).heads_kv(2);
    let buf = vec![0.0f32; 3 * 8 * 4 * 16];
    let err = qkv_packed_views(&spec, TensorRef::F32(&buf)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidSpec {
                field: "heads_kv",
                ..
            }
        ),
        "{err}"
    );

    let spec = AttentionSpec::new(1, 2, 8, 8, 16);
    let short = vec![0.0f32; 3 * 8 * 2 * 16 - 1];
    let err = qkv_packed(&spec, TensorRef::F32(&short)).unwrap_err();
    assert!(err.to_string().contains("strides.v"), "{err}");
    let err = kv_packed_views(&spec, TensorRef::F32(&short[..10])).unwrap_err();
    assert!(err.to_string().contains("kv"), "{err}");
}

#[test]
fn the_runtime_routes_strided_inputs_past_backends_that_refuse_them() {
    let spec = AttentionSpec::new(1, 2, 8, 8, 16);
    let (strided, _) = qkv_packed_views(&spec, TensorRef::F32(&[0.0; 768])).unwrap();
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    if let Some(w) = backend_or_skip("wgpu", flashattn::wgpu::WgpuBackend::new) {
        // wgpu reads strided inputs, each bound whole: under a 256-byte binding limit it
        // refuses this packed q (2.8 KB), naming it.
        w.supports(&strided).unwrap();
        let w = w.with_max_binding_bytes(256);
        w.supports(&spec).unwrap();
        let err = w.supports(&strided).unwrap_err();
        assert!(err.to_string().contains("strided q"), "{err}");
        backends.push(Arc::new(w));
    }
    backends.push(Arc::new(CpuBackend::with_threads(2)));
    let rt = Runtime::with_backends(backends, false);
    let s = rt.select(&strided).unwrap();
    assert_eq!(s.backend.name(), "cpu", "{}", s.reason);
}
