//! The f64 reference decode: a step equals a prefill over the same keys, rotary follows its
//! definition, the caches are written where FlashAttention writes them, and bad cache
//! arguments are typed errors.

use flashattn_core::{
    reference_attention, reference_decode, AttentionSpec, Error, KvCache, Rotary, Tensor, TensorRef,
};

fn f32s(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// A paged decode appends into the right pages and attends like a prefill over the prefix.
#[test]
fn paged_step_equals_prefill() {
    let (hq, hkv, d) = (4, 2, 8);
    let page = 3;
    // Two sequences, 4 and 7 rows in use, 2 new rows each; pages scattered.
    let table = vec![5, 0, 3, 9, 1, 2, 7, 4];
    let cache = KvCache::paged(10, page, table.clone(), 4, vec![4, 7]).seqlen_new(2);
    let spec = AttentionSpec::new(2, hq, 2, 1, d)
        .heads_kv(hkv)
        .causal(true)
        .kv_cache(cache)
        .return_lse(true);
    let rows = 10 * page;
    let (kc, vc) = (f32s(rows * hkv * d, 1), f32s(rows * hkv * d, 2));
    let (kn, vn) = (f32s(2 * 2 * hkv * d, 3), f32s(2 * 2 * hkv * d, 4));
    let q = f32s(2 * 2 * hq * d, 5);
    let r = reference_decode(
        &spec,
        TensorRef::F32(&q),
        TensorRef::F32(&kc),
        TensorRef::F32(&vc),
        Some(TensorRef::F32(&kn)),
        Some(TensorRef::F32(&vn)),
    )
    .unwrap();
    for (b, used) in [(0usize, 4usize), (1, 7)] {
        let keys = used + 2;
        // The prefix as a dense sequence, read from the pages by hand.
        let row = |pos: usize| table[b * 4 + pos / page] as usize * page + pos % page;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for pos in 0..keys {
            let src = row(pos) * hkv * d;
            k.extend(r.k_cache[src..src + hkv * d].iter().map(|&x| x as f32));
            v.extend(r.v_cache[src..src + hkv * d].iter().map(|&x| x as f32));
            if pos >= used {
                let n = ((b * 2 + pos - used) * hkv) * d;
                assert_eq!(
                    &k[pos * hkv * d..],
                    &kn[n..n + hkv * d],
                    "new k row {pos} of {b}"
                );
            }
        }
        let dense = AttentionSpec::new(1, hq, 2, keys, d)
            .heads_kv(hkv)
            .causal(true)
            .return_lse(true);
        let qb = &q[b * 2 * hq * d..(b + 1) * 2 * hq * d];
        let p = reference_attention(
            &dense,
            TensorRef::F32(qb),
            TensorRef::F32(&k),
            TensorRef::F32(&v),
        )
        .unwrap();
        let o = &r.out[b * 2 * hq * d..(b + 1) * 2 * hq * d];
        assert_eq!(o, &p.out[..], "out of sequence {b}");
        assert_eq!(
            &r.lse[b * hq * 2..(b + 1) * hq * 2],
            &p.lse[..],
            "lse of sequence {b}"
        );
    }
}

/// Rotary: GPT-J pairs and GPT-NeoX halves, new k at positions seqlens + i.
#[test]
fn rotary_rotates_pairs_and_halves() {
    let d = 4;
    let theta = [0.3f32, 1.1];
    // Position 2 (seqlens = 2, one new row): cos/sin tables of 3 positions, dim 4 (2 pairs).
    let mut cos = vec![1.0f32; 6];
    let mut sin = vec![0.0f32; 6];
    for (i, t) in theta.iter().enumerate() {
        cos[2 * 2 + i] = t.cos();
        sin[2 * 2 + i] = t.sin();
    }
    for interleaved in [true, false] {
        let rot = Rotary {
            cos: cos.clone(),
            sin: sin.clone(),
            dim: 4,
            interleaved,
        };
        let cache = KvCache::contiguous(1, 4, vec![2]).seqlen_new(1).rotary(rot);
        let spec = AttentionSpec::new(1, 1, 1, 1, d).kv_cache(cache);
        let kn = [1.0f32, 2.0, 3.0, 4.0];
        let zeros = vec![0.0f32; 4 * d];
        let r = reference_decode(
            &spec,
            TensorRef::F32(&[0.0; 4]),
            TensorRef::F32(&zeros),
            TensorRef::F32(&zeros),
            Some(TensorRef::F32(&kn)),
            Some(TensorRef::F32(&kn)),
        )
        .unwrap();
        let got = &r.k_cache[2 * d..3 * d];
        let pairs = if interleaved {
            [(0, 1), (2, 3)]
        } else {
            [(0, 2), (1, 3)]
        };
        for (p, (a, b)) in pairs.into_iter().enumerate() {
            let (c, s) = (theta[p].cos() as f64, theta[p].sin() as f64);
            let (x, y) = (kn[a] as f64, kn[b] as f64);
            assert!(
                (got[a] - (x * c - y * s)).abs() < 1e-6,
                "{interleaved} {got:?}"
            );
            assert!(
                (got[b] - (x * s + y * c)).abs() < 1e-6,
                "{interleaved} {got:?}"
            );
        }
        // v is stored unrotated.
        assert_eq!(&r.v_cache[2 * d..3 * d], &[1.0, 2.0, 3.0, 4.0]);
    }
}

/// NaN in one key propagates into the rows that see it; masked rows stay 0 / -inf.
#[test]
fn nan_propagates_in_the_reference() {
    let spec = AttentionSpec::new(1, 1, 3, 3, 2)
        .causal(true)
        .return_lse(true);
    let q = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
    let mut k = [0.1f32; 6];
    k[2] = f32::NAN; // key 1
    let v = [1.0f32; 6];
    let r = reference_attention(
        &spec,
        TensorRef::F32(&q),
        TensorRef::F32(&k),
        TensorRef::F32(&v),
    )
    .unwrap();
    assert!(
        r.out[0..2].iter().all(|x| x.is_finite()),
        "row 0 does not see key 1"
    );
    assert!(r.lse[0].is_finite());
    assert!(r.out[2..].iter().all(|x| x.is_nan()), "{:?}", r.out);
    assert!(r.lse[1].is_nan() && r.lse[2].is_nan());
}

fn rejects(spec: AttentionSpec, field: &str, fragment: &str) {
    match spec.validate() {
        Err(Error::InvalidSpec {
            field: f,
            value,
            reason,
        }) => {
            assert_eq!(f, field, "{value}: {reason}");
            assert!(
                value.contains(fragment),
                "'{value}' should mention '{fragment}'"
            );
        }
        other => panic!("expected an error for {field}, got {other:?}"),
    }
}

#[test]
fn bad_cache_arguments_are_rejected() {
    let base = |c: KvCache| AttentionSpec::new(2, 2, 1, 1, 8).kv_cache(c);
    base(KvCache::contiguous(2, 10, vec![3, 9]).seqlen_new(1))
        .validate()
        .unwrap();
    rejects(
        base(KvCache::contiguous(2, 10, vec![3, 10]).seqlen_new(1)),
        "kv_cache.seqlens",
        "seqlens[1] = 10",
    );
    rejects(
        base(KvCache::contiguous(2, 10, vec![3])),
        "kv_cache.seqlens",
        "1 lengths",
    );
    rejects(
        base(KvCache::contiguous(2, 10, vec![-1, 0])),
        "kv_cache.seqlens",
        "-1",
    );
    rejects(
        base(KvCache::contiguous(2, 10, vec![1, 1]).batch_idx(vec![0, 2])),
        "kv_cache.batch_idx",
        "batch_idx[1] = 2",
    );
    rejects(
        base(
            KvCache::contiguous(2, 10, vec![1, 1])
                .batch_idx(vec![1, 1])
                .seqlen_new(1),
        ),
        "kv_cache.batch_idx",
        "cache row 1 used twice",
    );
    rejects(
        base(KvCache::paged(4, 0, vec![0, 1], 1, vec![0, 0])),
        "kv_cache.page_size",
        "0",
    );
    rejects(
        base(KvCache::paged(4, 2, vec![0, 1, 2, 4], 2, vec![2, 3])),
        "kv_cache.block_table",
        "block_table[1][1] = 4",
    );
    rejects(
        base(KvCache::paged(4, 2, vec![0, 0, 2, 3], 2, vec![3, 3])),
        "kv_cache.block_table",
        "page 0 twice",
    );
    // Unused table entries are not read: garbage there is fine.
    base(KvCache::paged(4, 2, vec![0, -5, 2, 3], 2, vec![2, 3]))
        .validate()
        .unwrap();
    let rot = |dim: usize, n: usize| Rotary {
        cos: vec![1.0; n * dim / 2],
        sin: vec![0.0; n * dim / 2],
        dim,
        interleaved: true,
    };
    // (seqlens, rotary dim, cos positions; the field refused and what its value names).
    for (seqlens, dim, n, refused) in [
        ([1, 1], 3, 4, Some(("kv_cache.rotary.dim", "3"))),
        ([1, 1], 10, 4, Some(("kv_cache.rotary.dim", "10"))),
        ([1, 5], 4, 5, Some(("kv_cache.rotary.cos", "5 positions"))),
        ([1, 5], 4, 6, None),
    ] {
        let cache = KvCache::contiguous(2, 10, seqlens.to_vec()).seqlen_new(1);
        let spec = base(cache.rotary(rot(dim, n)));
        match refused {
            Some((field, fragment)) => rejects(spec, field, fragment),
            None => {
                spec.validate().unwrap();
            }
        }
    }
    rejects(
        base(KvCache::contiguous(2, 10, vec![1, 5]).rotary(rot(4, 6))),
        "kv_cache.rotary",
        "set",
    );
    let mut varlen = AttentionSpec::new(1, 2, 4, 4, 8).varlen(vec![0, 4], vec![0, 4]);
    varlen.kv_cache = Some(KvCache::contiguous(1, 10, vec![1]));
    rejects(varlen, "kv_cache", "set");
    // Forward inputs with a cache spec are refused.
    let spec = base(KvCache::contiguous(2, 10, vec![3, 9]));
    let t = Tensor::F32(vec![0.0; 2 * 2 * 8]);
    let kc = Tensor::F32(vec![0.0; 2 * 10 * 2 * 8]);
    assert!(
        flashattn_core::validate_inputs(&spec, &t.as_ref(), &kc.as_ref(), &kc.as_ref()).is_err()
    );
}
