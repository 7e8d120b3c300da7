//! `AttentionSpec`: the whole description of one attention forward problem, and its validation.

use crate::{CheckedSpec, DType, Error, KvCache, Mask, Result};
use std::fmt;

/// Largest head dimension any backend accepts (FlashAttention's limit).
pub const MAX_HEAD_DIM: usize = 256;

/// ALiBi slopes: one per query head, or one per (batch, query head).
#[derive(Clone, Debug, PartialEq)]
pub struct Alibi {
    pub slopes: Vec<f32>,
    /// `true`: `slopes` is `[batch, heads_q]`; `false`: `[heads_q]`.
    pub per_batch: bool,
}

/// Variable-length batches packed as `[total_tokens, heads, head_dim]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Varlen {
    /// Token offsets of each sequence of q; length batch + 1, starts at 0.
    pub cu_seqlens_q: Vec<i32>,
    /// Token offsets of each sequence of k and v; length batch + 1, starts at 0.
    pub cu_seqlens_k: Vec<i32>,
}

/// FP8 descales, each `[batch, heads_kv]`: the real value is the stored value times its descale.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Descale {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// One attention forward problem, with FlashAttention's semantics (see docs/ARCHITECTURE.md).
///
/// Dense layout: q `[batch, seqlen_q, heads_q, head_dim]`, k `[batch, seqlen_k, heads_kv, head_dim]`,
/// v `[batch, seqlen_k, heads_kv, head_dim_v]`, out `[batch, seqlen_q, heads_q, head_dim_v]`,
/// lse `[batch, heads_q, seqlen_q]`.
/// With a KV cache (`kv_cache`), k and v are the cache buffers (see [`KvCache`]), batch entry
/// `b` attends to `kv_cache.keys(b)` keys, and `seqlen_k` is the cache's rows per sequence.
/// Varlen layout: `seqlen_q` / `seqlen_k` are the total token counts, q `[total_q, heads_q, head_dim]`
/// and so on, lse `[heads_q, total_q]` (as FlashAttention's varlen API returns it).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionSpec {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub dtype: DType,
    /// Softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Bottom-right aligned causal mask: key j visible iff `j <= i + seqlen_k - seqlen_q`.
    pub causal: bool,
    /// Sliding window `(left, right)`; -1 is unbounded.
    pub window: (i64, i64),
    pub alibi: Option<Alibi>,
    /// Softcap `c`: scores become `c * tanh(s / c)`; 0 is off.
    pub softcap: f32,
    pub varlen: Option<Varlen>,
    pub return_lse: bool,
    pub fp8_descale: Option<Fp8Descale>,
    /// Backward: bitwise-reproducible gradients are required. The CPU and wgpu backends are
    /// always deterministic; CUDA then uses a fixed-order dq reduction instead of atomics.
    pub deterministic: bool,
    /// Decode against a KV cache (FlashAttention's `flash_attn_with_kvcache`).
    pub kv_cache: Option<KvCache>,
    pub strides: crate::InputStrides,
}

/// Where one sequence of the batch lies, in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqBounds {
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub k_len: usize,
}

impl AttentionSpec {
    /// A dense, unmasked f32 problem with `heads` query and key/value heads.
    pub fn new(
        batch: usize,
        heads: usize,
        seqlen_q: usize,
        seqlen_k: usize,
        head_dim: usize,
    ) -> Self {
        AttentionSpec {
            batch,
            heads_q: heads,
            heads_kv: heads,
            seqlen_q,
            seqlen_k,
            head_dim,
            head_dim_v: head_dim,
            dtype: DType::F32,
            scale: None,
            causal: false,
            window: (-1, -1),
            alibi: None,
            softcap: 0.0,
            varlen: None,
            return_lse: false,
            fp8_descale: None,
            deterministic: false,
            kv_cache: None,
            strides: crate::InputStrides::default(),
        }
    }

    pub fn heads_kv(mut self, heads_kv: usize) -> Self {
        self.heads_kv = heads_kv;
        self
    }
    pub fn head_dim_v(mut self, head_dim_v: usize) -> Self {
        self.head_dim_v = head_dim_v;
        self
    }
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn window(mut self, left: i64, right: i64) -> Self {
        self.window = (left, right);
        self
    }
    pub fn alibi(mut self, slopes: Vec<f32>, per_batch: bool) -> Self {
        self.alibi = Some(Alibi { slopes, per_batch });
        self
    }
    pub fn softcap(mut self, softcap: f32) -> Self {
        self.softcap = softcap;
        self
    }
    pub fn return_lse(mut self, return_lse: bool) -> Self {
        self.return_lse = return_lse;
        self
    }
    pub fn fp8_descale(mut self, descale: Fp8Descale) -> Self {
        self.fp8_descale = Some(descale);
        self
    }
    pub fn deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }
    /// Decodes against a KV cache; `seqlen_k` becomes the cache's rows per sequence.
    pub fn kv_cache(mut self, cache: KvCache) -> Self {
        self.seqlen_k = cache.capacity();
        self.kv_cache = Some(cache);
        self
    }
    /// Packs variable-length sequences: `seqlen_q` / `seqlen_k` become the total token counts
    /// and `batch` becomes `cu_seqlens_q.len() - 1`.
    pub fn varlen(mut self, cu_seqlens_q: Vec<i32>, cu_seqlens_k: Vec<i32>) -> Self {
        self.batch = cu_seqlens_q.len().saturating_sub(1);
        self.varlen = Some(Varlen {
            cu_seqlens_q,
            cu_seqlens_k,
        });
        self
    }

    /// Validates and returns the spec.
    pub fn build(self) -> Result<Self> {
        self.validate()?;
        Ok(self)
    }

    /// Checks every field (the error names the first bad field and its value) and returns the
    /// checked spec, with its sizes as plain numbers, that backends pass down.
    pub fn validate(&self) -> Result<CheckedSpec<'_>> {
        self.validate_fields()?;
        CheckedSpec::new(self)
    }

    fn validate_fields(&self) -> Result<()> {
        positive("batch", self.batch)?;
        positive("heads_q", self.heads_q)?;
        positive("heads_kv", self.heads_kv)?;
        positive("seqlen_q", self.seqlen_q)?;
        if self.kv_cache.is_none() {
            // With a cache, seqlen_k is the cache's capacity (checked with the cache).
            positive("seqlen_k", self.seqlen_k)?;
        }
        head_dim_ok("head_dim", self.head_dim)?;
        head_dim_ok("head_dim_v", self.head_dim_v)?;
        if !self.heads_q.is_multiple_of(self.heads_kv) {
            return Err(Error::invalid(
                "heads_kv",
                self.heads_kv,
                format!("heads_q ({}) must be a multiple of heads_kv", self.heads_q),
            ));
        }
        for (name, w) in [
            ("window.left", self.window.0),
            ("window.right", self.window.1),
        ] {
            if w < -1 {
                return Err(Error::invalid(name, w, "must be -1 (unbounded) or >= 0"));
            }
        }
        if let Some(scale) = self.scale {
            if !scale.is_finite() || scale <= 0.0 {
                return Err(Error::invalid("scale", scale, "must be finite and > 0"));
            }
        }
        if !self.softcap.is_finite() || self.softcap < 0.0 {
            return Err(Error::invalid(
                "softcap",
                self.softcap,
                "must be finite and > 0 (or 0 for off)",
            ));
        }
        // Products of sizes below must not overflow, whatever the public fields hold.
        if self.batch.checked_mul(self.heads_q).is_none() {
            return Err(Error::invalid(
                "shape",
                self.shape_string(),
                "batch x heads_q overflows",
            ));
        }
        self.validate_alibi()?;
        self.validate_varlen()?;
        self.validate_fp8()?;
        if let Some(cache) = &self.kv_cache {
            if self.varlen.is_some() {
                return Err(Error::invalid(
                    "kv_cache",
                    "set",
                    "a KV cache takes dense q ([batch, seqlen_q, ..]), not varlen",
                ));
            }
            let positional_q = self.causal || self.window != (-1, -1);
            cache.validate(self.batch, self.head_dim, self.seqlen_q, positional_q)?;
        }
        Ok(())
    }

    fn validate_alibi(&self) -> Result<()> {
        let Some(alibi) = &self.alibi else {
            return Ok(());
        };
        let expected = if alibi.per_batch {
            self.batch.checked_mul(self.heads_q)
        } else {
            Some(self.heads_q)
        };
        if expected != Some(alibi.slopes.len()) {
            let shape = if alibi.per_batch {
                format!("[batch={}, heads_q={}]", self.batch, self.heads_q)
            } else {
                format!("[heads_q={}]", self.heads_q)
            };
            return Err(Error::invalid(
                "alibi.slopes",
                format!("{} slopes", alibi.slopes.len()),
                format!("expected {shape}"),
            ));
        }
        if let Some((i, s)) = alibi
            .slopes
            .iter()
            .enumerate()
            .find(|(_, s)| !s.is_finite())
        {
            return Err(Error::invalid(
                "alibi.slopes",
                format!("slopes[{i}] = {s}"),
                "must be finite",
            ));
        }
        Ok(())
    }

    fn validate_varlen(&self) -> Result<()> {
        let Some(varlen) = &self.varlen else {
            return Ok(());
        };
        for (name, cu, total) in [
            ("cu_seqlens_q", &varlen.cu_seqlens_q, self.seqlen_q),
            ("cu_seqlens_k", &varlen.cu_seqlens_k, self.seqlen_k),
        ] {
            if cu.len() != self.batch.saturating_add(1) {
                return Err(Error::invalid(
                    name,
                    format!("{} offsets", cu.len()),
                    format!("expected batch + 1 = {}", self.batch.saturating_add(1)),
                ));
            }
            if cu[0] != 0 {
                return Err(Error::invalid(
                    name,
                    format!("{name}[0] = {}", cu[0]),
                    "must start at 0",
                ));
            }
            if let Some(i) = (1..cu.len()).find(|&i| cu[i] < cu[i - 1]) {
                return Err(Error::invalid(
                    name,
                    format!(
                        "{name}[{i}] = {} < {name}[{}] = {}",
                        cu[i],
                        i - 1,
                        cu[i - 1]
                    ),
                    "offsets must not decrease",
                ));
            }
            let last = *cu.last().unwrap_or(&0);
            if last as usize > total {
                return Err(Error::invalid(
                    name,
                    format!("{name}[{}] = {last}", cu.len() - 1),
                    format!("exceeds the total token count {total}"),
                ));
            }
        }
        Ok(())
    }

    fn validate_fp8(&self) -> Result<()> {
        let Some(descale) = &self.fp8_descale else {
            return Ok(());
        };
        if self.dtype != DType::Fp8E4m3 {
            return Err(Error::invalid(
                "fp8_descale",
                "set",
                format!("descales apply to fp8e4m3 inputs only, not {}", self.dtype),
            ));
        }
        let expected = self.batch.saturating_mul(self.heads_kv);
        for (name, d) in [
            ("fp8_descale.q", &descale.q),
            ("fp8_descale.k", &descale.k),
            ("fp8_descale.v", &descale.v),
        ] {
            if d.len() != expected {
                return Err(Error::invalid(
                    name,
                    format!("{} values", d.len()),
                    format!("expected [batch, heads_kv] = {expected}"),
                ));
            }
            if let Some(x) = d.iter().find(|x| !x.is_finite() || **x <= 0.0) {
                return Err(Error::invalid(name, x, "descales must be finite and > 0"));
            }
        }
        Ok(())
    }

    /// The softmax scale in use.
    pub fn scale_value(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// The key/value head that query head `h` reads.
    pub fn kv_head(&self, h: usize) -> usize {
        h / self.group_size()
    }

    pub fn is_varlen(&self) -> bool {
        self.varlen.is_some()
    }

    /// Tokens of q in the buffer (batch * seqlen_q dense, total_q varlen).
    pub fn q_tokens(&self) -> Option<usize> {
        if self.is_varlen() {
            Some(self.seqlen_q)
        } else {
            self.batch.checked_mul(self.seqlen_q)
        }
    }

    /// Rows of k / v in the buffer (batch * seqlen_k dense, total_k varlen, the cache's rows).
    pub fn k_tokens(&self) -> Option<usize> {
        if let Some(cache) = &self.kv_cache {
            return cache.rows();
        }
        if self.is_varlen() {
            Some(self.seqlen_k)
        } else {
            self.batch.checked_mul(self.seqlen_k)
        }
    }

    pub fn q_elems(&self) -> Option<usize> {
        self.q_tokens()?
            .checked_mul(self.heads_q)?
            .checked_mul(self.head_dim)
    }
    pub fn k_elems(&self) -> Option<usize> {
        self.k_tokens()?
            .checked_mul(self.heads_kv)?
            .checked_mul(self.head_dim)
    }
    pub fn v_elems(&self) -> Option<usize> {
        self.k_tokens()?
            .checked_mul(self.heads_kv)?
            .checked_mul(self.head_dim_v)
    }
    pub fn out_elems(&self) -> Option<usize> {
        self.q_tokens()?
            .checked_mul(self.heads_q)?
            .checked_mul(self.head_dim_v)
    }
    pub fn lse_elems(&self) -> Option<usize> {
        self.q_tokens()?.checked_mul(self.heads_q)
    }
    /// Elements of the new k rows a decode call appends (`[batch, seqlen_new, heads_kv, d]`).
    pub fn k_new_elems(&self) -> Option<usize> {
        let new = self.kv_cache.as_ref().map_or(0, |c| c.seqlen_new);
        self.batch
            .checked_mul(new)?
            .checked_mul(self.heads_kv)?
            .checked_mul(self.head_dim)
    }
    pub fn v_new_elems(&self) -> Option<usize> {
        let new = self.kv_cache.as_ref().map_or(0, |c| c.seqlen_new);
        self.batch
            .checked_mul(new)?
            .checked_mul(self.heads_kv)?
            .checked_mul(self.head_dim_v)
    }

    /// Token ranges of sequence `b`. Requires a validated spec. With a KV cache, `k_start` is 0
    /// and rows are found through [`KvCache::row`].
    pub fn seq(&self, b: usize) -> SeqBounds {
        if let Some(cache) = &self.kv_cache {
            return SeqBounds {
                q_start: b * self.seqlen_q,
                q_len: self.seqlen_q,
                k_start: 0,
                k_len: cache.keys(b),
            };
        }
        match &self.varlen {
            Some(v) => {
                let (q0, q1) = (v.cu_seqlens_q[b] as usize, v.cu_seqlens_q[b + 1] as usize);
                let (k0, k1) = (v.cu_seqlens_k[b] as usize, v.cu_seqlens_k[b + 1] as usize);
                SeqBounds {
                    q_start: q0,
                    q_len: q1 - q0,
                    k_start: k0,
                    k_len: k1 - k0,
                }
            }
            None => SeqBounds {
                q_start: b * self.seqlen_q,
                q_len: self.seqlen_q,
                k_start: b * self.seqlen_k,
                k_len: self.seqlen_k,
            },
        }
    }

    /// Whether every sequence has `seqlen_q` queries and `seqlen_k` keys (no varlen, no cache).
    pub fn is_uniform(&self) -> bool {
        self.varlen.is_none() && self.kv_cache.is_none()
    }

    /// The longest sequence of the batch: (queries, keys). Requires a validated spec.
    pub fn max_lens(&self) -> (usize, usize) {
        if self.is_uniform() {
            return (self.seqlen_q, self.seqlen_k);
        }
        (0..self.batch)
            .map(|b| self.seq(b))
            .fold((0, 0), |(q, k), s| (q.max(s.q_len), k.max(s.k_len)))
    }

    /// Index into lse of row `i` of sequence `b`, query head `h`.
    pub fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        if self.is_varlen() {
            h * self.seqlen_q + self.seq(b).q_start + i
        } else {
            (b * self.heads_q + h) * self.seqlen_q + i
        }
    }

    /// ALiBi slope of (batch b, query head h); 0 without ALiBi.
    pub fn alibi_slope(&self, b: usize, h: usize) -> f32 {
        match &self.alibi {
            Some(a) if a.per_batch => a.slopes[b * self.heads_q + h],
            Some(a) => a.slopes[h],
            None => 0.0,
        }
    }

    /// The causal / window mask, with window bounds longer than any sequence dropped.
    pub fn mask(&self) -> Mask {
        let longest = (self.seqlen_q as u64).saturating_add(self.seqlen_k as u64);
        Mask::new(self.window, self.causal, longest)
    }

    /// Pairs (query, key) the mask leaves visible, summed over the batch and query heads
    /// (closed form per sequence). Requires a validated spec.
    pub fn visible_pairs(&self) -> u128 {
        let mask = self.mask();
        if self.is_uniform() {
            let per_seq = mask.visible_pairs(self.seqlen_q, self.seqlen_k);
            return per_seq * self.batch as u128 * self.heads_q as u128;
        }
        let pairs: u128 = (0..self.batch)
            .map(|b| {
                let s = self.seq(b);
                mask.visible_pairs(s.q_len, s.k_len)
            })
            .sum();
        pairs * self.heads_q as u128
    }

    /// Floating-point operations of the forward pass: 2*d for Q·K^T and 2*dv for P·V per visible pair.
    pub fn flops(&self) -> f64 {
        self.visible_pairs() as f64 * 2.0 * (self.head_dim + self.head_dim_v) as f64
    }

    /// Floating-point operations of the backward pass: 2.5 x the forward's (FlashAttention's).
    pub fn backward_flops(&self) -> f64 {
        2.5 * self.flops()
    }

    /// A short one-line description for logs and benchmark records.
    pub fn shape_string(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for AttentionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "b={} hq={} hkv={} sq={} sk={} d={}",
            self.batch, self.heads_q, self.heads_kv, self.seqlen_q, self.seqlen_k, self.head_dim
        )?;
        if self.head_dim_v != self.head_dim {
            write!(f, " dv={}", self.head_dim_v)?;
        }
        write!(f, " {}", self.dtype)?;
        if self.varlen.is_some() {
            write!(f, " varlen")?;
        }
        if self.causal {
            write!(f, " causal")?;
        }
        if self.window != (-1, -1) {
            write!(f, " window=({},{})", self.window.0, self.window.1)?;
        }
        if self.softcap > 0.0 {
            write!(f, " softcap={}", self.softcap)?;
        }
        if self.alibi.is_some() {
            write!(f, " alibi")?;
        }
        if let Some(c) = &self.kv_cache {
            if let crate::CacheLayout::Paged { page_size, .. } = c.layout {
                write!(f, " paged({page_size})")?;
            }
            write!(f, " kv_cache(+{})", c.seqlen_new)?;
        }
        Ok(())
    }
}

fn positive(field: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::invalid(field, 0, "must be at least 1"));
    }
    Ok(())
}

fn head_dim_ok(field: &'static str, value: usize) -> Result<()> {
    if value == 0 || value > MAX_HEAD_DIM {
        return Err(Error::invalid(
            field,
            value,
            format!("must be between 1 and {MAX_HEAD_DIM}"),
        ));
    }
    Ok(())
}
