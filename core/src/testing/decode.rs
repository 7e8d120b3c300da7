//! Decode cases shared by every backend's tests: caches (contiguous, or paged with each
//! sequence's pages scattered over the pool), rotary tables, and the named feature cases.

use crate::{AttentionSpec, DType, KvCache, Rotary};

/// A contiguous cache with `extra` spare rows per sequence beyond the longest use.
pub fn contiguous(seqlens: &[i32], new: usize, extra: usize) -> KvCache {
    let cap = seqlens.iter().map(|&l| l as usize).max().unwrap_or(0) + new + extra;
    KvCache::contiguous(seqlens.len(), cap, seqlens.to_vec()).seqlen_new(new)
}

/// A paged cache of `page`-row pages, each sequence's pages scattered over the pool (a
/// fixed shuffle), with room for `extra` more rows.
pub fn paged(seqlens: &[i32], new: usize, page: usize, extra: usize) -> KvCache {
    let cap = seqlens.iter().map(|&l| l as usize).max().unwrap_or(0) + new + extra;
    let per_seq = cap.div_ceil(page);
    let blocks = per_seq * seqlens.len() + 3;
    let mut pool: Vec<i32> = (0..blocks as i32).collect();
    let mut x = 0x9e37_79b9u64;
    for i in (1..pool.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        pool.swap(i, (x >> 33) as usize % (i + 1));
    }
    let table = pool[..per_seq * seqlens.len()].to_vec();
    KvCache::paged(blocks, page, table, per_seq, seqlens.to_vec()).seqlen_new(new)
}

/// cos / sin tables for `positions` positions of a `dim`-wide rotation.
pub fn rotary(dim: usize, positions: usize, interleaved: bool) -> Rotary {
    let half = dim / 2;
    let angle = |p: usize, i: usize| p as f32 * 10000f32.powf(-((2 * i) as f32) / dim as f32);
    let table = |f: fn(f32) -> f32| {
        (0..positions * half)
            .map(|k| f(angle(k / half, k % half)))
            .collect()
    };
    Rotary {
        cos: table(f32::cos),
        sin: table(f32::sin),
        dim,
        interleaved,
    }
}

/// A decode problem: `hq` / `hkv` heads, `sq` query rows, head dim `d`, against `cache`.
pub fn spec(hq: usize, hkv: usize, sq: usize, d: usize, cache: KvCache) -> AttentionSpec {
    AttentionSpec::new(cache.seqlens.len(), hq, sq, 1, d)
        .heads_kv(hkv)
        .causal(true)
        .return_lse(true)
        .kv_cache(cache)
}

/// The named decode cases every backend must pass (cache lengths 0 / 1 / 17 / 1000, page
/// sizes 1 / 3 / 16 / 256, appends across pages, GQA 32/8 and MQA, every mask and score
/// feature, rotary both styles), for `dtype`.
pub fn decode_cases(dtype: DType) -> Vec<(&'static str, AttentionSpec)> {
    let lens = [0, 1, 17, 1000];
    let cases = vec![
        (
            "contiguous 0/1/17/1000, GQA 32/8",
            spec(32, 8, 1, 64, contiguous(&lens, 1, 3)),
        ),
        ("page 1", spec(4, 2, 1, 64, paged(&lens, 1, 1, 0))),
        (
            "page 3, append of 4 across pages",
            spec(4, 2, 1, 40, paged(&[2, 5, 0, 30], 4, 3, 2)),
        ),
        (
            "page 16, 15 + 3 crosses a page",
            spec(4, 2, 1, 64, paged(&[15, 1000, 17], 3, 16, 0)),
        ),
        (
            "page 256",
            spec(8, 2, 1, 72, paged(&[0, 255, 1000], 1, 256, 0)),
        ),
        ("MQA", spec(8, 1, 1, 128, contiguous(&[300, 17], 1, 0))),
        ("attend only", spec(4, 2, 1, 64, paged(&lens, 0, 16, 0))),
        (
            "not causal, 3 query rows",
            spec(4, 2, 3, 64, contiguous(&[50, 9], 0, 1)).causal(false),
        ),
        (
            "causal, 4 new rows and queries",
            spec(4, 2, 4, 64, paged(&[100, 0, 3], 4, 16, 0)),
        ),
        (
            "window",
            spec(4, 2, 2, 64, contiguous(&lens, 2, 0)).window(50, 0),
        ),
        (
            "window both sides, not causal",
            spec(4, 4, 5, 32, paged(&[300, 4], 0, 3, 0))
                .causal(false)
                .window(7, 2),
        ),
        (
            "softcap",
            spec(4, 2, 1, 64, contiguous(&[400, 3], 1, 0)).softcap(3.0),
        ),
        (
            "alibi per batch",
            spec(4, 2, 2, 64, paged(&[400, 30], 2, 16, 0))
                .alibi(vec![0.1, 0.02, 0.3, 0.05, 0.01, 0.2, 0.04, 0.08], true),
        ),
        (
            "head_dim_v differs, d 200",
            spec(4, 2, 1, 200, contiguous(&[100, 1], 1, 0)).head_dim_v(72),
        ),
        (
            "custom scale",
            spec(2, 1, 1, 16, contiguous(&[33], 1, 0)).scale(0.7),
        ),
        (
            "batch_idx",
            spec(
                4,
                2,
                1,
                64,
                KvCache::contiguous(5, 260, vec![100, 0, 250])
                    .seqlen_new(1)
                    .batch_idx(vec![4, 0, 2]),
            ),
        ),
        (
            "batch_idx repeated, attend only",
            spec(
                4,
                2,
                1,
                64,
                KvCache::contiguous(3, 40, vec![30, 12]).batch_idx(vec![1, 1]),
            ),
        ),
        (
            "rotary interleaved, causal: q at its own positions",
            spec(
                4,
                2,
                3,
                64,
                paged(&[40, 0], 3, 16, 0).rotary(rotary(64, 43, true)),
            ),
        ),
        (
            "rotary half-split, not causal: q at seqlens",
            spec(
                4,
                2,
                2,
                64,
                contiguous(&[40, 5], 2, 0).rotary(rotary(32, 42, false)),
            )
            .causal(false),
        ),
        (
            "rotary half-split, window, dim = d",
            spec(
                2,
                1,
                2,
                48,
                contiguous(&[20], 2, 0).rotary(rotary(48, 22, false)),
            )
            .window(5, -1),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, s)| (name, s.dtype(dtype)))
        .collect()
}
