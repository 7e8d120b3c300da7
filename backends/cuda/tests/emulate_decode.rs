//! Without a GPU: the decode kernels' real CUDA source (append, split-KV attention with
//! mma.sync or on CUDA cores, combine) run on the CPU by the emulator (tests/emulator/emu.h,
//! tests/emulator/decode_driver.cpp), against `reference_decode` through core's `check_decode`:
//! out, LSE and both caches after the in-place append. The host side is the backend's own:
//! `select_decode`, `decode_plan` (split count, packed-row tile, launches, host tables) and
//! `DecodeParams`. A small SM count makes long caches split, so the combine kernel runs.
//! What this cannot show: speed, races between warps, the device-resident handle's memory
//! traffic (tests/gpu.rs runs those on a GPU).

mod common;

use common::emulated::Emulated;
use common::run_check;
use flashattn_core::testing::decode::{
    contiguous, decode_cases, decode_nan_reaches_exactly_the_rows_that_see_it, paged, spec,
};
use flashattn_core::testing::{backend_or_skip, check_decode};
use flashattn_core::{AttentionSpec, DType};
use flashattn_cuda::KernelKind;

fn emulated(arch: &'static str, kind: KernelKind, sm_count: usize) -> Option<Emulated> {
    backend_or_skip("cuda-emulate", || Emulated::new(arch, kind, sm_count))
}

/// Every case on `b` with core's `check_decode`; one line per failure.
fn run(b: &Emulated, cases: &[(String, AttentionSpec)], seed: u64) {
    run_check(b, "decode", cases, seed, check_decode);
}

fn named(dtype: DType) -> Vec<(String, AttentionSpec)> {
    decode_cases(dtype)
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect()
}

/// Core's decode cases of `dtype` on `kind` kernels as an `arch` GPU with 8 SMs picks them.
fn decode_cases_on(arch: &'static str, kind: KernelKind, dtype: DType, seed: u64) {
    if let Some(b) = emulated(arch, kind, 8) {
        run(&b, &named(dtype), seed);
    }
}

#[test]
fn mma_decode_cases_bf16_sm80() {
    decode_cases_on("sm_80", KernelKind::DecodeMma, DType::Bf16, 100);
}

#[test]
fn mma_decode_cases_f16_sm89() {
    decode_cases_on("sm_89", KernelKind::DecodeMma, DType::F16, 200);
}

#[test]
fn simt_decode_cases_f32() {
    decode_cases_on("sm_80", KernelKind::DecodeSimt, DType::F32, 300);
}

/// NaN in q or a visible key reaches exactly the rows that see it (core's shared check, f32:
/// the CUDA-core kernel).
#[test]
fn nan_reaches_exactly_the_rows_that_see_it() {
    if let Some(b) = emulated("sm_80", KernelKind::DecodeSimt, 8) {
        decode_nan_reaches_exactly_the_rows_that_see_it(&b, "cuda simt decode, emulated");
    }
}

/// The 64-row tile (more than 16 packed rows: GQA 32/8 with 5 query rows), splits and the
/// combine on a page-16 cache of 1000+ rows, and the CUDA-core kernel on bf16 (forced).
#[test]
fn wide_tiles_splits_and_forced_simt() {
    let cases = vec![
        (
            "GQA 32/8, 5 query rows: 20 packed rows".to_string(),
            spec(32, 8, 5, 128, paged(&[1000, 17], 5, 16, 0)).dtype(DType::Bf16),
        ),
        (
            "MQA 16 heads, 1 KV head, no LSE".to_string(),
            spec(16, 1, 1, 64, contiguous(&[1000], 1, 0))
                .return_lse(false)
                .dtype(DType::Bf16),
        ),
    ];
    if let Some(b) = emulated("sm_80", KernelKind::DecodeMma, 16) {
        run(&b, &cases, 400);
    }
    if let Some(b) = emulated("sm_80", KernelKind::DecodeSimt, 16) {
        run(&b, &cases, 500);
    }
}

/// A transposed q (`[b, h, s, d]`, NaN outside the view) gives the contiguous q's out and LSE
/// bit for bit, read by the split kernel directly or, with rotary, by the append kernel that
/// writes the rotated copy; both match the f64 reference.
#[test]
fn decode_reads_a_transposed_q() {
    use flashattn_core::testing::decode::DecodeData;
    use flashattn_core::testing::strided::{strided_copy, Layout};
    use flashattn_core::{rel_l2_error, Backend, InputStrides, Rotary};
    for (kind, dtype) in [
        (KernelKind::DecodeMma, DType::Bf16),
        (KernelKind::DecodeSimt, DType::F32),
    ] {
        let Some(b) = emulated("sm_80", kind, 8) else {
            return;
        };
        for rotary in [false, true] {
            let mut cache = contiguous(&[0, 17], 2, 3);
            if rotary {
                let n = 32 * 16;
                cache.rotary = Some(Rotary {
                    cos: (0..n).map(|i| (i as f32 * 0.1).cos()).collect(),
                    sin: (0..n).map(|i| (i as f32 * 0.1).sin()).collect(),
                    dim: 32,
                    interleaved: false,
                });
            }
            let spec = spec(4, 2, 3, 64, cache).dtype(dtype);
            let data = DecodeData::random(&spec, 41);
            let run = |spec: &AttentionSpec, q: &flashattn_core::Tensor| {
                let (mut kc, mut vc) = (data.k_cache.clone(), data.v_cache.clone());
                let mut inputs = data.inputs((&mut kc, &mut vc));
                inputs.q = q.as_ref();
                b.decode(spec, inputs)
                    .unwrap_or_else(|e| panic!("{kind:?} {spec}: {e}"))
            };
            let plain = run(&spec, &data.q);
            let (q, st) = strided_copy(&data.q, (2, 3, 4, 64), Layout::Transposed);
            let strided = spec.clone().strides(InputStrides {
                q: Some(st),
                ..Default::default()
            });
            let got = run(&strided, &q);
            assert!(got == plain, "{kind:?} {spec}: strided q's output differs");
            let want = data.reference(&spec).unwrap();
            let err = rel_l2_error(&got.out.to_f32_vec(), &want.out);
            assert!(
                err <= dtype.tolerance(),
                "{kind:?} {spec}: rel L2 {err:.2e}"
            );
        }
    }
}
