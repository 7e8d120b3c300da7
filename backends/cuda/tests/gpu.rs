//! On an NVIDIA GPU: the CUDA backend against the f64 reference through core's test kit, for
//! each kernel family the GPU runs: the automatic choice, then each family forced (Hopper
//! wgmma on sm_90a, its FP8 build there, mma.sync on sm_80+, the portable kernel everywhere) on core's feature
//! cases, shapes that cross the kernels' block and pipeline boundaries, long key sequences,
//! NaN inputs, core's random specs, and the device-resident API. Without a GPU every test
//! prints why it skips, unless FLASHATTN_REQUIRE_BACKENDS names cuda.

mod common;

use common::{check_nan, gpu_backend, long_cases, mma_cases, named, nan_spec, pipeline_cases, run};
use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::testing::{check_backend, feature_cases};
use flashattn_core::{AttentionSpec, Backend, DType, Error, ForwardInputs, Fp8Descale, Pass};
use flashattn_cuda::{CudaBackend, KernelKind};
use proptest::prelude::*;

/// The backend on device 0 with `kind` forced (`None`: automatic), or `None` after printing
/// why: no GPU, or this GPU cannot run that kernel family.
fn backend(kind: Option<KernelKind>) -> Option<CudaBackend> {
    gpu_backend(kind, Pass::Forward)
}

#[test]
fn automatic_choice_feature_cases() {
    let Some(b) = backend(None) else { return };
    for (i, dtype) in [DType::Bf16, DType::F16, DType::F32]
        .into_iter()
        .enumerate()
    {
        run(
            &b,
            &format!("auto {dtype}"),
            &named(feature_cases(dtype)),
            1000 + 100 * i as u64,
        );
    }
    run(&b, "auto long bf16", &long_cases(DType::Bf16, 128), 1400);
}

#[test]
fn mma_kernel_cases() {
    let Some(b) = backend(Some(KernelKind::Mma)) else {
        return;
    };
    for (i, dtype) in [DType::Bf16, DType::F16].into_iter().enumerate() {
        let s = 2000 + 1000 * i as u64;
        run(
            &b,
            &format!("mma {dtype} features"),
            &named(feature_cases(dtype)),
            s,
        );
        run(
            &b,
            &format!("mma {dtype} shapes"),
            &mma_cases(dtype),
            s + 100,
        );
        let dims = [64, 96, 128, 256];
        run(
            &b,
            &format!("mma {dtype} pipeline"),
            &pipeline_cases(dtype, &dims),
            s + 200,
        );
        for d in [64, 96, 200] {
            run(
                &b,
                &format!("mma {dtype} long d{d}"),
                &long_cases(dtype, d),
                s + 300 + d as u64,
            );
        }
    }
}

#[test]
fn hopper_kernel_cases() {
    let Some(b) = backend(Some(KernelKind::Hopper)) else {
        return;
    };
    for (i, dtype) in [DType::Bf16, DType::F16].into_iter().enumerate() {
        let s = 4000 + 1000 * i as u64;
        run(
            &b,
            &format!("hopper {dtype} pipeline"),
            &pipeline_cases(dtype, &[64, 128, 256]),
            s,
        );
        run(
            &b,
            &format!("hopper {dtype} long"),
            &long_cases(dtype, 128),
            s + 500,
        );
    }
}

/// `pipeline_cases` the FP8 build takes: no softcap or ALiBi at head_dim 256.
fn fp8_cases(d: usize) -> Vec<(String, AttentionSpec)> {
    let mut v = pipeline_cases(DType::Fp8E4m3, &[d]);
    v.retain(|(_, s)| d != 256 || (s.softcap == 0.0 && s.alibi.is_none()));
    v
}

/// The FP8 e4m3 build (never run on a GPU before this test): every feature at head_dim 128
/// (256 without score mods), long key sequences, descales per (batch, KV head), other tiles.
#[test]
fn hopper_fp8_cases() {
    let Some(b) = backend(Some(KernelKind::HopperFp8)) else {
        return;
    };
    let fp8 = DType::Fp8E4m3;
    let mut cases = fp8_cases(128);
    cases.extend(fp8_cases(256));
    run(&b, "hopper fp8 pipeline", &cases, 8000);
    run(&b, "hopper fp8 long", &long_cases(fp8, 256), 8100);
    // Descales [batch, heads_kv]: every (batch, KV head) its own, far from 1.
    let d = |n: usize, x: f32| (0..n).map(|i| x * (1.0 + i as f32)).collect::<Vec<_>>();
    let scaled = |spec: AttentionSpec| {
        let n = spec.batch * spec.heads_kv;
        spec.fp8_descale(Fp8Descale {
            q: d(n, 0.05),
            k: d(n, 0.02),
            v: d(n, 3.0),
        })
    };
    let base = |d| {
        AttentionSpec::new(2, 8, 300, 700, d)
            .dtype(fp8)
            .heads_kv(2)
            .return_lse(true)
    };
    let cases = named(vec![
        ("d128 descales", scaled(base(128))),
        ("d256 descales causal", scaled(base(256).causal(true))),
        ("d128 descales softcap", scaled(base(128).softcap(5.0))),
    ]);
    run(&b, "hopper fp8 descales", &cases, 8200);
    for (d, n, st) in [(128, 256, 2), (128, 128, 4), (256, 128, 3)] {
        let Some(mut b) = backend(Some(KernelKind::HopperFp8)) else {
            return;
        };
        b.set_block_n(Some(n));
        b.set_stages(Some(st));
        let what = format!("hopper fp8 d{d} block_n {n} stages {st}");
        run(&b, &what, &fp8_cases(d), 8300);
    }
}

#[test]
fn hopper_block_n_variants() {
    let Some(_) = backend(Some(KernelKind::Hopper)) else {
        return;
    };
    for (d, n, st) in [(64, 176, 3), (128, 128, 2), (128, 128, 3), (256, 64, 2)] {
        let Some(mut b) = backend(Some(KernelKind::Hopper)) else {
            return;
        };
        b.set_block_n(Some(n));
        b.set_stages(Some(st));
        let cases = pipeline_cases(DType::Bf16, &[d]);
        run(
            &b,
            &format!("hopper d{d} block_n {n} stages {st}"),
            &cases,
            6000 + d as u64,
        );
    }
}

#[test]
fn portable_kernel_cases() {
    let Some(b) = backend(Some(KernelKind::Generic)) else {
        return;
    };
    run(&b, "generic f32", &named(feature_cases(DType::F32)), 7000);
    run(&b, "generic bf16", &named(feature_cases(DType::Bf16)), 7100);
    let cases: Vec<_> = pipeline_cases(DType::F16, &[64, 128])
        .into_iter()
        .step_by(3)
        .collect();
    run(&b, "generic f16 pipeline", &cases, 7200);
    run(&b, "generic f32 long", &long_cases(DType::F32, 64), 7300);
}

/// NaN in one key or one query row reaches exactly the rows that see it. The Hopper kernel
/// writes LSE -inf for such rows (it tests l > 0; its source stays as validated on the H100),
/// so only its output is held to NaN.
#[test]
fn nan_reaches_exactly_the_rows_that_see_it() {
    for (kind, dtype) in [
        (KernelKind::Mma, DType::Bf16),
        (KernelKind::Generic, DType::F32),
        (KernelKind::Hopper, DType::Bf16),
        (KernelKind::HopperFp8, DType::Fp8E4m3),
    ] {
        let Some(b) = backend(Some(kind)) else {
            continue;
        };
        let mut spec = nan_spec(dtype);
        let hopper = matches!(kind, KernelKind::Hopper | KernelKind::HopperFp8);
        if hopper {
            spec.head_dim = 128;
            spec.head_dim_v = 128;
        }
        for nan_in_q in [false, true] {
            check_nan(&b, &spec, nan_in_q, !hopper).unwrap_or_else(|e| {
                panic!(
                    "{kind:?} {dtype}, NaN in {}: {e}",
                    if nan_in_q { "q" } else { "k" }
                )
            });
        }
    }
}

#[test]
fn kernel_choice_and_variant_names() {
    let Some(b) = backend(None) else { return };
    let bf16 = |d| AttentionSpec::new(1, 1, 8, 8, d).dtype(DType::Bf16);
    let name = b.kernel_variant(&bf16(128), Pass::Forward);
    let kind = b.variant_for(&bf16(128)).unwrap().kind;
    let (major, _) = b.info().compute_capability;
    let expected = match b.info().arch().as_str() {
        "sm_90a" => KernelKind::Hopper,
        _ if major >= 8 => KernelKind::Mma,
        _ => KernelKind::Generic,
    };
    assert_eq!(kind, expected, "{name}");
    assert!(name.starts_with("cuda/forward/"), "{name}");
    // Each forced family names its own variant, so the canary checks each separately.
    let mut names = std::collections::HashSet::new();
    for k in [KernelKind::Hopper, KernelKind::Mma, KernelKind::Generic] {
        let mut b = CudaBackend::new().unwrap();
        b.force_kernel(Some(k));
        if b.supports(&bf16(128)).is_ok() {
            assert!(names.insert(b.kernel_variant(&bf16(128), Pass::Forward)));
        }
    }
    assert_eq!(
        b.variant_for(&bf16(72)).unwrap().kind,
        if major >= 8 {
            KernelKind::Mma
        } else {
            KernelKind::Generic
        }
    );
    // fp8 runs the FP8 Hopper build on sm_90a; elsewhere it is refused with a reason.
    let fp8 = AttentionSpec::new(1, 1, 8, 8, 128).dtype(DType::Fp8E4m3);
    match b.info().arch().as_str() {
        "sm_90a" => assert_eq!(b.variant_for(&fp8).unwrap().kind, KernelKind::HopperFp8),
        _ => assert!(b.supports(&fp8).is_err()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    /// Core's random specs (every head dim, GQA, masks, softcap, ALiBi, varlen), automatic choice.
    #[test]
    fn random_specs(
        spec in specs(SpecSpace { max_seqlen: 600, ..SpecSpace::new(&[DType::Bf16, DType::F16, DType::F32]) }),
        seed in any::<u64>(),
    ) {
        let Some(b) = backend(None) else { return Ok(()) };
        if let Err(e) = check_backend(&b, &spec, seed) {
            prop_assert!(false, "{}", e);
        }
    }

    /// The same on the mma.sync kernel, forced.
    #[test]
    fn random_specs_mma(
        spec in specs(SpecSpace { max_seqlen: 600, ..SpecSpace::new(&[DType::Bf16, DType::F16]) }),
        seed in any::<u64>(),
    ) {
        let Some(b) = backend(Some(KernelKind::Mma)) else { return Ok(()) };
        if let Err(e) = check_backend(&b, &spec, seed) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// The device-resident API on buffers this test allocates itself in the primary context.
#[test]
fn forward_device_on_caller_buffers() {
    use flashattn_core::{lse_max_error, random_inputs, reference_attention, rel_l2_error, Tensor};
    use flashattn_cuda::DeviceTensors;
    let Some(b) = backend(None) else { return };
    let mem = common::device::DeviceMem::new();
    let upload = |bytes: &[u8]| mem.upload(bytes);
    let download = |p: u64, n: usize| mem.download(p, n);
    let specs = [
        AttentionSpec::new(2, 8, 300, 517, 128)
            .heads_kv(2)
            .dtype(DType::Bf16)
            .causal(true)
            .return_lse(true),
        AttentionSpec::new(1, 3, 70, 90, 72)
            .varlen(vec![0, 30, 70], vec![0, 50, 90])
            .window(20, 5)
            .return_lse(true),
        AttentionSpec::new(1, 4, 64, 64, 96).dtype(DType::F16),
    ];
    for (i, spec) in specs.iter().enumerate() {
        let (q, k, v) = random_inputs(spec, 77 + i as u64);
        let out_bytes = spec.out_elems().unwrap() * spec.dtype.output().size_bytes();
        let lse_n = spec.lse_elems().unwrap();
        let tensors = DeviceTensors {
            q: upload(q.as_ref().as_bytes()),
            k: upload(k.as_ref().as_bytes()),
            v: upload(v.as_ref().as_bytes()),
            out: upload(&vec![0u8; out_bytes]),
            lse: spec
                .return_lse
                .then(|| upload(bytemuck::cast_slice(&vec![f32::NEG_INFINITY; lse_n]))),
        };
        // SAFETY: every pointer holds its tensor's bytes for `spec`, freshly allocated above.
        unsafe { b.forward_device(spec, &tensors) }.unwrap();
        let out =
            Tensor::from_bytes(spec.dtype.output(), &download(tensors.out, out_bytes)).unwrap();
        let r = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
        let err = rel_l2_error(&out.to_f32_vec(), &r.out);
        assert!(err < spec.dtype.tolerance(), "{spec}: rel L2 {err}");
        if let Some(p) = tensors.lse {
            let lse: Vec<f32> = bytemuck::pod_collect_to_vec(&download(p, lse_n * 4));
            let e = lse_max_error(&lse, &r.lse);
            assert!(e < 1e-3, "{spec}: lse error {e}");
        }
        println!("ok   forward_device {spec}: rel_l2 {err:.2e}");
        // Bad calls are refused before any launch.
        let misaligned = DeviceTensors {
            q: tensors.q + 2,
            ..tensors
        };
        let e = unsafe { b.forward_device(spec, &misaligned) }.unwrap_err();
        assert!(e.to_string().contains("16-byte aligned"), "{e}");
        let flipped = DeviceTensors {
            lse: if tensors.lse.is_some() {
                None
            } else {
                Some(tensors.out)
            },
            ..tensors
        };
        let e = unsafe { b.forward_device(spec, &flipped) }.unwrap_err();
        assert!(e.to_string().contains("lse"), "{e}");
    }
}

/// `for_device` takes the CUDA runtime's ordinals: an ordinal past the devices the driver sees
/// is an error naming it (without a driver: `Unavailable`, checked first), and on a GPU
/// `for_device(0)` is the device `new()` opens.
#[test]
fn for_device_names_an_ordinal_past_the_devices() {
    let ordinal = 1 << 20;
    match CudaBackend::for_device(ordinal) {
        Err(Error::Unavailable { reason, .. }) => eprintln!("SKIP the GPU half: {reason}"),
        Err(Error::InvalidArgument { value, .. }) => {
            assert_eq!(value, ordinal.to_string());
            let b = CudaBackend::for_device(0).expect("device 0");
            let spec = AttentionSpec::new(1, 2, 17, 33, 64).dtype(DType::Bf16);
            check_backend(&b, &spec, 9).expect("device 0 through for_device");
        }
        Err(e) => panic!("for_device({ordinal}): unexpected error {e:?}"),
        Ok(_) => panic!("for_device({ordinal}) opened a device"),
    }
}

/// Strided inputs on the GPU: a transposed `[b, h, s, d]` view gives the automatic choice's
/// output bit for bit as the contiguous inputs (the Hopper kernel refuses strided inputs, so
/// both run the kernel that takes them: forced here by choosing on the strided spec).
#[test]
fn strided_views_equal_contiguous() {
    use flashattn_core::testing::strided::{strided_inputs, Layout};
    use flashattn_core::{random_inputs, reference_attention, rel_l2_error};
    let Some(mut b) = backend(None) else { return };
    let spec = AttentionSpec::new(2, 4, 129, 300, 128)
        .heads_kv(2)
        .dtype(DType::Bf16)
        .causal(true)
        .return_lse(true);
    let (q, k, v) = random_inputs(&spec, 5);
    let s = strided_inputs(&spec, (&q, &k, &v), None, Layout::Transposed);
    let kind = b.variant_for(&s.spec).unwrap().kind;
    b.force_kernel(Some(kind));
    let plain = b.forward(&spec, ForwardInputs::of(&q, &k, &v)).unwrap();
    let got = b
        .forward(&s.spec, ForwardInputs::of(&s.q, &s.k, &s.v))
        .unwrap();
    assert!(got == plain, "{spec} on {kind:?}: strided output differs");
    let want = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let err = rel_l2_error(&got.out.to_f32_vec(), &want.out);
    assert!(err < spec.dtype.tolerance(), "{spec}: rel L2 {err}");
}

/// `set_stream`: the host and device-resident calls on a caller's non-blocking stream (which
/// does not wait for the legacy default stream: the uploads must be ordered before the kernels
/// by the backend) give the reference's results, varlen and ALiBi side tables included.
#[test]
fn calls_on_a_callers_non_blocking_stream() {
    use cudarc::driver::result as drv;
    use flashattn_core::{random_inputs, reference_attention, rel_l2_error, Tensor};
    use flashattn_cuda::DeviceTensors;
    let Some(mut b) = backend(None) else { return };
    let mem = common::device::DeviceMem::new();
    let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).unwrap();
    // SAFETY: a live stream of device 0's primary context, destroyed after the last call.
    unsafe { b.set_stream(stream) };
    assert_eq!(b.stream(), stream);
    let spec = AttentionSpec::new(2, 4, 90, 90, 64)
        .dtype(DType::Bf16)
        .varlen(vec![0, 33, 90], vec![0, 40, 90])
        .alibi(vec![0.5, 0.25, 0.125, 0.0625], false)
        .causal(true);
    check_backend(&b, &spec, 31).expect("host path on the caller's stream");
    let (q, k, v) = random_inputs(&spec, 32);
    let out_bytes = spec.out_elems().unwrap() * 2;
    let t = DeviceTensors {
        q: mem.upload(q.as_ref().as_bytes()),
        k: mem.upload(k.as_ref().as_bytes()),
        v: mem.upload(v.as_ref().as_bytes()),
        out: mem.upload(&vec![0u8; out_bytes]),
        lse: None,
    };
    // SAFETY: every pointer holds its tensor's bytes for `spec`.
    unsafe { b.forward_device(&spec, &t) }.unwrap();
    let out = Tensor::from_bytes(DType::Bf16, &mem.download(t.out, out_bytes)).unwrap();
    let want = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let err = rel_l2_error(&out.to_f32_vec(), &want.out);
    assert!(err < DType::Bf16.tolerance(), "{spec}: rel L2 {err}");
    unsafe { b.set_stream(std::ptr::null_mut()) };
    // SAFETY: created above; nothing is queued on it any more (every call synchronised it).
    unsafe { drv::stream::destroy(stream) }.unwrap();
}
