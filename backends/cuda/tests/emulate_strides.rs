//! Without a GPU: strided inputs through the CUDA kernels' real source on the CPU emulator
//! (tests/emulator/emu.h). A transposed `[b, h, s, d]` view and a packed `[b, s, 3, h, d]`
//! qkv buffer (rows padded, the padding NaN) give the same out, LSE and gradients, bit for bit,
//! as the same problem contiguous (the same kernel binary reads both), and match the f64
//! reference. Elements outside a view are NaN, so a read outside it shows up as NaN.
//! Small odd sizes: the emulator runs every CUDA thread as a fiber.

mod common;

use common::emulated::Emulated;
use flashattn_core::testing::strided::{strided_inputs, Layout};
use flashattn_core::testing::{backend_or_skip, backward_tolerance, BackwardCase};
use flashattn_core::{
    random_inputs, reference_attention, reference_backward, rel_l2_error, AttentionSpec, Backend,
    BackwardInputs, DType, InputStrides, Strides, Tensor,
};
use flashattn_cuda::KernelKind;

fn emulated(kind: KernelKind) -> Option<Emulated> {
    backend_or_skip("cuda-emulate", || Emulated::new("sm_80", kind, 0))
}

/// Odd sizes: GQA and causal, head_dim 40 (16-byte copies when the strides allow), head_dim
/// 64 with a window, varlen (transposed varlen is `[heads, total, dim]`).
fn cases(dtype: DType) -> Vec<AttentionSpec> {
    let base = |b, h, sq, sk, d| {
        AttentionSpec::new(b, h, sq, sk, d)
            .dtype(dtype)
            .return_lse(true)
    };
    vec![
        base(2, 4, 17, 33, 40).heads_kv(2).causal(true),
        base(1, 2, 33, 17, 64).window(5, 3),
        base(2, 2, 33, 33, 40)
            .varlen(vec![0, 9, 33], vec![0, 20, 33])
            .causal(true),
    ]
}

/// q, k, v of `spec` (heads_q = heads_kv, head_dim_v = head_dim) in one packed qkv buffer
/// `[tokens, 3, heads, dim]` whose rows carry `pad` more elements, NaN like nothing else; the
/// spec reading it and each tensor's offset in the buffer.
fn packed_qkv(
    spec: &AttentionSpec,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    pad: usize,
) -> (AttentionSpec, Tensor, [usize; 3]) {
    let (h, d) = (spec.heads_q, spec.head_dim);
    assert_eq!((spec.heads_kv, spec.head_dim_v), (h, d));
    let tokens = q.len() / (h * d);
    assert_eq!(k.len(), q.len());
    let row = 3 * h * d + pad;
    let mut buf = vec![f32::NAN; tokens * row];
    for (part, t) in [q, k, v].into_iter().enumerate() {
        let vals = t.to_f32_vec();
        for tok in 0..tokens {
            let dst = tok * row + part * h * d;
            buf[dst..dst + h * d].copy_from_slice(&vals[tok * h * d..(tok + 1) * h * d]);
        }
    }
    // Dense: batch b starts seqlen rows on (seqlen_q = seqlen_k here); varlen: by token.
    let st = Strides::new(spec.seqlen_q * row, row, d);
    let strides = InputStrides {
        q: Some(st),
        k: Some(st),
        v: Some(st),
        ..Default::default()
    };
    let buf = Tensor::from_f32(spec.dtype, &buf);
    (spec.clone().strides(strides), buf, [0, h * d, 2 * h * d])
}

/// The strided forward equals the contiguous one bitwise and the reference within tolerance.
fn check_forward_equal(b: &Emulated, spec: &AttentionSpec, got: flashattn_core::Output, seed: u64) {
    let (q, k, v) = random_inputs(spec, seed);
    let plain = b.forward(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    assert!(
        got == plain,
        "{spec}: strided output or LSE differs from contiguous"
    );
    let want = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let err = rel_l2_error(&got.out.to_f32_vec(), &want.out);
    assert!(err <= spec.dtype.tolerance(), "{spec}: rel L2 {err:.2e}");
}

fn forward_transposed(kind: KernelKind, dtype: DType, seed: u64) {
    let Some(b) = emulated(kind) else {
        return;
    };
    for (i, spec) in cases(dtype).iter().enumerate() {
        let seed = seed + i as u64;
        let (q, k, v) = random_inputs(spec, seed);
        let s = strided_inputs(spec, (&q, &k, &v), None, Layout::Transposed);
        let got = b
            .forward(&s.spec, s.q.as_ref(), s.k.as_ref(), s.v.as_ref())
            .unwrap_or_else(|e| panic!("{spec} transposed: {e}"));
        check_forward_equal(&b, spec, got, seed);
    }
}

fn forward_packed(kind: KernelKind, dtype: DType, pad: usize, seed: u64) {
    let Some(b) = emulated(kind) else {
        return;
    };
    let cases = [
        AttentionSpec::new(2, 3, 17, 17, 40).causal(true),
        AttentionSpec::new(2, 2, 33, 33, 64).varlen(vec![0, 16, 33], vec![0, 16, 33]),
    ];
    for (i, spec) in cases.iter().enumerate() {
        let spec = &spec.clone().dtype(dtype).return_lse(true);
        let seed = seed + i as u64;
        let (q, k, v) = random_inputs(spec, seed);
        let (ps, buf, off) = packed_qkv(spec, (&q, &k, &v), pad);
        let r = buf.as_ref();
        let [pq, pk, pv] = off.map(|o| r.tail(o).unwrap());
        let got = b
            .forward(&ps, pq, pk, pv)
            .unwrap_or_else(|e| panic!("{spec} packed: {e}"));
        check_forward_equal(&b, spec, got, seed);
    }
}

#[test]
fn mma_forward_reads_a_transposed_view_bf16() {
    forward_transposed(KernelKind::Mma, DType::Bf16, 10);
}

#[test]
fn portable_forward_reads_a_transposed_view_f32() {
    forward_transposed(KernelKind::Generic, DType::F32, 20);
}

/// Row padding of 8 keeps 16-byte copies; strides off 8 elements are refused by name (the
/// portable kernel takes them, below).
#[test]
fn mma_forward_reads_packed_qkv_f16() {
    forward_packed(KernelKind::Mma, DType::F16, 8, 30);
    let Some(b) = emulated(KernelKind::Mma) else {
        return;
    };
    let spec = AttentionSpec::new(1, 2, 17, 17, 40).dtype(DType::F16);
    let (q, k, v) = random_inputs(&spec, 35);
    let (ps, buf, off) = packed_qkv(&spec, (&q, &k, &v), 4);
    let r = buf.as_ref();
    let [pq, pk, pv] = off.map(|o| r.tail(o).unwrap());
    let e = b.forward(&ps, pq, pk, pv).unwrap_err().to_string();
    assert!(
        e.contains("q's strides") && e.contains("multiples of 8"),
        "{e}"
    );
}

#[test]
fn portable_forward_reads_packed_qkv_f32() {
    forward_packed(KernelKind::Generic, DType::F32, 3, 40);
}

/// Transposed q, k, v, out and dout: gradients equal the contiguous run's bitwise and the
/// reference's within tolerance.
fn backward_transposed(kind: KernelKind, dtype: DType, seed: u64) {
    let Some(b) = emulated(kind) else {
        return;
    };
    for (i, spec) in cases(dtype).iter().enumerate() {
        let seed = seed + i as u64;
        let case = BackwardCase::new(&b, spec, seed).unwrap();
        let plain = b.backward(spec, case.inputs()).unwrap();
        let s = strided_inputs(
            spec,
            (&case.q, &case.k, &case.v),
            Some((&case.out, &case.dout)),
            Layout::Transposed,
        );
        let (out, dout) = (s.out.as_ref().unwrap(), s.dout.as_ref().unwrap());
        let inputs = BackwardInputs::of((&s.q, &s.k, &s.v), out, &case.lse, dout);
        let got = b
            .backward(&s.spec, inputs)
            .unwrap_or_else(|e| panic!("{spec} transposed: {e}"));
        assert!(
            got == plain,
            "{spec}: strided gradients differ from contiguous"
        );
        let (q, k, v, d) = (&case.q, &case.k, &case.v, &case.dout);
        let want =
            reference_backward(spec, q.as_ref(), k.as_ref(), v.as_ref(), d.as_ref()).unwrap();
        let tol = backward_tolerance(dtype);
        for (name, g, w) in [
            ("dq", &got.dq, &want.dq),
            ("dk", &got.dk, &want.dk),
            ("dv", &got.dv, &want.dv),
        ] {
            let err = rel_l2_error(&g.to_f32_vec(), w);
            assert!(err <= tol, "{spec}: {name} rel L2 {err:.2e}");
        }
    }
}

#[test]
fn mma_backward_reads_transposed_views_bf16() {
    backward_transposed(KernelKind::Mma, DType::Bf16, 50);
}

#[test]
fn portable_backward_reads_transposed_views_f32() {
    backward_transposed(KernelKind::Generic, DType::F32, 60);
}
