//! Without a GPU: strided inputs through the CUDA kernels' real source on the CPU emulator
//! (tests/emulator/emu.h). A transposed `[b, h, s, d]` view and a packed `[b, s, 3 h, d]`
//! qkv buffer (rows padded, the padding NaN) give the same out, LSE and gradients, bit for bit,
//! as the same problem contiguous (the same kernel binary reads both), and match the f64
//! reference. Elements outside a view are NaN, so a read outside it shows up as NaN.
//! Small odd sizes: the emulator runs every CUDA thread as a fiber.

mod common;

use common::emulated::Emulated;
use flashattn_core::testing::backend_or_skip;
use flashattn_core::testing::strided::{check_backward, check_forward, Layout, Packed};
use flashattn_core::{random_inputs, AttentionSpec, Backend, DType};
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

fn forward_transposed(kind: KernelKind, dtype: DType, seed: u64) {
    let Some(b) = emulated(kind) else {
        return;
    };
    for (i, spec) in cases(dtype).iter().enumerate() {
        check_forward(&b, spec, &[Layout::Transposed], seed + i as u64);
    }
}

/// A packed qkv buffer gives the contiguous output bitwise (which matches the reference).
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
        let ((q, k, v), plain) = check_forward(&b, spec, &[], seed + i as u64);
        let p = Packed::new(spec, (&q, &k, &v), pad);
        let got = b
            .forward(&p.spec, p.inputs())
            .unwrap_or_else(|e| panic!("{spec} packed: {e}"));
        assert!(
            got == plain,
            "{spec}: strided output or LSE differs from contiguous"
        );
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
    let p = Packed::new(&spec, (&q, &k, &v), 4);
    let e = b.forward(&p.spec, p.inputs()).unwrap_err().to_string();
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
        check_backward(&b, spec, &[Layout::Transposed], seed + i as u64);
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
