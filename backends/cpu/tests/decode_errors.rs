//! Bad decode arguments: a typed error naming the field and the value, and the caches (host
//! slices or a handle's buffers) left bit for bit as they were.

use flashattn_core::{
    random_inputs, AttentionSpec, Backend, DType, DecodeInputs, Error, KvCache, Rotary, Tensor,
    TensorRef,
};
use flashattn_cpu::CpuBackend;

fn rotary(dim: usize, positions: usize) -> Rotary {
    Rotary {
        cos: vec![0.5; positions * dim / 2],
        sin: vec![0.5; positions * dim / 2],
        dim,
        interleaved: true,
    }
}

/// A one-sequence problem (4 query heads, 2 KV heads, d 8) against `cache`.
fn spec(cache: KvCache) -> AttentionSpec {
    AttentionSpec::new(cache.seqlens.len(), 4, 1, 1, 8)
        .heads_kv(2)
        .causal(true)
        .kv_cache(cache)
}

/// One sequence of 3 cached rows appending `new`, with a rotary of `dim` and `positions`.
fn rotary_spec(dim: usize, positions: usize, new: usize) -> AttentionSpec {
    let cache = KvCache::contiguous(1, 10, vec![3]).seqlen_new(new);
    spec(cache.rotary(rotary(dim, positions)))
}

/// New rows for `spec`'s cache: `[batch, new, heads_kv, d]`.
fn new_rows(spec: &AttentionSpec, new: usize) -> (Tensor, Tensor) {
    let shape = AttentionSpec::new(spec.batch, spec.heads_kv, new.max(1), new.max(1), 8);
    let (_, k, v) = random_inputs(&shape, 9);
    let n = spec.batch * new * spec.heads_kv * 8;
    let cut = |t: Tensor| Tensor::F32(t.to_f32_vec()[..n].to_vec());
    (cut(k), cut(v))
}

#[test]
fn bad_cache_arguments_name_the_field_and_leave_the_caches_unchanged() {
    let paged = |table: Vec<i32>, page, seqlen| KvCache::paged(4, page, table, 2, vec![seqlen]);
    let cases: Vec<(&str, AttentionSpec, &[&str])> = vec![
        (
            "cache_seqlens past the cache",
            spec(KvCache::contiguous(2, 10, vec![11, 0])),
            &["kv_cache.seqlens", "seqlens[0] = 11"],
        ),
        (
            "negative cache_seqlens",
            spec(KvCache::contiguous(1, 10, vec![-1])),
            &["kv_cache.seqlens", "seqlens[0] = -1"],
        ),
        (
            "append overflows",
            spec(KvCache::contiguous(1, 10, vec![9]).seqlen_new(2)),
            &["kv_cache.seqlens", "seqlens[0] = 9 + 2 new"],
        ),
        (
            "block table entry out of range",
            spec(paged(vec![0, 4], 2, 3).seqlen_new(1)),
            &["kv_cache.block_table", "block_table[0][1] = 4"],
        ),
        (
            "negative block table entry",
            spec(paged(vec![-1, 2], 2, 1)),
            &["kv_cache.block_table", "block_table[0][0] = -1"],
        ),
        (
            "page repeated within a sequence",
            spec(paged(vec![1, 1], 2, 2).seqlen_new(1)),
            &["kv_cache.block_table", "page 1 twice"],
        ),
        (
            "page_size 0",
            spec(paged(vec![0, 1], 0, 0)),
            &["kv_cache.page_size", "= 0"],
        ),
        (
            "batch_idx out of range",
            spec(
                KvCache::contiguous(2, 10, vec![3])
                    .batch_idx(vec![2])
                    .seqlen_new(1),
            ),
            &["kv_cache.batch_idx", "batch_idx[0] = 2"],
        ),
        (
            "odd rotary_dim",
            rotary_spec(3, 10, 1),
            &["kv_cache.rotary.dim", "= 3"],
        ),
        (
            "rotary_dim over head_dim",
            rotary_spec(10, 10, 1),
            &["kv_cache.rotary.dim", "= 10"],
        ),
        (
            "cos / sin too short",
            rotary_spec(4, 4, 2),
            &["kv_cache.rotary.cos", "4 positions", "up to 4"],
        ),
    ];
    let backend = CpuBackend::new();
    for (name, spec, words) in cases {
        let new = spec.kv_cache.as_ref().unwrap().seqlen_new;
        let (q, k, v) = random_inputs(&spec, 1);
        let (kn, vn) = new_rows(&spec, new);
        let (mut kc, mut vc) = (k.clone(), v.clone());
        let err = backend
            .decode(
                &spec,
                DecodeInputs::of(&q, (&mut kc, &mut vc), (new > 0).then_some((&kn, &vn))),
            )
            .expect_err(name);
        assert!(matches!(err, Error::InvalidSpec { .. }), "{name}: {err:?}");
        for w in words {
            assert!(err.to_string().contains(w), "{name}: {err} lacks {w:?}");
        }
        let bits = |t: &Tensor| t.as_ref().as_bytes().to_vec();
        assert!(
            bits(&kc) == bits(&k) && bits(&vc) == bits(&v),
            "{name}: cache written"
        );
    }
}

/// (name, q, k_new, v_new, a word of the error).
type Case<'a> = (
    &'a str,
    TensorRef<'a>,
    Option<TensorRef<'a>>,
    Option<TensorRef<'a>>,
    &'a str,
);

#[test]
fn bad_buffers_are_refused_before_any_write() {
    let spec = spec(KvCache::contiguous(1, 10, vec![3]).seqlen_new(2));
    let (q, k, v) = random_inputs(&spec, 1);
    let (kn, vn) = new_rows(&spec, 2);
    let short = Tensor::F32(kn.to_f32_vec()[1..].to_vec());
    let q16 = Tensor::from_f32(DType::F16, &q.to_f32_vec());
    let backend = CpuBackend::new();
    let cases: [Case<'_>; 3] = [
        (
            "short k_new",
            q.as_ref(),
            Some(short.as_ref()),
            Some(vn.as_ref()),
            "k_new has 31",
        ),
        (
            "missing v_new",
            q.as_ref(),
            Some(kn.as_ref()),
            None,
            "v_new",
        ),
        (
            "q of another dtype",
            q16.as_ref(),
            Some(kn.as_ref()),
            Some(vn.as_ref()),
            "q is f16",
        ),
    ];
    for (name, q, k_new, v_new, word) in cases {
        let (mut kc, mut vc) = (k.clone(), v.clone());
        let inputs = DecodeInputs {
            q,
            k_cache: kc.as_mut(),
            v_cache: vc.as_mut(),
            k_new,
            v_new,
        };
        let err = backend.decode(&spec, inputs).expect_err(name);
        assert!(err.to_string().contains(word), "{name}: {err}");
        assert!(kc == k && vc == v, "{name}: cache written");
    }
    // fp8 caches are refused as unsupported, not mangled.
    let fp8 = spec.clone().dtype(DType::Fp8E4m3);
    assert!(matches!(
        backend.supports_decode(&fp8),
        Err(Error::Unsupported { .. })
    ));
    assert!(backend
        .supports_decode(&AttentionSpec::new(1, 1, 1, 1, 8))
        .is_err());
}

#[test]
fn a_handle_refuses_overflowing_appends_and_keeps_its_state() {
    flashattn_core::testing::decode::handle_refuses_bad_steps(&CpuBackend::new());
}
