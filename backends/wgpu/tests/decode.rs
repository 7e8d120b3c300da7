//! Decode against a KV cache on the wgpu backend: core's decode cases (every layout, page
//! sizes 1/3/16/256, cache lengths 0/1/17/1000, GQA 32/8, MQA, rotary both styles, every
//! feature) per dtype against the f64 reference, one cache of ~100k keys, a handle's decode
//! steps against prefills of the same prefix, NaN rows, and bad arguments refused with the caches left
//! bit for bit as they were.

mod common;

use common::assert_cases;
use flashattn_core::testing::check_decode;
use flashattn_core::testing::decode::{
    contiguous, decode_cases, decode_nan_reaches_exactly_the_rows_that_see_it,
    decode_steps_equal_prefills, handle_refuses_bad_steps, paged, spec,
};
use flashattn_core::{
    random_inputs, AttentionSpec, Backend, DType, DecodeInputs, Error, KvCache, Tensor,
};

/// NaN in q or a visible key reaches exactly the rows that see it (core's shared check).
#[test]
fn nan_reaches_exactly_the_rows_that_see_it() {
    let Some(b) = common::backend() else { return };
    decode_nan_reaches_exactly_the_rows_that_see_it(b, "wgpu");
}

#[test]
fn decode_cases_every_dtype() {
    let Some(b) = common::backend() else { return };
    for dtype in common::dtypes(b) {
        assert_cases(b, &decode_cases(dtype), 500, check_decode);
    }
    // Odd row widths in bf16 (two rows share a word): the append's half-word stores and the
    // combine kernel's whole-word output.
    let odd = [
        (
            "bf16 d 5, 3 KV heads",
            spec(3, 3, 1, 5, paged(&[7, 30], 2, 3, 1)),
        ),
        (
            "bf16 d 9 / dv 3",
            spec(2, 1, 2, 9, contiguous(&[4, 0, 11], 1, 2)).head_dim_v(3),
        ),
    ];
    let odd: Vec<_> = odd
        .into_iter()
        .map(|(n, s)| (n, s.dtype(DType::Bf16)))
        .collect();
    assert_cases(b, &odd, 600, check_decode);
}

/// Long caches: ~100k keys in one sequence (many key slices and dispatches on lavapipe, whose
/// loop cap breaks an unbounded walk), one head and a small head dim to stay quick.
#[test]
fn long_caches_near_100k_keys() {
    let Some(b) = common::backend() else { return };
    let cases = [
        (
            "contiguous 99999 + 1",
            spec(1, 1, 1, 16, contiguous(&[99_999], 1, 0)),
        ),
        (
            "paged 256, 70000 + 2, bf16, window",
            spec(2, 1, 2, 16, paged(&[70_000], 2, 256, 0))
                .window(40_000, 0)
                .dtype(DType::Bf16),
        ),
    ];
    assert_cases(b, &cases, 70, check_decode);
}

/// Every step of a handle (append one token, attend) equals a prefill of the same prefix.
#[test]
fn decode_steps_equal_prefills_of_the_prefix() {
    let Some(b) = common::backend() else { return };
    decode_steps_equal_prefills(b, DType::F32, Some(3), Some(true), 50);
    decode_steps_equal_prefills(b, DType::Bf16, Some(16), None, 12);
    if b.has_f16() {
        decode_steps_equal_prefills(b, DType::F16, None, Some(false), 12);
    }
}

/// Bad cache arguments and buffers: a typed error naming the field, nothing written.
#[test]
fn bad_arguments_leave_the_caches_unchanged() {
    let Some(b) = common::backend() else { return };
    let base = |cache: KvCache| spec(4, 2, 1, 8, cache);
    let cases = [
        (
            "seqlens past the cache",
            base(KvCache::contiguous(2, 10, vec![11, 0])),
            "seqlens[0] = 11",
        ),
        (
            "append overflows",
            base(KvCache::contiguous(1, 10, vec![9]).seqlen_new(2)),
            "seqlens[0] = 9 + 2 new",
        ),
        (
            "block table entry out of range",
            base(KvCache::paged(4, 2, vec![0, 4], 2, vec![3]).seqlen_new(1)),
            "block_table[0][1] = 4",
        ),
        (
            "page repeated",
            base(KvCache::paged(4, 2, vec![1, 1], 2, vec![2]).seqlen_new(1)),
            "page 1 twice",
        ),
    ];
    for (name, spec, word) in cases {
        let new = spec.kv_cache.as_ref().map_or(0, |c| c.seqlen_new);
        let (q, k, v) = random_inputs(&spec, 1);
        let rows = AttentionSpec::new(spec.batch, 2, new.max(1), 1, 8);
        let (kn, _, _) = random_inputs(&rows, 2);
        let kn = Tensor::F32(kn.to_f32_vec()[..spec.batch * new * 2 * 8].to_vec());
        let (mut kc, mut vc) = (k.clone(), v.clone());
        let err = b
            .decode(
                &spec,
                DecodeInputs {
                    q: q.as_ref(),
                    k_cache: kc.as_mut(),
                    v_cache: vc.as_mut(),
                    k_new: (new > 0).then(|| kn.as_ref()),
                    v_new: (new > 0).then(|| kn.as_ref()),
                },
            )
            .expect_err(name);
        assert!(matches!(err, Error::InvalidSpec { .. }), "{name}: {err:?}");
        assert!(err.to_string().contains(word), "{name}: {err}");
        assert!(kc == k && vc == v, "{name}: cache written");
    }
    handle_refuses_bad_steps(b);
    // fp8 is refused as unsupported.
    let fp8 = base(KvCache::contiguous(1, 10, vec![3])).dtype(DType::Fp8E4m3);
    assert!(matches!(
        b.supports_decode(&fp8),
        Err(Error::Unsupported { .. })
    ));
}
