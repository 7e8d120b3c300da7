//! On an NVIDIA GPU: decode against a KV cache. `Backend::decode` (host slices) on core's
//! decode cases for every dtype and both kernel families, a 70000-row cache; the
//! device-resident handle (`Backend::kv_cache`) stepping token by token against
//! `reference_decode` on what it holds (a 17-row prompt, then 50 one-token steps), contiguous
//! and paged (page sizes 1, 3, 16), with rotary both ways; bad steps refused with the cache
//! unchanged. Without a GPU every test prints why it skips, unless FLASHATTN_REQUIRE_BACKENDS
//! names cuda.

use flashattn_core::testing::decode::{contiguous, decode_cases, paged, rotary, spec};
use flashattn_core::testing::{backend_or_skip, check_decode};
use flashattn_core::{
    random_inputs, reference_decode, rel_l2_error, AttentionSpec, Backend, CacheConfig, DType,
    DecodeStep, KvCacheHandle, Tensor,
};
use flashattn_cuda::{CudaBackend, KernelKind};

fn backend(kind: Option<KernelKind>) -> Option<CudaBackend> {
    let mut b = backend_or_skip("cuda", CudaBackend::new)?;
    b.force_kernel(kind);
    Some(b)
}

#[test]
fn decode_cases_every_dtype_and_kernel_family() {
    let Some(mut b) = backend(None) else { return };
    let mut failures = Vec::new();
    // Automatic (mma.sync for f16 / bf16, CUDA cores for f32), then the CUDA-core kernel forced.
    for (forced, dtypes) in [
        (None, &[DType::Bf16, DType::F16, DType::F32][..]),
        (Some(KernelKind::Generic), &[DType::Bf16][..]),
    ] {
        b.force_kernel(forced);
        for &dtype in dtypes {
            for (i, (name, spec)) in decode_cases(dtype).into_iter().enumerate() {
                if let Err(e) = check_decode(&b, &spec, 100 + i as u64) {
                    failures.push(format!("[{forced:?}] {name} ({dtype}): {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn long_cache_of_70000_rows() {
    let Some(b) = backend(None) else { return };
    let cases = [
        spec(32, 8, 1, 128, paged(&[69_999, 300], 1, 16, 0)).dtype(DType::Bf16),
        spec(4, 1, 2, 64, contiguous(&[70_000], 0, 0))
            .window(30_000, -1)
            .dtype(DType::F16),
        spec(8, 2, 1, 128, contiguous(&[70_000], 1, 0)).dtype(DType::F32),
    ];
    for (i, spec) in cases.iter().enumerate() {
        check_decode(&b, spec, 70 + i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// One step of a handle against the reference on the caches it held before the step: out,
/// LSE and both caches after the append (read back whole).
fn step_matches_the_reference(
    cache: &mut dyn KvCacheHandle,
    step: &DecodeStep,
    new: usize,
    seed: u64,
) -> Result<(), String> {
    let spec = cache.state().spec(step, new).map_err(|e| e.to_string())?;
    let (before_k, before_v) = cache.read().map_err(|e| e.to_string())?;
    let c = cache.state().config().clone();
    let (q, _, _) = random_inputs(&spec, seed);
    let rows = AttentionSpec::new(c.batch, c.heads_kv, new, new, c.head_dim)
        .head_dim_v(c.head_dim_v)
        .dtype(c.dtype);
    let (_, kn, vn) = random_inputs(&rows, seed ^ 1);
    let want = reference_decode(
        &spec,
        q.as_ref(),
        before_k.as_ref(),
        before_v.as_ref(),
        Some(kn.as_ref()),
        Some(vn.as_ref()),
    )
    .map_err(|e| e.to_string())?;
    let got = cache
        .decode(step, q.as_ref(), Some(kn.as_ref()), Some(vn.as_ref()))
        .map_err(|e| e.to_string())?;
    let err = rel_l2_error(&got.out.to_f32_vec(), &want.out);
    if err.is_nan() || err > c.dtype.tolerance() {
        return Err(format!("out: relative L2 error {err:.2e}"));
    }
    let (k, v) = cache.read().map_err(|e| e.to_string())?;
    for (which, t, w) in [("k", &k, &want.k_cache), ("v", &v, &want.v_cache)] {
        let t = t.to_f32_vec();
        if let Some(i) =
            (0..t.len()).find(|&i| (t[i] as f64 - w[i]).abs() > 1e-2 * w[i].abs().max(1.0))
        {
            return Err(format!("{which} cache element {i}: {} vs {}", t[i], w[i]));
        }
    }
    Ok(())
}

#[test]
fn handle_steps_match_the_reference_contiguous_and_paged() {
    let Some(b) = backend(None) else { return };
    for (dtype, page, rot) in [
        (DType::Bf16, None, None),
        (DType::Bf16, Some(1), Some(true)),
        (DType::F16, Some(3), Some(false)),
        (DType::F32, Some(16), None),
    ] {
        let (batch, hq, hkv, d, steps) = (2, 32, 8, 128, 50);
        let mut config = CacheConfig::contiguous(batch, 64 + steps, hkv, d).dtype(dtype);
        config.page_size = page;
        let mut cache = b.kv_cache(config).unwrap();
        // A prompt of 17 rows per sequence, crossing page boundaries, then one token per step.
        let mut prompt = DecodeStep::new(hq);
        prompt.seqlen_q = 17;
        step_matches_the_reference(cache.as_mut(), &prompt, 17, 1)
            .unwrap_or_else(|e| panic!("{dtype} page {page:?} prompt: {e}"));
        let mut step = DecodeStep::new(hq);
        step.return_lse = true;
        step.rotary = rot.map(|interleaved| rotary(64, 64 + steps, interleaved));
        for s in 0..steps {
            step_matches_the_reference(cache.as_mut(), &step, 1, 10 + s as u64)
                .unwrap_or_else(|e| panic!("{dtype} page {page:?} step {s}: {e}"));
        }
        assert_eq!(cache.state().seqlens(), &[17 + steps as i32; 2]);
        cache.reset(1).unwrap();
        step_matches_the_reference(cache.as_mut(), &step, 1, 99)
            .unwrap_or_else(|e| panic!("{dtype} page {page:?} after reset: {e}"));
    }
}

#[test]
fn bad_steps_leave_the_cache_unchanged() {
    let Some(b) = backend(None) else { return };
    let config = CacheConfig::contiguous(2, 8, 2, 64)
        .dtype(DType::Bf16)
        .paged(3);
    let mut cache = b.kv_cache(config).unwrap();
    let rows = |n: usize| {
        let s = AttentionSpec::new(2, 2, n, n, 64).dtype(DType::Bf16);
        let (_, k, v) = random_inputs(&s, n as u64);
        (k, v)
    };
    let (k, v) = rows(5);
    cache.append(k.as_ref(), v.as_ref()).unwrap();
    let before = cache.read().unwrap();
    let q = Tensor::zeros(DType::Bf16, 2 * 4 * 64);
    let (k4, v4) = rows(4);
    let (k1, v1) = rows(1);
    let mut odd_rotary = DecodeStep::new(4);
    odd_rotary.rotary = Some(rotary(64, 64, true));
    odd_rotary.rotary.as_mut().unwrap().dim = 3;
    let short_q = Tensor::zeros(DType::Bf16, 64);
    let f16_q = Tensor::zeros(DType::F16, 2 * 4 * 64);
    let step = DecodeStep::new(4);
    let attempts = [
        (
            "overflow",
            cache.decode(&step, q.as_ref(), Some(k4.as_ref()), Some(v4.as_ref())),
        ),
        (
            "odd rotary dim",
            cache.decode(
                &odd_rotary,
                q.as_ref(),
                Some(k1.as_ref()),
                Some(v1.as_ref()),
            ),
        ),
        (
            "short q",
            cache.decode(
                &step,
                short_q.as_ref(),
                Some(k1.as_ref()),
                Some(v1.as_ref()),
            ),
        ),
        (
            "f16 q",
            cache.decode(&step, f16_q.as_ref(), Some(k1.as_ref()), Some(v1.as_ref())),
        ),
        (
            "k without v",
            cache.decode(&step, q.as_ref(), Some(k1.as_ref()), None),
        ),
    ];
    for (what, r) in attempts {
        assert!(r.is_err(), "{what} was accepted");
    }
    assert_eq!(cache.state().seqlens(), &[5, 5]);
    let after = cache.read().unwrap();
    assert_eq!(after.0.as_ref().as_bytes(), before.0.as_ref().as_bytes());
    assert_eq!(after.1.as_ref().as_bytes(), before.1.as_ref().as_bytes());
}
