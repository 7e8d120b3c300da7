//! The KV cache handle that serving loops hold between decode steps: its configuration, the
//! bookkeeping every backend's handle shares (rows in use, pages handed out), and the trait
//! each backend's device-resident handle implements.
//!
//! A step appends the same number of new rows to every sequence (FlashAttention's
//! `k_new: [batch, seqlen_new, ..]`) and attends. The state builds the step's `KvCache`
//! arguments, reserving pages as sequences grow; lengths change only once the backend
//! reports success, so a failed step leaves the cache exactly as it was.

use crate::{
    Alibi, AttentionSpec, DType, Error, KvCache, Output, Result, Rotary, Tensor, TensorRef,
};

/// Shape of a KV cache handle.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    /// Sequences (batch entries) the cache holds.
    pub batch: usize,
    /// Rows each sequence can hold.
    pub capacity: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub dtype: DType,
    /// `Some(page_size)`: paged, `[num_blocks, page_size, heads_kv, d]` with pages handed out
    /// as sequences grow; `None`: contiguous `[batch, capacity, heads_kv, d]`.
    pub page_size: Option<usize>,
}

impl CacheConfig {
    /// A contiguous cache of `batch` sequences of up to `capacity` rows.
    pub fn contiguous(batch: usize, capacity: usize, heads_kv: usize, head_dim: usize) -> Self {
        CacheConfig {
            batch,
            capacity,
            heads_kv,
            head_dim,
            head_dim_v: head_dim,
            dtype: DType::F32,
            page_size: None,
        }
    }

    /// The same cache, paged with `page_size` rows per page (any size from 1 on).
    pub fn paged(mut self, page_size: usize) -> Self {
        self.page_size = Some(page_size);
        self
    }

    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn head_dim_v(mut self, head_dim_v: usize) -> Self {
        self.head_dim_v = head_dim_v;
        self
    }

    /// Pages per sequence and in all (paged), or 0.
    fn pages(&self) -> (usize, usize) {
        match self.page_size {
            Some(p) if p > 0 => {
                let per_seq = self.capacity.div_ceil(p);
                (per_seq, per_seq.saturating_mul(self.batch))
            }
            _ => (0, 0),
        }
    }
}

/// The attention options of one decode step: everything of an [`AttentionSpec`] that is not
/// the cache's (which the handle fills in).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeStep {
    pub heads_q: usize,
    /// New query rows per sequence.
    pub seqlen_q: usize,
    pub scale: Option<f32>,
    pub causal: bool,
    pub window: (i64, i64),
    pub softcap: f32,
    pub alibi: Option<Alibi>,
    pub rotary: Option<Rotary>,
    pub return_lse: bool,
}

impl DecodeStep {
    /// One query row per sequence, `heads_q` query heads, causal, no other mask or modifier.
    pub fn new(heads_q: usize) -> DecodeStep {
        DecodeStep {
            heads_q,
            seqlen_q: 1,
            scale: None,
            causal: true,
            window: (-1, -1),
            softcap: 0.0,
            alibi: None,
            rotary: None,
            return_lse: false,
        }
    }
}

/// Rows in use and page ownership of a KV cache handle.
#[derive(Clone, Debug)]
pub struct CacheState {
    config: CacheConfig,
    seqlens: Vec<i32>,
    /// `[batch, max_blocks]`; -1 where no page is assigned yet (paged only).
    block_table: Vec<i32>,
    /// Pages no sequence holds, handed out from the end.
    free_pages: Vec<i32>,
}

impl CacheState {
    /// Validates `config`; the error names the bad field.
    pub fn new(config: CacheConfig) -> Result<CacheState> {
        let c = &config;
        for (field, v) in [
            ("cache.batch", c.batch),
            ("cache.capacity", c.capacity),
            ("cache.heads_kv", c.heads_kv),
        ] {
            if v == 0 {
                return Err(Error::argument(field, 0, "must be at least 1"));
            }
        }
        for (field, v) in [
            ("cache.head_dim", c.head_dim),
            ("cache.head_dim_v", c.head_dim_v),
        ] {
            if v == 0 || v > crate::MAX_HEAD_DIM {
                return Err(Error::argument(
                    field,
                    v,
                    format!("must be between 1 and {}", crate::MAX_HEAD_DIM),
                ));
            }
        }
        if c.page_size == Some(0) {
            return Err(Error::argument("cache.page_size", 0, "must be at least 1"));
        }
        if c.capacity > i32::MAX as usize {
            return Err(Error::argument(
                "cache.capacity",
                c.capacity,
                "must fit in int32",
            ));
        }
        let (per_seq, total) = c.pages();
        if total > i32::MAX as usize {
            return Err(Error::argument(
                "cache.page_size",
                format!("{:?}", c.page_size),
                "too many pages for int32 block tables",
            ));
        }
        let rows = c.batch.checked_mul(
            c.capacity
                .max(total.saturating_mul(c.page_size.unwrap_or(0))),
        );
        let elems = rows
            .and_then(|r| r.checked_mul(c.heads_kv))
            .and_then(|r| r.checked_mul(c.head_dim.max(c.head_dim_v)))
            .and_then(|e| e.checked_mul(c.dtype.size_bytes()));
        if elems.is_none() {
            return Err(Error::argument(
                "cache.capacity",
                c.capacity,
                "the cache's size overflows",
            ));
        }
        Ok(CacheState {
            seqlens: vec![0; c.batch],
            block_table: vec![-1; per_seq * c.batch],
            free_pages: (0..total as i32).rev().collect(),
            config,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Rows in use per sequence.
    pub fn seqlens(&self) -> &[i32] {
        &self.seqlens
    }

    /// Rows per sequence in `k_new` (`[batch, seqlen_new, heads_kv, head_dim]`), which must
    /// come with `v_new` of the same rows.
    pub fn seqlen_new(
        &self,
        k_new: Option<&TensorRef<'_>>,
        v_new: Option<&TensorRef<'_>>,
    ) -> Result<usize> {
        let c = &self.config;
        let per_row = c.batch * c.heads_kv * c.head_dim;
        match (k_new, v_new) {
            (None, None) => Ok(0),
            (Some(k), Some(_)) if k.len().is_multiple_of(per_row) => Ok(k.len() / per_row),
            (Some(k), Some(_)) => Err(Error::argument(
                "k_new",
                format!("{} elements", k.len()),
                format!(
                    "expected [batch = {}, seqlen_new, heads_kv = {}, head_dim = {}]",
                    c.batch, c.heads_kv, c.head_dim
                ),
            )),
            (k, _) => Err(Error::argument(
                if k.is_some() { "v_new" } else { "k_new" },
                "none",
                "new k and v rows come together",
            )),
        }
    }

    /// The step of an append without attention (attention options do not matter; one query
    /// head per KV head) and the element count of its placeholder q.
    pub fn append_step(&self) -> (DecodeStep, usize) {
        let c = &self.config;
        let step = DecodeStep {
            causal: false,
            ..DecodeStep::new(c.heads_kv)
        };
        (step, c.batch * c.heads_kv * c.head_dim)
    }

    /// Rows of the k / v buffers the backend allocates (`[rows, heads_kv, d]`).
    pub fn buffer_rows(&self) -> usize {
        let c = &self.config;
        match c.page_size {
            Some(p) => c.pages().1 * p,
            None => c.batch * c.capacity,
        }
    }

    /// The decode spec of a step appending `seqlen_new` rows to every sequence (pages it needs
    /// assigned). Nothing changes until [`commit`](Self::commit).
    pub fn spec(&self, step: &DecodeStep, seqlen_new: usize) -> Result<AttentionSpec> {
        let c = &self.config;
        if let Some((b, &len)) = self
            .seqlens
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize + seqlen_new > c.capacity)
        {
            return Err(Error::argument(
                "seqlen_new",
                seqlen_new,
                format!(
                    "sequence {b} holds {len} of {} rows: the append overflows it",
                    c.capacity
                ),
            ));
        }
        let mut cache = match c.page_size {
            None => KvCache::contiguous(c.batch, c.capacity, self.seqlens.clone()),
            Some(page) => {
                let (per_seq, total) = c.pages();
                // Unassigned entries are never read; 0 keeps them in range.
                let table = self.allocate(seqlen_new).0.into_iter().map(|x| x.max(0));
                KvCache::paged(total, page, table.collect(), per_seq, self.seqlens.clone())
            }
        };
        cache.seqlen_new = seqlen_new;
        cache.rotary = step.rotary.clone();
        let mut spec = AttentionSpec::new(c.batch, step.heads_q, step.seqlen_q, 1, c.head_dim)
            .heads_kv(c.heads_kv)
            .head_dim_v(c.head_dim_v)
            .dtype(c.dtype)
            .causal(step.causal)
            .window(step.window.0, step.window.1)
            .softcap(step.softcap)
            .return_lse(step.return_lse)
            .kv_cache(cache);
        spec.scale = step.scale;
        spec.alibi = step.alibi.clone();
        spec.validate()?;
        Ok(spec)
    }

    /// The block table and free list after giving every sequence the pages that
    /// `seqlen_new` more rows need (deterministic: `spec` and `commit` agree).
    fn allocate(&self, seqlen_new: usize) -> (Vec<i32>, Vec<i32>) {
        let (mut table, mut free) = (self.block_table.clone(), self.free_pages.clone());
        if let Some(page) = self.config.page_size {
            let (per_seq, _) = self.config.pages();
            for (b, &len) in self.seqlens.iter().enumerate() {
                let needed = (len as usize + seqlen_new).div_ceil(page).min(per_seq);
                for slot in &mut table[b * per_seq..b * per_seq + needed] {
                    if *slot < 0 {
                        // There are as many pages as sequences x pages per sequence.
                        *slot = free.pop().unwrap_or(0);
                    }
                }
            }
        }
        (table, free)
    }

    /// Records a successful append of `seqlen_new` rows to every sequence.
    pub fn commit(&mut self, seqlen_new: usize) {
        (self.block_table, self.free_pages) = self.allocate(seqlen_new);
        for l in &mut self.seqlens {
            *l += seqlen_new as i32;
        }
    }

    /// Empties sequence `seq` (its pages go back to the free list).
    pub fn reset(&mut self, seq: usize) -> Result<()> {
        if seq >= self.config.batch {
            return Err(Error::argument(
                "seq",
                seq,
                format!("the cache holds {} sequences", self.config.batch),
            ));
        }
        self.seqlens[seq] = 0;
        let (per_seq, _) = self.config.pages();
        for slot in &mut self.block_table[seq * per_seq..(seq + 1) * per_seq] {
            if *slot >= 0 {
                self.free_pages.push(*slot);
                *slot = -1;
            }
        }
        Ok(())
    }
}

/// The host tensors of one cache step.
pub struct StepInputs<'a> {
    /// The query rows; a zero placeholder of the right size when only appending.
    pub q: TensorRef<'a>,
    pub k_new: Option<TensorRef<'a>>,
    pub v_new: Option<TensorRef<'a>>,
    /// false: append the new rows only (a prefill), no attention and no output.
    pub attend: bool,
}

/// What a backend's KV cache supplies besides [`KvCacheHandle::read`] and `state`: one
/// step on its buffers. The bookkeeping around a step is `KvCacheHandle`'s, the same for
/// every backend.
pub trait CacheBuffers {
    fn cache_state_mut(&mut self) -> &mut CacheState;

    /// Runs the decode `spec` (built by the state) on the buffers: appends the new rows and,
    /// when attending, attends with q. Returns the output when attending; leaves the state
    /// alone.
    fn run_step(&mut self, spec: &AttentionSpec, io: StepInputs<'_>) -> Result<Option<Output>>;

    /// The backend's name, for errors.
    fn backend_name(&self) -> &'static str;
}

/// A KV cache living on one backend's device between decode steps. A step builds its spec
/// from the state, runs on the buffers, and commits only on success, so a refused step
/// leaves the cache exactly as it was.
pub trait KvCacheHandle: CacheBuffers {
    /// The whole k and v buffers, read back to the host (`[buffer_rows, heads_kv, d]`).
    fn read(&self) -> Result<(Tensor, Tensor)>;

    fn state(&self) -> &CacheState;

    /// Appends `seqlen_new` rows per sequence (`k_new` / `v_new` `[batch, seqlen_new, heads_kv, d]`)
    /// and attends with `q` `[batch, step.seqlen_q, heads_q, d]`. Only the new rows and q move
    /// to the device. On error the cache is unchanged.
    fn decode(
        &mut self,
        step: &DecodeStep,
        q: TensorRef<'_>,
        k_new: Option<TensorRef<'_>>,
        v_new: Option<TensorRef<'_>>,
    ) -> Result<Output> {
        let io = StepInputs {
            q,
            k_new,
            v_new,
            attend: true,
        };
        run_and_commit(self, step, io)?
            .ok_or_else(|| Error::backend(self.backend_name(), "decode produced no output"))
    }

    /// Appends rows without attending (prefill of a prompt into the cache).
    fn append(&mut self, k_new: TensorRef<'_>, v_new: TensorRef<'_>) -> Result<()> {
        let (step, n) = self.state().append_step();
        let q = Tensor::zeros(self.state().config().dtype, n);
        let io = StepInputs {
            q: q.as_ref(),
            k_new: Some(k_new),
            v_new: Some(v_new),
            attend: false,
        };
        run_and_commit(self, &step, io).map(|_| ())
    }

    /// Empties sequence `seq`.
    fn reset(&mut self, seq: usize) -> Result<()> {
        self.cache_state_mut().reset(seq)
    }
}

/// Builds the spec of a step appending `io`'s new rows, runs it, and commits on success.
fn run_and_commit<C: KvCacheHandle + ?Sized>(
    cache: &mut C,
    step: &DecodeStep,
    io: StepInputs<'_>,
) -> Result<Option<Output>> {
    let state = cache.state();
    let new = state.seqlen_new(io.k_new.as_ref(), io.v_new.as_ref())?;
    let spec = state.spec(step, new)?;
    let out = cache.run_step(&spec, io)?;
    cache.cache_state_mut().commit(new);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_handed_out_as_sequences_grow_and_freed_on_reset() {
        let mut s = CacheState::new(CacheConfig::contiguous(2, 10, 1, 4).paged(3)).unwrap();
        assert_eq!(s.buffer_rows(), 2 * 4 * 3);
        let step = DecodeStep::new(1);
        let spec = s.spec(&step, 4).unwrap();
        assert_eq!(s.seqlens(), &[0, 0], "nothing changes before commit");
        s.commit(4);
        let table = match &spec.kv_cache.as_ref().unwrap().layout {
            crate::CacheLayout::Paged { block_table, .. } => block_table.clone(),
            _ => unreachable!(),
        };
        // Two pages each, distinct.
        assert_eq!(&table[..2], &[0, 1]);
        assert_eq!(&table[4..6], &[2, 3]);
        assert_eq!(s.seqlens(), &[4, 4]);
        s.reset(0).unwrap();
        assert_eq!(s.seqlens(), &[0, 4]);
        // The freed pages are reused.
        let spec = s.spec(&step, 6).unwrap();
        assert!(spec.validate().is_ok());
        assert!(
            s.spec(&step, 7).is_err(),
            "sequence 1 would hold 11 > 10 rows"
        );
        assert!(s.reset(2).is_err());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = CacheState::new(CacheConfig::contiguous(1, 10, 1, 4).paged(0)).unwrap_err();
        assert!(e.to_string().contains("cache.page_size"), "{e}");
        let e = CacheState::new(CacheConfig::contiguous(1, 0, 1, 4)).unwrap_err();
        assert!(e.to_string().contains("cache.capacity"), "{e}");
        let e = CacheState::new(CacheConfig::contiguous(usize::MAX, 1 << 20, 8, 128)).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
    }
}
