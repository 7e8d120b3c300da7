//! On an NVIDIA GPU: the CUDA backward (kernels/mma_bwd.cu, kernels/generic_bwd.cu) against
//! core's f64 `reference_backward`, per family (the automatic choice, mma.sync forced, the
//! portable kernel forced), dq by f32 atomics and by the deterministic pass: core's feature
//! cases, odd head dims and every bucket, the forward's pipeline shapes (many key and query
//! blocks, masks that cut blocks, GQA, varlen with empty sequences), long key sequences,
//! bitwise reproducibility of the deterministic mode, and the device-resident API.
//! Without a GPU every test prints why it skips, unless FLASHATTN_REQUIRE_BACKENDS names cuda.

mod common;

use common::{
    deterministic, gpu_backend, long_cases, mma_cases, named, pipeline_cases, run_backward,
};
use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::testing::{check_backward, feature_cases, BackwardCase};
use flashattn_core::{AttentionSpec, Backend, DType, Pass, Tensor};
use flashattn_cuda::{BackwardTensors, CudaBackend, KernelKind};
use proptest::prelude::*;

/// The backend on device 0 with `kind` forced (`None`: automatic), or `None` after printing
/// why: no GPU, or this GPU has no backward of that family.
fn backend(kind: Option<KernelKind>) -> Option<CudaBackend> {
    gpu_backend(kind, Pass::Backward)
}

#[test]
fn automatic_choice_backward() {
    let Some(b) = backend(None) else { return };
    for (i, dtype) in [DType::Bf16, DType::F16, DType::F32]
        .into_iter()
        .enumerate()
    {
        let cases = named(feature_cases(dtype));
        let s = 10_000 + 100 * i as u64;
        run_backward(&b, &format!("auto {dtype} backward"), &cases, s);
        let det = deterministic(cases);
        run_backward(&b, &format!("auto {dtype} deterministic"), &det, s + 50);
    }
}

#[test]
fn mma_backward_cases() {
    let Some(b) = backend(Some(KernelKind::Mma)) else {
        return;
    };
    for (i, dtype) in [DType::Bf16, DType::F16].into_iter().enumerate() {
        let s = 11_000 + 1000 * i as u64;
        let shapes = mma_cases(dtype);
        run_backward(&b, &format!("mma {dtype} shapes"), &shapes, s);
        let det = deterministic(shapes);
        run_backward(&b, &format!("mma {dtype} shapes det"), &det, s + 100);
        let blocks = pipeline_cases(dtype, &[64, 128, 256]);
        run_backward(&b, &format!("mma {dtype} pipeline"), &blocks, s + 200);
        let det = deterministic(pipeline_cases(dtype, &[128]));
        run_backward(&b, &format!("mma {dtype} pipeline det"), &det, s + 300);
    }
    // Long cases cost seconds each in the f64 reference: d128 with atomics, d64 deterministic.
    run_backward(&b, "mma long d128", &long_cases(DType::Bf16, 128), 13_000);
    let det = deterministic(long_cases(DType::Bf16, 64));
    run_backward(&b, "mma long d64 det", &det, 13_500);
}

#[test]
fn portable_backward_cases() {
    let Some(b) = backend(Some(KernelKind::Generic)) else {
        return;
    };
    let f32 = named(feature_cases(DType::F32));
    run_backward(&b, "generic f32", &f32, 14_000);
    run_backward(&b, "generic f32 det", &deterministic(f32), 14_100);
    run_backward(
        &b,
        "generic bf16",
        &named(feature_cases(DType::Bf16)),
        14_200,
    );
    run_backward(
        &b,
        "generic f32 blocks",
        &pipeline_cases(DType::F32, &[72]),
        14_300,
    );
    run_backward(&b, "generic f32 long", &long_cases(DType::F32, 64), 14_400);
}

/// dq, dk, dv of the host path on `case`, as bytes.
fn grads(b: &CudaBackend, spec: &AttentionSpec, case: &BackwardCase) -> [Vec<u8>; 3] {
    let g = b.backward(spec, case.inputs()).unwrap();
    [g.dq, g.dk, g.dv].map(|t| t.as_ref().as_bytes().to_vec())
}

/// Deterministic mode gives the same bits on every run (atomic dq need not).
#[test]
fn deterministic_backward_is_bitwise_reproducible() {
    let Some(b) = backend(None) else { return };
    for dtype in [DType::Bf16, DType::F32] {
        let spec = AttentionSpec::new(2, 8, 700, 900, 128)
            .heads_kv(2)
            .dtype(dtype)
            .causal(true)
            .return_lse(true)
            .deterministic(true);
        let problem = BackwardCase::new(&b, &spec, 5).unwrap();
        let first = grads(&b, &spec, &problem);
        for _ in 0..3 {
            assert!(
                grads(&b, &spec, &problem) == first,
                "{dtype}: deterministic backward differs between runs"
            );
        }
    }
}

#[test]
fn backward_variant_names() {
    let Some(b) = backend(None) else { return };
    let spec = AttentionSpec::new(1, 1, 8, 8, 128).dtype(DType::Bf16);
    let name = b.kernel_variant(&spec, Pass::Backward);
    let det = b.kernel_variant(&spec.clone().deterministic(true), Pass::Backward);
    assert!(
        name.starts_with("cuda/backward/mma_bwd_bf16_d128"),
        "{name}"
    );
    assert_eq!(det, format!("{name}_det"));
    let f32 = b.kernel_variant(&spec.dtype(DType::F32), Pass::Backward);
    assert!(f32.starts_with("cuda/backward/generic_bwd_f32"), "{f32}");
    let fp8 = AttentionSpec::new(1, 1, 8, 8, 128).dtype(DType::Fp8E4m3);
    assert!(b.supports_backward(&fp8).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    /// Core's random specs (every head dim, GQA, masks, softcap, ALiBi, varlen), automatic choice.
    #[test]
    fn random_specs_backward(
        spec in specs(SpecSpace { max_seqlen: 400, ..SpecSpace::new(&[DType::Bf16, DType::F16, DType::F32]) }),
        seed in any::<u64>(),
        det in any::<bool>(),
    ) {
        let Some(b) = backend(None) else { return Ok(()) };
        if let Err(e) = check_backward(&b, &spec.deterministic(det), seed) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// The device-resident backward on buffers this test allocates in the primary context gives
/// the host path's bits (deterministic mode: the same kernels on the same inputs); bad
/// pointers are refused before any launch.
#[test]
fn backward_device_on_caller_buffers() {
    let Some(b) = backend(None) else { return };
    let mem = common::device::DeviceMem::new();
    let spec = AttentionSpec::new(2, 8, 300, 517, 72)
        .heads_kv(2)
        .head_dim_v(64)
        .dtype(DType::Bf16)
        .causal(true)
        .return_lse(true)
        .deterministic(true);
    let p = BackwardCase::new(&b, &spec, 21).unwrap();
    let host = grads(&b, &spec, &p);
    let up = |t: &Tensor| mem.upload(t.as_ref().as_bytes());
    let zeros = |g: &Vec<u8>| mem.upload(&vec![0u8; g.len()]);
    let t = BackwardTensors {
        q: up(&p.q),
        k: up(&p.k),
        v: up(&p.v),
        out: up(&p.out),
        lse: mem.upload(bytemuck::cast_slice(&p.lse)),
        dout: up(&p.dout),
        dq: zeros(&host[0]),
        dk: zeros(&host[1]),
        dv: zeros(&host[2]),
    };
    // SAFETY: every pointer holds its tensor's bytes for `spec`, freshly allocated above.
    unsafe { b.backward_device(&spec, &t) }.unwrap();
    for (name, ptr, want) in [
        ("dq", t.dq, &host[0]),
        ("dk", t.dk, &host[1]),
        ("dv", t.dv, &host[2]),
    ] {
        assert!(
            mem.download(ptr, want.len()) == *want,
            "{name} differs from the host path"
        );
    }
    let misaligned = BackwardTensors { dk: t.dk + 2, ..t };
    let e = unsafe { b.backward_device(&spec, &misaligned) }.unwrap_err();
    assert!(e.to_string().contains("dk"), "{e}");
}
