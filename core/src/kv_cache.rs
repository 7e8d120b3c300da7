//! Decode against a KV cache, with FlashAttention's `flash_attn_with_kvcache` semantics: the
//! cache arguments of one call (`AttentionSpec::kv_cache`), their validation and the cache
//! addressing every backend shares.
//!
//! - Cache `[batch_cache, seqlen_cache, heads_kv, d]` (v: `d_v`), or paged
//!   `[num_blocks, page_size, heads_kv, d]` with a block table `[batch, max_blocks]`.
//! - `seqlens[b]` rows are in use; the call's `seqlen_new` new k/v rows of batch entry `b` are
//!   written at rows `seqlens[b]..` before attending, so attention sees
//!   `seqlens[b] + seqlen_new` keys (causal bottom-right against that length).
//! - Rotary (`cos`, `sin` `[seqlen_ro, dim / 2]`) rotates the new k at positions
//!   `seqlens[b] + i`, and q at `seqlens[b] + i` when causal or windowed, else all of q at
//!   `seqlens[b]` (FlashAttention's rule). Interleaved pairs `(2i, 2i+1)` (GPT-J) or halves
//!   `(i, i + dim/2)` (GPT-NeoX).

use crate::{AttentionSpec, Error, Result};

/// Bytes of K and V one decode step of `spec` reads: the keys any query row of a batch
/// entry sees, in every KV head, k and v rows in the spec's dtype (the bytes a decode
/// benchmark's GB/s and its copy peer count). 0 without a cache. Requires a validated spec.
pub fn decode_bytes(spec: &AttentionSpec) -> u64 {
    let Some(cache) = &spec.kv_cache else {
        return 0;
    };
    let (mask, sq) = (spec.mask(), spec.seqlen_q);
    let keys: u64 = (0..spec.batch)
        .map(|b| mask.keys_of_rows(0..sq, sq, cache.keys(b)).len() as u64)
        .sum();
    let row = (spec.head_dim + spec.head_dim_v) * spec.dtype.size_bytes();
    keys * spec.heads_kv as u64 * row as u64
}

/// Where the cache rows live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheLayout {
    /// `[batch_cache, seqlen_cache, heads_kv, d]`: batch entry `b` uses cache row
    /// `batch_idx[b]` (or `b`).
    Contiguous {
        batch_cache: usize,
        seqlen_cache: usize,
    },
    /// `[num_blocks, page_size, heads_kv, d]`: row `pos` of batch entry `b` is in page
    /// `block_table[b * max_blocks + pos / page_size]`. Any page size from 1 on.
    Paged {
        num_blocks: usize,
        page_size: usize,
        /// `[batch, max_blocks]`, int32 as FlashAttention takes it.
        block_table: Vec<i32>,
        max_blocks: usize,
    },
}

/// Rotary position embedding applied to q and the new k.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotary {
    /// `[seqlen_ro, dim / 2]`.
    pub cos: Vec<f32>,
    /// `[seqlen_ro, dim / 2]`.
    pub sin: Vec<f32>,
    /// Rotary dimension: even, at most `head_dim`; the rest of each head is left as it is.
    pub dim: usize,
    /// `true`: pairs `(2i, 2i+1)` (GPT-J); `false`: halves `(i, i + dim/2)` (GPT-NeoX).
    pub interleaved: bool,
}

impl Rotary {
    /// Positions the tables cover.
    pub fn seqlen(&self) -> usize {
        self.cos.len() / (self.dim / 2).max(1)
    }
}

/// The KV-cache arguments of one decode call.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache {
    pub layout: CacheLayout,
    /// Rows in use per batch entry, before this call's append (`[batch]`, int32).
    pub seqlens: Vec<i32>,
    /// Contiguous caches only: the cache row each batch entry uses (`[batch]`); `None` is `b`.
    pub batch_idx: Option<Vec<i32>>,
    /// New k / v rows per batch entry that this call appends (0: attend only).
    pub seqlen_new: usize,
    pub rotary: Option<Rotary>,
}

impl KvCache {
    /// A contiguous cache `[batch_cache, seqlen_cache, ..]` with `seqlens` rows in use.
    pub fn contiguous(batch_cache: usize, seqlen_cache: usize, seqlens: Vec<i32>) -> KvCache {
        KvCache {
            layout: CacheLayout::Contiguous {
                batch_cache,
                seqlen_cache,
            },
            seqlens,
            batch_idx: None,
            seqlen_new: 0,
            rotary: None,
        }
    }

    /// A paged cache of `num_blocks` pages of `page_size` rows, `block_table` `[batch, max_blocks]`.
    pub fn paged(
        num_blocks: usize,
        page_size: usize,
        block_table: Vec<i32>,
        max_blocks: usize,
        seqlens: Vec<i32>,
    ) -> KvCache {
        KvCache {
            layout: CacheLayout::Paged {
                num_blocks,
                page_size,
                block_table,
                max_blocks,
            },
            seqlens,
            batch_idx: None,
            seqlen_new: 0,
            rotary: None,
        }
    }

    pub fn seqlen_new(mut self, n: usize) -> Self {
        self.seqlen_new = n;
        self
    }

    pub fn batch_idx(mut self, idx: Vec<i32>) -> Self {
        self.batch_idx = Some(idx);
        self
    }

    pub fn rotary(mut self, rotary: Rotary) -> Self {
        self.rotary = Some(rotary);
        self
    }

    /// Rows of the cache buffer: `batch_cache * seqlen_cache` or `num_blocks * page_size`.
    pub fn rows(&self) -> Option<usize> {
        match &self.layout {
            CacheLayout::Contiguous {
                batch_cache,
                seqlen_cache,
            } => batch_cache.checked_mul(*seqlen_cache),
            CacheLayout::Paged {
                num_blocks,
                page_size,
                ..
            } => num_blocks.checked_mul(*page_size),
        }
    }

    /// Rows one sequence can hold.
    pub fn capacity(&self) -> usize {
        match &self.layout {
            CacheLayout::Contiguous { seqlen_cache, .. } => *seqlen_cache,
            CacheLayout::Paged {
                page_size,
                max_blocks,
                ..
            } => page_size.saturating_mul(*max_blocks),
        }
    }

    /// Keys batch entry `b` attends to: its rows in use plus this call's new ones.
    pub fn keys(&self, b: usize) -> usize {
        self.seqlens[b] as usize + self.seqlen_new
    }

    /// The buffer row of position `pos` of batch entry `b`. Requires a validated spec.
    #[inline]
    pub fn row(&self, b: usize, pos: usize) -> usize {
        match &self.layout {
            CacheLayout::Contiguous { seqlen_cache, .. } => {
                let slot = self.batch_idx.as_ref().map_or(b, |idx| idx[b] as usize);
                slot * seqlen_cache + pos
            }
            CacheLayout::Paged {
                page_size,
                block_table,
                max_blocks,
                ..
            } => {
                block_table[b * max_blocks + pos / page_size] as usize * page_size + pos % page_size
            }
        }
    }

    /// Checks the cache arguments for `batch` entries of `head_dim`; `positional_q` is whether q
    /// rows take consecutive rotary positions (causal or windowed) and `seqlen_q` their count.
    pub(crate) fn validate(
        &self,
        batch: usize,
        head_dim: usize,
        seqlen_q: usize,
        positional_q: bool,
    ) -> Result<()> {
        if self.seqlens.len() != batch {
            return Err(Error::invalid(
                "kv_cache.seqlens",
                format!("{} lengths", self.seqlens.len()),
                format!("expected one per batch entry ({batch})"),
            ));
        }
        let capacity = self.capacity();
        for (b, &len) in self.seqlens.iter().enumerate() {
            if len < 0 {
                return Err(Error::invalid(
                    "kv_cache.seqlens",
                    format!("seqlens[{b}] = {len}"),
                    "must be >= 0",
                ));
            }
            if (len as usize).saturating_add(self.seqlen_new) > capacity {
                return Err(Error::invalid(
                    "kv_cache.seqlens",
                    format!("seqlens[{b}] = {len} + {} new", self.seqlen_new),
                    format!("exceeds the cache's {capacity} rows per sequence"),
                ));
            }
        }
        if self.rows().is_none() {
            return Err(Error::invalid(
                "kv_cache.layout",
                format!("{:?}", self.layout),
                "the row count overflows",
            ));
        }
        match &self.layout {
            CacheLayout::Contiguous {
                batch_cache,
                seqlen_cache,
            } => self.validate_contiguous(batch, *batch_cache, *seqlen_cache)?,
            CacheLayout::Paged {
                num_blocks,
                page_size,
                block_table,
                max_blocks,
            } => self.validate_paged(batch, *num_blocks, *page_size, block_table, *max_blocks)?,
        }
        if let Some(r) = &self.rotary {
            self.validate_rotary(r, head_dim, seqlen_q, positional_q)?;
        }
        Ok(())
    }

    /// The contiguous layout's sizes and `batch_idx` (in range; distinct when appending).
    fn validate_contiguous(
        &self,
        batch: usize,
        batch_cache: usize,
        seqlen_cache: usize,
    ) -> Result<()> {
        if batch_cache == 0 || seqlen_cache == 0 {
            return Err(Error::invalid(
                "kv_cache.layout",
                format!("[{batch_cache}, {seqlen_cache}]"),
                "batch_cache and seqlen_cache must be at least 1",
            ));
        }
        match &self.batch_idx {
            None if batch > batch_cache => {
                return Err(Error::invalid(
                    "kv_cache.batch_idx",
                    "none",
                    format!("batch {batch} exceeds batch_cache {batch_cache}: give batch_idx"),
                ))
            }
            None => {}
            Some(idx) => {
                if idx.len() != batch {
                    return Err(Error::invalid(
                        "kv_cache.batch_idx",
                        format!("{} entries", idx.len()),
                        format!("expected one per batch entry ({batch})"),
                    ));
                }
                if let Some((b, &i)) = idx
                    .iter()
                    .enumerate()
                    .find(|(_, &i)| i < 0 || i as usize >= batch_cache)
                {
                    return Err(Error::invalid(
                        "kv_cache.batch_idx",
                        format!("batch_idx[{b}] = {i}"),
                        format!("must be in 0..{batch_cache}"),
                    ));
                }
                if self.seqlen_new > 0 {
                    if let Some(row) = first_repeat(idx) {
                        return Err(Error::invalid(
                            "kv_cache.batch_idx",
                            format!("cache row {row} used twice"),
                            "appending batch entries must write distinct cache rows",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The paged layout's sizes and the pages each sequence of this call uses (in range and
    /// distinct).
    fn validate_paged(
        &self,
        batch: usize,
        num_blocks: usize,
        page_size: usize,
        block_table: &[i32],
        max_blocks: usize,
    ) -> Result<()> {
        if page_size == 0 {
            return Err(Error::invalid(
                "kv_cache.page_size",
                0,
                "must be at least 1",
            ));
        }
        if num_blocks == 0 || max_blocks == 0 {
            return Err(Error::invalid(
                "kv_cache.layout",
                format!("num_blocks {num_blocks}, max_blocks {max_blocks}"),
                "must be at least 1",
            ));
        }
        if self.batch_idx.is_some() {
            return Err(Error::invalid(
                "kv_cache.batch_idx",
                "set",
                "a paged cache addresses sequences through block_table",
            ));
        }
        if Some(block_table.len()) != batch.checked_mul(max_blocks) {
            return Err(Error::invalid(
                "kv_cache.block_table",
                format!("{} entries", block_table.len()),
                format!("expected [batch = {batch}, max_blocks = {max_blocks}]"),
            ));
        }
        for b in 0..batch {
            // Only the pages that hold rows of this call are read or written.
            let used = (self.seqlens[b] as usize + self.seqlen_new).div_ceil(page_size);
            let pages = &block_table[b * max_blocks..b * max_blocks + used];
            if let Some((p, &blk)) = pages
                .iter()
                .enumerate()
                .find(|(_, &x)| x < 0 || x as usize >= num_blocks)
            {
                return Err(Error::invalid(
                    "kv_cache.block_table",
                    format!("block_table[{b}][{p}] = {blk}"),
                    format!("must be in 0..{num_blocks}"),
                ));
            }
            if let Some(page) = first_repeat(pages) {
                return Err(Error::invalid(
                    "kv_cache.block_table",
                    format!("page {page} twice in sequence {b}"),
                    "a sequence's pages must be distinct",
                ));
            }
        }
        Ok(())
    }

    /// The rotary tables: new rows to rotate, an even dim within head_dim, finite cos/sin
    /// covering every rotated position.
    fn validate_rotary(
        &self,
        r: &Rotary,
        head_dim: usize,
        seqlen_q: usize,
        positional_q: bool,
    ) -> Result<()> {
        if self.seqlen_new == 0 {
            return Err(Error::invalid(
                "kv_cache.rotary",
                "set",
                "rotary applies to new k/v rows (FlashAttention's rule): seqlen_new is 0",
            ));
        }
        if r.dim == 0 || !r.dim.is_multiple_of(2) || r.dim > head_dim {
            return Err(Error::invalid(
                "kv_cache.rotary.dim",
                r.dim,
                format!("must be even and between 2 and head_dim ({head_dim})"),
            ));
        }
        let half = r.dim / 2;
        if r.cos.len() != r.sin.len() || !r.cos.len().is_multiple_of(half) {
            return Err(Error::invalid(
                "kv_cache.rotary.cos",
                format!("{} cos and {} sin values", r.cos.len(), r.sin.len()),
                format!("expected two [seqlen_ro, {half}] tables"),
            ));
        }
        if let Some(x) = r.cos.iter().chain(&r.sin).find(|x| !x.is_finite()) {
            return Err(Error::invalid(
                "kv_cache.rotary.cos",
                x,
                "cos/sin values must be finite",
            ));
        }
        let q_span = if positional_q { seqlen_q } else { 1 };
        let needed = self
            .seqlens
            .iter()
            .map(|&l| (l as usize).saturating_add(self.seqlen_new.max(q_span)))
            .max()
            .unwrap_or(0);
        if r.seqlen() < needed {
            return Err(Error::invalid(
                "kv_cache.rotary.cos",
                format!("{} positions", r.seqlen()),
                format!("positions up to {} are rotated", needed.saturating_sub(1)),
            ));
        }
        Ok(())
    }
}

/// The smallest value that occurs twice in `values`, if any.
fn first_repeat(values: &[i32]) -> Option<i32> {
    let mut seen = values.to_vec();
    seen.sort_unstable();
    seen.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_bytes_counts_the_keys_rows_see() {
        // 2 entries with 10 and 3 rows in use + 2 new; bf16, 2 KV heads, d 8, dv 4.
        let cache = KvCache::contiguous(2, 16, vec![10, 3]).seqlen_new(2);
        let spec = AttentionSpec::new(2, 4, 1, 1, 8)
            .heads_kv(2)
            .head_dim_v(4)
            .dtype(crate::DType::Bf16)
            .kv_cache(cache);
        assert_eq!(decode_bytes(&spec), (12 + 5) * 2 * (8 + 4) * 2);
        // A window of 3 left keys: 4 keys each.
        assert_eq!(
            decode_bytes(&spec.clone().window(3, -1)),
            (4 + 4) * 2 * (8 + 4) * 2
        );
        assert_eq!(decode_bytes(&AttentionSpec::new(1, 1, 1, 1, 8)), 0);
    }
}
