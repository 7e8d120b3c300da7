//! On an NVIDIA GPU: the CUDA backend against the f64 reference, the same cases as every
//! backend (core::testing::feature_cases) plus larger and random shapes that exercise the
//! Hopper kernel's pipeline (many key blocks, several tiles per block, GQA, varlen, masks).
//! Without a GPU the tests print why they skip, unless FLASHATTN_REQUIRE_BACKENDS names cuda.

use flashattn_core::testing::{backend_required, check_backend, feature_cases};
use flashattn_core::{AttentionSpec, Backend, DType};
use flashattn_cuda::{CudaBackend, KernelKind};
use proptest::prelude::*;
use std::sync::OnceLock;

fn backend() -> Option<&'static CudaBackend> {
    static B: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    match B.get_or_init(|| CudaBackend::new().map_err(|e| e.to_string())) {
        Ok(b) => Some(b),
        Err(e) => {
            if backend_required("cuda") {
                panic!("cuda is required (FLASHATTN_REQUIRE_BACKENDS) but unavailable: {e}");
            }
            eprintln!("SKIP: {e}");
            None
        }
    }
}

fn generic_backend() -> Option<&'static CudaBackend> {
    static B: OnceLock<Option<CudaBackend>> = OnceLock::new();
    B.get_or_init(|| {
        backend()?;
        let mut b = CudaBackend::new().ok()?;
        b.force_kernel(Some(KernelKind::Generic));
        Some(b)
    })
    .as_ref()
}

fn run_cases(b: &CudaBackend, cases: &[(String, AttentionSpec)]) {
    let mut failures = Vec::new();
    for (i, (name, spec)) in cases.iter().enumerate() {
        let kernel = b
            .variant_for(spec)
            .map(|v| v.name())
            .unwrap_or_else(|e| e.to_string());
        match check_backend(b, spec, 1000 + i as u64) {
            Ok(r) => println!(
                "ok   {name:34} {kernel:22} rel_l2 {:.2e} lse {:?}",
                r.rel_l2, r.lse_max_abs
            ),
            Err(e) => failures.push(format!("{name} [{kernel}]: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn named(cases: Vec<(&'static str, AttentionSpec)>) -> Vec<(String, AttentionSpec)> {
    cases.into_iter().map(|(n, s)| (n.to_string(), s)).collect()
}

/// Shapes that cross block, stage and tile boundaries of the Hopper kernel.
fn hopper_cases(dtype: DType) -> Vec<(String, AttentionSpec)> {
    let mut v = Vec::new();
    for d in [64, 128, 256] {
        let base = |b, h, sq, sk| {
            AttentionSpec::new(b, h, sq, sk, d)
                .dtype(dtype)
                .return_lse(true)
        };
        v.push((format!("d{d} many blocks"), base(2, 3, 300, 700)));
        v.push((format!("d{d} causal"), base(1, 2, 513, 513).causal(true)));
        v.push((
            format!("d{d} causal sq<sk"),
            base(1, 2, 130, 400).causal(true),
        ));
        v.push((format!("d{d} window"), base(1, 2, 400, 400).window(100, 37)));
        v.push((format!("d{d} gqa"), base(2, 8, 200, 333).heads_kv(2)));
        v.push((format!("d{d} softcap"), base(1, 2, 200, 260).softcap(8.0)));
        v.push((
            format!("d{d} alibi causal"),
            base(1, 2, 260, 260)
                .causal(true)
                .alibi(vec![0.1, 0.03], false),
        ));
        v.push((
            format!("d{d} varlen"),
            base(1, 4, 700, 900)
                .heads_kv(2)
                .varlen(vec![0, 5, 300, 700], vec![0, 128, 129, 900]),
        ));
        v.push((
            format!("d{d} varlen causal empty seq"),
            base(1, 2, 400, 500)
                .varlen(vec![0, 0, 200, 400], vec![0, 100, 100, 500])
                .causal(true),
        ));
        // More tiles than SMs: the persistent loop and the Q reuse barrier.
        v.push((format!("d{d} many tiles"), base(4, 40, 256, 128)));
    }
    v
}

#[test]
fn feature_cases_bf16_f16_f32() {
    let Some(b) = backend() else { return };
    for dtype in [DType::Bf16, DType::F16, DType::F32] {
        println!("== {dtype} on {}", b.device());
        run_cases(b, &named(feature_cases(dtype)));
    }
}

#[test]
fn hopper_pipeline_cases() {
    let Some(b) = backend() else { return };
    for dtype in [DType::Bf16, DType::F16] {
        run_cases(b, &hopper_cases(dtype));
    }
}

#[test]
fn generic_kernel_on_the_same_cases() {
    let Some(b) = generic_backend() else { return };
    let mut cases = named(feature_cases(DType::Bf16));
    cases.extend(hopper_cases(DType::F16).into_iter().step_by(3));
    run_cases(b, &cases);
}

#[test]
fn hopper_block_n_variants() {
    let Some(b) = backend() else { return };
    if b.info().arch() != "sm_90a" {
        return;
    }
    for (d, n, st) in [(64, 176, 3), (128, 128, 2), (128, 128, 3), (256, 64, 2)] {
        let mut be = CudaBackend::new().unwrap();
        be.set_block_n(Some(n));
        be.set_stages(Some(st));
        let cases: Vec<_> = hopper_cases(DType::Bf16)
            .into_iter()
            .filter(|(name, _)| name.starts_with(&format!("d{d} ")))
            .collect();
        println!("== d={d} block_n={n} stages={st}");
        run_cases(&be, &cases);
    }
}

#[test]
fn hopper_kernel_is_chosen_on_hopper() {
    let Some(b) = backend() else { return };
    let spec = AttentionSpec::new(1, 1, 8, 8, 128).dtype(DType::Bf16);
    let v = b.variant_for(&spec).unwrap();
    if b.info().arch() == "sm_90a" {
        assert_eq!(v.kind, KernelKind::Hopper);
    } else {
        assert_eq!(v.kind, KernelKind::Generic);
    }
    // fp8 is refused with a reason, not a panic.
    let fp8 = AttentionSpec::new(1, 1, 8, 8, 128).dtype(DType::Fp8E4m3);
    assert!(b.supports(&fp8).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_specs(
        d in prop::sample::select(vec![40usize, 64, 72, 128, 200, 256]),
        bf16 in any::<bool>(),
        b in 1usize..3, hkv in 1usize..3, group in 1usize..3,
        sq in prop::sample::select(vec![1usize, 17, 129, 200, 385]),
        sk in prop::sample::select(vec![1usize, 17, 129, 300, 517]),
        causal in any::<bool>(),
        left in -1i64..200, right in -1i64..50,
        softcap in prop::sample::select(vec![0.0f32, 0.0, 6.0]),
        seed in any::<u64>(),
    ) {
        let Some(be) = backend() else { return Ok(()) };
        let dtype = if bf16 { DType::Bf16 } else { DType::F16 };
        let spec = AttentionSpec::new(b, hkv * group, sq, sk, d).heads_kv(hkv).dtype(dtype)
            .causal(causal).window(left, right).softcap(softcap).return_lse(true);
        if let Err(e) = check_backend(be, &spec, seed) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// The device-resident API on buffers this test allocates itself in the primary context.
#[test]
fn forward_device_on_caller_buffers() {
    use cudarc::driver::result as drv;
    use flashattn_core::{lse_max_error, random_inputs, reference_attention, rel_l2_error, Tensor};
    use flashattn_cuda::DeviceTensors;
    let Some(b) = backend() else { return };
    let dev = drv::device::get(0).unwrap();
    // SAFETY: device 0 exists (the backend opened it); retaining the primary context is
    // what the CUDA runtime does too.
    let ctx = unsafe { drv::primary_ctx::retain(dev) }.unwrap();
    unsafe { drv::ctx::set_current(ctx) }.unwrap();
    let upload = |bytes: &[u8]| -> u64 {
        let p = unsafe { drv::malloc_sync(bytes.len().max(16)) }.unwrap();
        unsafe { drv::memcpy_htod_sync(p, bytes) }.unwrap();
        p
    };
    let download = |p: u64, n: usize| -> Vec<u8> {
        let mut v = vec![0u8; n];
        unsafe { drv::memcpy_dtoh_sync(&mut v, p) }.unwrap();
        v
    };
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
        AttentionSpec::new(1, 4, 64, 64, 64).dtype(DType::F16),
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
        for p in [tensors.q, tensors.k, tensors.v, tensors.out]
            .into_iter()
            .chain(tensors.lse)
        {
            unsafe { drv::free_sync(p) }.unwrap();
        }
    }
    // SAFETY: retained above.
    unsafe { drv::primary_ctx::release(dev) }.unwrap();
}
