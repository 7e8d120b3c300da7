//! The f64 reference: the plain definition of attention (forward, backward, decode against a
//! KV cache), the oracle for every test. It shares no mask, score or addressing code with the
//! backends: every (query, key) pair is tested here with the definition written out.

use crate::inputs::check_decode;
use crate::{
    validate_inputs, AttentionSpec, CacheLayout, DType, Error, KvCache, Result, TensorRef,
};

/// Output and LSE in f64, in the spec's layouts.
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Gradients in f64, in the layouts of q, k and v.
#[derive(Clone, Debug)]
pub struct ReferenceGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// A decode step: out and LSE, and both caches after the append.
#[derive(Clone, Debug)]
pub struct ReferenceDecode {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub k_cache: Vec<f64>,
    pub v_cache: Vec<f64>,
}

/// Computes attention in f64 straight from the definition (scores materialised per row).
pub fn reference_attention(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<ReferenceOutput> {
    contiguous_only(spec)?;
    let c = validate_inputs(spec, &q, &k, &v)?;
    let (q, k, v) = (widen(&q), widen(&k), widen(&v));
    let mut r = Rows::new(spec, c.sizes.out, c.sizes.lse);
    for b in 0..spec.batch {
        let s = spec.seq(b);
        let seq = Seq {
            b,
            q_len: s.q_len,
            k_len: s.k_len,
            q: &q[s.q_start * spec.heads_q * spec.head_dim..],
            k: &k[s.k_start * spec.heads_kv * spec.head_dim..],
            v: &v[s.k_start * spec.heads_kv * spec.head_dim_v..],
            q_row0: s.q_start,
        };
        r.forward(&seq, None);
    }
    Ok(ReferenceOutput {
        out: r.out,
        lse: r.lse,
    })
}

/// The gradients of `sum(out * dout)` with respect to q, k and v, from the definition (the
/// forward is recomputed in f64; no saved output or LSE is used).
pub fn reference_backward(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
    dout: TensorRef<'_>,
) -> Result<ReferenceGrads> {
    contiguous_only(spec)?;
    let c = validate_inputs(spec, &q, &k, &v)?;
    if spec.dtype == DType::Fp8E4m3 {
        return Err(Error::invalid(
            "dtype",
            spec.dtype,
            "the backward pass takes f32, f16 or bf16",
        ));
    }
    if dout.len() != c.sizes.out {
        return Err(Error::BufferLength {
            tensor: "dout",
            expected: c.sizes.out,
            actual: dout.len(),
            shape: "like out".into(),
        });
    }
    let (q, k, v, dout) = (widen(&q), widen(&k), widen(&v), widen(&dout));
    let mut r = Rows::new(spec, c.sizes.out, c.sizes.lse);
    let mut g = ReferenceGrads {
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    for b in 0..spec.batch {
        let s = spec.seq(b);
        let (qo, ko, vo) = (
            s.q_start * spec.heads_q * spec.head_dim,
            s.k_start * spec.heads_kv * spec.head_dim,
            s.k_start * spec.heads_kv * spec.head_dim_v,
        );
        let seq = Seq {
            b,
            q_len: s.q_len,
            k_len: s.k_len,
            q: &q[qo..],
            k: &k[ko..],
            v: &v[vo..],
            q_row0: s.q_start,
        };
        let grads = SeqGrads {
            dout: &dout[s.q_start * spec.heads_q * spec.head_dim_v..],
            dq: &mut g.dq[qo..],
            dk: &mut g.dk[ko..],
            dv: &mut g.dv[vo..],
        };
        r.forward(&seq, Some(grads));
    }
    Ok(g)
}

/// A decode step against a KV cache from the definition: the new rows (k rotated) are
/// appended to copies of the caches, q is rotated, then each batch entry attends to its
/// `seqlens[b] + seqlen_new` keys.
pub fn reference_decode(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k_cache: TensorRef<'_>,
    v_cache: TensorRef<'_>,
    k_new: Option<TensorRef<'_>>,
    v_new: Option<TensorRef<'_>>,
) -> Result<ReferenceDecode> {
    contiguous_only(spec)?;
    let c = check_decode(spec, &q, &k_cache, &v_cache, k_new.as_ref(), v_new.as_ref())?;
    let cache = spec.kv_cache.as_ref().expect("checked: decode has a cache");
    let (hq, hkv, d, dv) = (spec.heads_q, spec.heads_kv, spec.head_dim, spec.head_dim_v);
    let mut q = widen(&q);
    let (mut kc, mut vc) = (widen(&k_cache), widen(&v_cache));
    let kn = k_new.map(|t| widen(&t)).unwrap_or_default();
    let vn = v_new.map(|t| widen(&t)).unwrap_or_default();
    let positional_q = spec.causal || spec.window != (-1, -1);
    let new = cache.seqlen_new;
    for b in 0..spec.batch {
        let used = cache.seqlens[b] as usize;
        for t in 0..new {
            let row = cache_row(cache, b, used + t);
            for h in 0..hkv {
                let src = ((b * new + t) * hkv + h) * d;
                let dst = (row * hkv + h) * d;
                kc[dst..dst + d].copy_from_slice(&kn[src..src + d]);
                if let Some(rot) = &cache.rotary {
                    rotate(&mut kc[dst..dst + d], used + t, rot);
                }
                let (src, dst) = (((b * new + t) * hkv + h) * dv, (row * hkv + h) * dv);
                vc[dst..dst + dv].copy_from_slice(&vn[src..src + dv]);
            }
        }
        if let Some(rot) = &cache.rotary {
            for i in 0..spec.seqlen_q {
                let pos = used + if positional_q { i } else { 0 };
                for h in 0..hq {
                    let at = ((b * spec.seqlen_q + i) * hq + h) * d;
                    rotate(&mut q[at..at + d], pos, rot);
                }
            }
        }
    }
    // Attend: gather each entry's keys into a dense sequence.
    let mut r = Rows::new(spec, c.sizes.out, c.sizes.lse);
    for b in 0..spec.batch {
        let k_len = cache.seqlens[b] as usize + new;
        let (mut ks, mut vs) = (Vec::with_capacity(k_len * hkv * d), Vec::new());
        for pos in 0..k_len {
            let row = cache_row(cache, b, pos);
            ks.extend_from_slice(&kc[row * hkv * d..(row + 1) * hkv * d]);
            vs.extend_from_slice(&vc[row * hkv * dv..(row + 1) * hkv * dv]);
        }
        let seq = Seq {
            b,
            q_len: spec.seqlen_q,
            k_len,
            q: &q[b * spec.seqlen_q * hq * d..],
            k: &ks,
            v: &vs,
            q_row0: b * spec.seqlen_q,
        };
        r.forward(&seq, None);
    }
    Ok(ReferenceDecode {
        out: r.out,
        lse: r.lse,
        k_cache: kc,
        v_cache: vc,
    })
}

/// Row `pos` of batch entry `b` in the cache buffer, written out from the layout's definition.
fn cache_row(cache: &KvCache, b: usize, pos: usize) -> usize {
    match &cache.layout {
        CacheLayout::Contiguous { seqlen_cache, .. } => {
            let slot = match &cache.batch_idx {
                Some(idx) => idx[b] as usize,
                None => b,
            };
            slot * seqlen_cache + pos
        }
        CacheLayout::Paged {
            page_size,
            block_table,
            max_blocks,
            ..
        } => {
            let page = block_table[b * max_blocks + pos / page_size] as usize;
            page * page_size + pos % page_size
        }
    }
}

/// Rotates the first `rot.dim` values of one head at position `pos`.
fn rotate(x: &mut [f64], pos: usize, rot: &crate::Rotary) {
    let half = rot.dim / 2;
    for i in 0..half {
        let (c, s) = (
            rot.cos[pos * half + i] as f64,
            rot.sin[pos * half + i] as f64,
        );
        let (a, b) = if rot.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * c - xb * s;
        x[b] = xa * s + xb * c;
    }
}

/// One sequence's rows: q `[q_len, heads_q, d]`, k `[k_len, heads_kv, d]`, v `[k_len, heads_kv, dv]`
/// (slices start at the sequence's first row), and where its rows sit in out / lse.
struct Seq<'a> {
    b: usize,
    q_len: usize,
    k_len: usize,
    q: &'a [f64],
    k: &'a [f64],
    v: &'a [f64],
    q_row0: usize,
}

/// Where a backward pass reads dout and accumulates the gradients (same offsets as `Seq`).
struct SeqGrads<'a> {
    dout: &'a [f64],
    dq: &'a mut [f64],
    dk: &'a mut [f64],
    dv: &'a mut [f64],
}

/// Output buffers and the per-row work.
struct Rows<'s> {
    spec: &'s AttentionSpec,
    out: Vec<f64>,
    lse: Vec<f64>,
    /// (key, raw scaled score before softcap, final score) of the row being computed.
    scores: Vec<(usize, f64, f64)>,
}

impl<'s> Rows<'s> {
    fn new(spec: &'s AttentionSpec, out: usize, lse: usize) -> Self {
        Rows {
            spec,
            out: vec![0.0; out],
            lse: vec![f64::NEG_INFINITY; lse],
            scores: Vec::new(),
        }
    }

    /// Forward over one sequence, and with `grads` its backward too.
    fn forward(&mut self, seq: &Seq<'_>, mut grads: Option<SeqGrads<'_>>) {
        let spec = self.spec;
        let (hq, hkv, d, dv) = (spec.heads_q, spec.heads_kv, spec.head_dim, spec.head_dim_v);
        let scale = spec.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
        let cap = spec.softcap as f64;
        for h in 0..hq {
            let kh = h / (hq / hkv);
            let (dq_s, dk_s, dv_s) = descales(spec, seq.b, kh);
            let slope = match &spec.alibi {
                Some(a) if a.per_batch => a.slopes[seq.b * hq + h] as f64,
                Some(a) => a.slopes[h] as f64,
                None => 0.0,
            };
            for i in 0..seq.q_len {
                let qi = &seq.q[(i * hq + h) * d..][..d];
                self.scores.clear();
                for j in 0..seq.k_len {
                    if !visible(spec, i, j, seq.q_len, seq.k_len) {
                        continue;
                    }
                    let kj = &seq.k[(j * hkv + kh) * d..][..d];
                    let dot: f64 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                    let raw = scale * dot * dq_s * dk_s;
                    let mut score = if cap > 0.0 {
                        cap * (raw / cap).tanh()
                    } else {
                        raw
                    };
                    let dist = i as i128 + seq.k_len as i128 - seq.q_len as i128 - j as i128;
                    score -= slope * dist.unsigned_abs() as f64;
                    self.scores.push((j, raw, score));
                }
                if self.scores.is_empty() {
                    continue; // fully masked: out 0, lse -inf, no gradient
                }
                // NaN propagates: f64::max skips it, but the sum below then becomes NaN.
                let max = self
                    .scores
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, s| m.max(s.2));
                let sum: f64 = self.scores.iter().map(|s| (s.2 - max).exp()).sum();
                let row = seq.q_row0 + i;
                let lse = max + sum.ln();
                self.lse[lse_index(spec, seq.b, h, i, row)] = lse;
                let orow = &mut self.out[(row * hq + h) * dv..][..dv];
                for &(j, _, s) in &self.scores {
                    let p = (s - lse).exp();
                    let vj = &seq.v[(j * hkv + kh) * dv..][..dv];
                    for (o, x) in orow.iter_mut().zip(vj) {
                        *o += p * x * dv_s;
                    }
                }
                if let Some(g) = grads.as_mut() {
                    let doi = &g.dout[(i * hq + h) * dv..][..dv];
                    // dp_j = dout_i · v_j; delta = sum_j p_j dp_j; ds_j = p_j (dp_j - delta).
                    let dps: Vec<f64> = self
                        .scores
                        .iter()
                        .map(|&(j, _, _)| {
                            let vj = &seq.v[(j * hkv + kh) * dv..][..dv];
                            doi.iter().zip(vj).map(|(a, b)| a * b).sum()
                        })
                        .collect();
                    let delta: f64 = self
                        .scores
                        .iter()
                        .zip(&dps)
                        .map(|(s, dp)| (s.2 - lse).exp() * dp)
                        .sum();
                    for (&(j, raw, s), dp) in self.scores.iter().zip(&dps) {
                        let p = (s - lse).exp();
                        let dvj = &mut g.dv[(j * hkv + kh) * dv..][..dv];
                        for (x, o) in dvj.iter_mut().zip(doi) {
                            *x += p * o;
                        }
                        let mut ds = p * (dp - delta);
                        if cap > 0.0 {
                            let t = (raw / cap).tanh();
                            ds *= 1.0 - t * t;
                        }
                        let kj = &seq.k[(j * hkv + kh) * d..][..d];
                        let dqi = &mut g.dq[(i * hq + h) * d..][..d];
                        for (x, kv) in dqi.iter_mut().zip(kj) {
                            *x += scale * ds * kv;
                        }
                        let dkj = &mut g.dk[(j * hkv + kh) * d..][..d];
                        for (x, qv) in dkj.iter_mut().zip(qi) {
                            *x += scale * ds * qv;
                        }
                    }
                }
            }
        }
    }
}

/// The mask from its definition: key j is visible from row i iff
/// `i + k_len - q_len - left <= j <= i + k_len - q_len + right` (each bound only when set;
/// causal sets right = 0).
fn visible(spec: &AttentionSpec, i: usize, j: usize, q_len: usize, k_len: usize) -> bool {
    let diag = i as i128 + k_len as i128 - q_len as i128;
    let j = j as i128;
    let (left, right) = spec.window;
    let right_ok = (!spec.causal || j <= diag) && (right < 0 || j <= diag + right as i128);
    let left_ok = left < 0 || j >= diag - left as i128;
    right_ok && left_ok
}

fn lse_index(spec: &AttentionSpec, b: usize, h: usize, i: usize, row: usize) -> usize {
    if spec.varlen.is_some() {
        h * spec.seqlen_q + row
    } else {
        (b * spec.heads_q + h) * spec.seqlen_q + i
    }
}

fn descales(spec: &AttentionSpec, b: usize, kh: usize) -> (f64, f64, f64) {
    match &spec.fp8_descale {
        Some(d) => {
            let i = b * spec.heads_kv + kh;
            (d.q[i] as f64, d.k[i] as f64, d.v[i] as f64)
        }
        None => (1.0, 1.0, 1.0),
    }
}

/// The oracle reads contiguous inputs only (it shares no addressing code with backends):
/// tests compare a strided call with the reference of `spec.contiguous()` on copies.
fn contiguous_only(spec: &AttentionSpec) -> Result<()> {
    if spec.strides.is_contiguous() {
        return Ok(());
    }
    Err(Error::argument(
        "strides",
        format!("{:?}", spec.strides),
        "the reference takes contiguous inputs (use spec.contiguous() on contiguous copies)",
    ))
}

fn widen(t: &TensorRef<'_>) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}
