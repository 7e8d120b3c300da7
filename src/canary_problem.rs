//! The canary's small problem: the same kind of work as the caller's (dtype, head dims, GQA
//! group, mask kinds, softcap, ALiBi, FP8 descales, varlen-ness, KV-cache layout, page size,
//! rotary style, pass, layout class of strided inputs) at a size the f64 reference checks in well under a second, with
//! several blocks of queries and keys so that tiling and masking are exercised.

use crate::canary_twin::twin_strides;
use crate::rotary_tables;
use crate::runtime::supports;
use flashattn_core::{Alibi, AttentionSpec, Backend, CacheLayout, Fp8Descale, KvCache, Pass};

/// Longest (query, key) lengths tried, smallest first: a backend whose kernel variant depends
/// on the length (a long-key path, say) gets the smallest problem that reaches it.
const LENGTH_CAPS: [(usize, usize); 11] = [
    (150, 150),
    (150, 600),
    (600, 600),
    (150, 2400),
    (2400, 2400),
    (150, 9600),
    (9600, 9600),
    (150, 38400),
    (38400, 38400),
    (150, 153_600),
    (153_600, 153_600),
];
/// The reference's work limit for one canary, in FLOPs (a few seconds in f64 at most).
const MAX_REFERENCE_FLOPS: f64 = 4e9;

/// A small problem that `backend` runs with the same kernel variant as `spec`, or why none.
pub fn small_problem(
    backend: &dyn Backend,
    spec: &AttentionSpec,
    pass: Pass,
) -> Result<AttentionSpec, String> {
    let want = backend.kernel_variant(spec, pass);
    let (max_q, max_k) = spec.max_lens();
    let work = if pass == Pass::Backward { 3.5 } else { 1.0 };
    let mut others = Vec::new();
    for (cap_q, cap_k) in LENGTH_CAPS {
        let small = shrunk(spec, cap_q, cap_k)?;
        if small.flops() * work > MAX_REFERENCE_FLOPS {
            continue;
        }
        let variant = backend.kernel_variant(&small, pass);
        if variant == want {
            return match supports(backend, &small, pass) {
                Ok(()) => Ok(small),
                Err(e) => Err(format!("the small problem {small} is refused: {e}")),
            };
        }
        others.push(variant);
        if cap_q >= max_q && cap_k >= max_k {
            break;
        }
    }
    others.dedup();
    Err(format!(
        "no problem small enough for the reference runs {want} (smaller ones run {})",
        others.join(", ")
    ))
}

/// `spec` with 2 sequences, 1 or 2 KV heads (the same GQA group), at most `cap_q` queries
/// and `cap_k` keys per sequence, windows of at most 40, and every modifier kept.
fn shrunk(spec: &AttentionSpec, cap_q: usize, cap_k: usize) -> Result<AttentionSpec, String> {
    let (max_q, max_k) = spec.max_lens();
    let (sq, sk) = (max_q.clamp(1, cap_q), max_k.clamp(1, cap_k));
    // Resized buffers: the caller's strides no longer apply; twin_strides sets the twin's.
    let mut s = spec.contiguous();
    s.batch = 2;
    // Two KV heads, or one when each has many query heads (the reference's cost).
    s.heads_kv = spec.heads_kv.min(if spec.group_size() > 2 { 1 } else { 2 });
    s.heads_q = s.heads_kv * spec.group_size();
    s.seqlen_q = sq;
    s.seqlen_k = sk;
    s.return_lse = true;
    let short = |w: i64| if w < 0 { w } else { w.min(40) };
    s.window = (short(spec.window.0), short(spec.window.1));
    s.alibi = spec.alibi.as_ref().map(|a| Alibi {
        slopes: cycle(&a.slopes, if a.per_batch { 2 } else { 1 } * s.heads_q),
        per_batch: a.per_batch,
    });
    s.fp8_descale = spec.fp8_descale.as_ref().map(|d| Fp8Descale {
        q: cycle(&d.q, 2 * s.heads_kv),
        k: cycle(&d.k, 2 * s.heads_kv),
        v: cycle(&d.v, 2 * s.heads_kv),
    });
    s.varlen = None;
    s.kv_cache = None;
    if spec.is_varlen() {
        // Two sequences of different lengths.
        let (q2, k2) = (sq.div_ceil(2), sk - sk / 3);
        s = s.varlen(
            vec![0, sq as i32, (sq + q2) as i32],
            vec![0, sk as i32, (sk + k2) as i32],
        );
        s.seqlen_q = sq + q2;
        s.seqlen_k = sk + k2;
    }
    if let Some(cache) = &spec.kv_cache {
        let positional_q = s.causal || s.window != (-1, -1);
        s = s.kv_cache(small_cache(cache, sq, sk, positional_q));
    }
    // Strided where the caller's inputs are: a backend may pick its kernel by the layout.
    s.strides = twin_strides(spec, &s);
    s.validate()
        .map_err(|e| format!("cannot build a small problem like {spec}: {e}"))?;
    Ok(s)
}

/// A cache of 2 sequences attending to up to `keys` keys (the second about half as many),
/// with the original's layout kind, page size, new-row count (at most 16), batch index and
/// rotary style. Pages are handed out in reverse so that addressing is exercised.
fn small_cache(cache: &KvCache, seqlen_q: usize, keys: usize, positional_q: bool) -> KvCache {
    let new = cache.seqlen_new.min(16);
    let keys = keys.max(new);
    let used = [keys - new, (keys - new) / 2];
    let capacity = keys + 3;
    let seqlens = used.iter().map(|&u| u as i32).collect();
    let mut small = match &cache.layout {
        CacheLayout::Contiguous { .. } if cache.batch_idx.is_some() => {
            KvCache::contiguous(3, capacity, seqlens).batch_idx(vec![2, 0])
        }
        CacheLayout::Contiguous { .. } => KvCache::contiguous(2, capacity, seqlens),
        CacheLayout::Paged { page_size, .. } => {
            let page = *page_size;
            let per_seq = capacity.div_ceil(page);
            let pages = 2 * per_seq + 1;
            let table = (0..2 * per_seq).map(|i| (pages - 1 - i) as i32).collect();
            KvCache::paged(pages, page, table, per_seq, seqlens)
        }
    };
    small.seqlen_new = new;
    if let Some(r) = &cache.rotary {
        let q_span = if positional_q { seqlen_q } else { 1 };
        small.rotary = Some(rotary_tables(
            r.dim,
            used[0] + new.max(q_span),
            r.interleaved,
        ));
    }
    small
}

fn cycle(values: &[f32], n: usize) -> Vec<f32> {
    values.iter().cycle().take(n).copied().collect()
}
