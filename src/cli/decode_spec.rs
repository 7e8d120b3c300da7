//! Flags of a decode step against a KV cache (`run --decode`, `bench --decode`) and the spec
//! they describe. Sizes are checked against the host-memory budget before the block table or
//! the rotary tables are built.

use super::budget;
use super::shape::ShapeArgs;
use super::CliResult;
use flashattn::{rotary_tables, AttentionSpec, KvCache};

/// Rows already in the cache per sequence, when `--cache-len` is not given.
pub const DEFAULT_CACHE_LEN: usize = 4096;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct CacheArgs {
    /// With --decode: rows already in the cache of each sequence [default: 4096].
    #[arg(long, requires = "decode")]
    pub cache_len: Option<usize>,
    /// With --decode: new key/value rows appended to each sequence before attending [default: 1].
    #[arg(long, requires = "decode")]
    pub new_tokens: Option<usize>,
    /// With --decode: a paged cache with this many rows per page (any size from 1; pages of
    /// the sequences interleaved); without it the cache is contiguous.
    #[arg(long, requires = "decode")]
    pub page_size: Option<usize>,
    /// With --decode: rotary embedding of q and the new keys over the first DIM dimensions
    /// (even, at most head_dim); interleaved pairs unless --rotary-neox.
    #[arg(long, requires = "decode")]
    pub rotary_dim: Option<usize>,
    /// Rotary pairs (2i, 2i+1), GPT-J style (the default, as FlashAttention's).
    #[arg(long, requires = "rotary_dim", conflicts_with = "rotary_neox")]
    pub rotary_interleaved: bool,
    /// Rotary halves (i, i + dim/2), GPT-NeoX style.
    #[arg(long, requires = "rotary_dim")]
    pub rotary_neox: bool,
}

impl CacheArgs {
    /// The decode spec of these flags with `cache_len` rows in use per sequence. Query rows
    /// default to the new tokens (at least 1); the cache holds exactly the rows the step needs.
    pub fn spec(&self, shape: &ShapeArgs, cache_len: usize) -> CliResult<AttentionSpec> {
        let new = self.new_tokens.unwrap_or(1);
        let batch = shape.batch.unwrap_or(1);
        let heads = shape.heads.unwrap_or(8);
        let heads_kv = shape.kv_heads.unwrap_or(heads);
        let head_dim = shape.head_dim.unwrap_or(64);
        let head_dim_v = shape.head_dim_v.unwrap_or(head_dim);
        let dtype = shape.dtype.unwrap_or(flashattn::DType::F32);
        let seqlen_q = shape.seqlen_q.unwrap_or(new.max(1));
        let capacity = cache_len
            .checked_add(new)
            .filter(|&c| c <= i32::MAX as usize)
            .ok_or_else(|| {
                format!(
                    "--cache-len {cache_len} + --new-tokens {new} does not fit int32 cache lengths"
                )
            })?;
        let page = self.page_size.unwrap_or(capacity.max(1));
        if page == 0 {
            return Err("invalid --page-size 0: pages hold at least 1 row".into());
        }
        let per_seq = capacity.div_ceil(page);
        let positional_q = shape.mask.causal || shape.mask.window.is_some();
        let rotary_positions =
            cache_len.saturating_add(new.max(if positional_q { seqlen_q } else { 1 }));
        // Saturating: an absurd product is refused by the budget, never wraps.
        let mul = |xs: &[usize]| xs.iter().fold(1u128, |a, &x| a.saturating_mul(x as u128));
        let elems = mul(&[
            batch,
            per_seq,
            page,
            heads_kv,
            head_dim.saturating_add(head_dim_v),
        ])
        .saturating_add(mul(&[2, batch, seqlen_q, heads, head_dim]));
        let bytes = mul(&[dtype.size_bytes()])
            .saturating_mul(elems)
            .saturating_add(mul(&[4, batch, per_seq]))
            .saturating_add(mul(&[4, rotary_positions, self.rotary_dim.unwrap_or(0)]));
        budget::check("the KV cache, its tables and q", bytes)?;

        let seqlens = vec![cache_len as i32; batch];
        let mut kv = match self.page_size {
            None => KvCache::contiguous(batch, capacity, seqlens),
            Some(page) => {
                // Page j of sequence b is j * batch + b: sequences that grow together interleave.
                let table = (0..batch * per_seq)
                    .map(|i| ((i % per_seq) * batch + i / per_seq) as i32)
                    .collect();
                KvCache::paged(batch * per_seq, page, table, per_seq, seqlens)
            }
        };
        kv.seqlen_new = new;
        if let Some(dim) = self.rotary_dim {
            kv.rotary = Some(rotary_tables(dim, rotary_positions, !self.rotary_neox));
        }
        let spec = AttentionSpec::new(batch, heads, seqlen_q, 1, head_dim)
            .heads_kv(heads_kv)
            .head_dim_v(head_dim_v)
            .dtype(dtype);
        shape
            .mask
            .apply(spec)
            .kv_cache(kv)
            .build()
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn::CacheLayout;

    fn shape(causal: bool, seqlen_q: Option<usize>) -> ShapeArgs {
        let mut s = ShapeArgs {
            batch: Some(3),
            heads: Some(8),
            kv_heads: Some(2),
            head_dim: Some(32),
            seqlen_q,
            ..ShapeArgs::default()
        };
        s.mask.causal = causal;
        s
    }

    #[test]
    fn paged_caches_hold_distinct_interleaved_pages_and_enough_rotary_positions() {
        let args = CacheArgs {
            new_tokens: Some(2),
            page_size: Some(5),
            rotary_dim: Some(16),
            rotary_neox: true,
            ..CacheArgs::default()
        };
        let spec = args.spec(&shape(true, Some(4)), 37).unwrap();
        let cache = spec.kv_cache.as_ref().unwrap();
        assert_eq!((spec.seqlen_q, cache.seqlen_new), (4, 2));
        assert_eq!(cache.seqlens, vec![37; 3]);
        let CacheLayout::Paged {
            block_table,
            max_blocks,
            num_blocks,
            ..
        } = &cache.layout
        else {
            panic!("not paged: {:?}", cache.layout)
        };
        assert_eq!((*max_blocks, *num_blocks), (8, 24), "39 rows in pages of 5");
        let mut pages = block_table.clone();
        pages.sort_unstable();
        assert_eq!(pages, (0..24).collect::<Vec<i32>>(), "every page once");
        assert_eq!(&block_table[..2], &[0, 3], "sequences interleave");
        let rotary = cache.rotary.as_ref().unwrap();
        assert!(!rotary.interleaved);
        // Causal q rows take positions 37..41.
        assert_eq!(rotary.seqlen(), 41);
    }

    #[test]
    fn query_rows_default_to_the_new_tokens() {
        let args = CacheArgs {
            new_tokens: Some(3),
            ..CacheArgs::default()
        };
        let spec = args.spec(&shape(false, None), 10).unwrap();
        assert_eq!(spec.seqlen_q, 3);
        assert!(matches!(
            spec.kv_cache.unwrap().layout,
            CacheLayout::Contiguous {
                batch_cache: 3,
                seqlen_cache: 13
            }
        ));
        let attend_only = CacheArgs {
            new_tokens: Some(0),
            ..CacheArgs::default()
        };
        assert_eq!(
            attend_only.spec(&shape(false, None), 10).unwrap().seqlen_q,
            1
        );
    }
}
