//! Naive attention: materialises the whole `[batch, heads, seqlen_q, seqlen_k]` f32 score
//! matrix, softmaxes it in place, then multiplies by V. The memory-hungry baseline that
//! benchmarks compare flash against (and a second, independent CPU implementation).

use crate::io::{LseBuf, OutBuf, Src};
use crate::thread_pool::{TaskQueue, ThreadPool};
use flashattn_core::{AttentionSpec, CheckedSpec, Error, Output, Result, ScoreMod, TensorRef};

/// Naive forward on validated inputs.
pub(crate) fn forward(
    pool: &ThreadPool,
    spec: &CheckedSpec<'_>,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<Output> {
    let (q, k, v) = (Src::new(q)?, Src::new(k)?, Src::new(v)?);
    // Offsets of each (batch, head) score block.
    let mut offsets = Vec::with_capacity(spec.batch * spec.heads_q + 1);
    let mut total = 0usize;
    for b in 0..spec.batch {
        let s = spec.seq(b);
        for _ in 0..spec.heads_q {
            offsets.push(total);
            total = s
                .q_len
                .checked_mul(s.k_len)
                .and_then(|n| total.checked_add(n))
                .ok_or_else(|| too_big(spec))?;
        }
    }
    let mut scores: Vec<f32> = Vec::new();
    scores.try_reserve_exact(total).map_err(|_| too_big(spec))?;
    scores.resize(total, 0.0);
    let score_ptr = ScorePtr(scores.as_mut_ptr());

    let (out_t, out) = OutBuf::zeroed(spec.dtype.output(), spec.sizes.out)?;
    let mut lse_v = if spec.return_lse {
        vec![f32::NEG_INFINITY; spec.sizes.lse]
    } else {
        Vec::new()
    };
    let lse = spec.return_lse.then(|| LseBuf::new(&mut lse_v));
    let jobs = spec.batch * spec.heads_q;
    let queue = TaskQueue::new(jobs);
    let worker = || {
        while let Some(job) = queue.take() {
            let (b, h) = (job / spec.heads_q, job % spec.heads_q);
            let s = spec.seq(b);
            // SAFETY: each job owns its own disjoint block of the score matrix.
            let block = unsafe {
                std::slice::from_raw_parts_mut(score_ptr.at(offsets[job]), s.q_len * s.k_len)
            };
            head(spec, b, h, (&q, &k, &v), block, &out, lse.as_ref());
        }
    };
    pool.run(jobs, &worker);
    Ok(Output {
        out: out_t,
        lse: spec.return_lse.then_some(lse_v),
    })
}

struct ScorePtr(*mut f32);
// SAFETY: jobs write disjoint blocks.
unsafe impl Sync for ScorePtr {}

impl ScorePtr {
    /// # Safety
    /// `offset` lies inside the score buffer.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

fn too_big(spec: &AttentionSpec) -> Error {
    Error::backend(
        "cpu",
        format!("naive attention cannot allocate the full score matrix of {spec}"),
    )
}

/// One (batch, head): scores, softmax in place, P·V.
fn head(
    spec: &CheckedSpec<'_>,
    b: usize,
    h: usize,
    (q, k, v): (&Src, &Src, &Src),
    scores: &mut [f32],
    out: &OutBuf,
    lse: Option<&LseBuf>,
) {
    let s = spec.seq(b);
    let (d, dv, hq, hkv) = (spec.head_dim, spec.head_dim_v, spec.heads_q, spec.heads_kv);
    let kh = spec.kv_head(h);
    // This head's K and V as f32 rows (a copy even for f32 keeps the code simple).
    let mut ks = vec![0.0f32; s.k_len * d];
    let mut vs = vec![0.0f32; s.k_len * dv];
    for j in 0..s.k_len {
        k.read_row(
            ((s.k_start + j) * hkv + kh) * d,
            &mut ks[j * d..(j + 1) * d],
        );
        v.read_row(
            ((s.k_start + j) * hkv + kh) * dv,
            &mut vs[j * dv..(j + 1) * dv],
        );
    }
    let sm = ScoreMod::of(spec, b, h);
    let mut qrow = vec![0.0f32; d];
    let mut orow = vec![0.0f32; dv];
    for i in 0..s.q_len {
        q.read_row(((s.q_start + i) * hq + h) * d, &mut qrow);
        let row = &mut scores[i * s.k_len..(i + 1) * s.k_len];
        let keys = spec.mask.keys(i, s.q_len, s.k_len);
        let (lo, hi) = (keys.start, keys.end);
        for (j, x) in row.iter_mut().enumerate() {
            *x = if j < lo || j >= hi {
                f32::NEG_INFINITY
            } else {
                sm.apply(dot(&qrow, &ks[j * d..(j + 1) * d]), i, j, s.q_len, s.k_len)
            };
        }
        if lo >= hi {
            continue; // fully masked: out 0, LSE -inf
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        orow.fill(0.0);
        for (j, &p) in row.iter().enumerate() {
            let p = p / sum;
            for (o, &vx) in orow.iter_mut().zip(&vs[j * dv..(j + 1) * dv]) {
                *o += p * vx;
            }
        }
        // SAFETY: row (token, head h) and its LSE entry belong to this job only.
        unsafe {
            out.write_row(((s.q_start + i) * hq + h) * dv, &orow);
            if let Some(lse) = lse {
                lse.write(spec.lse_index(b, h, i), max + sum.ln());
            }
        }
    }
}

/// Dot product with 8 independent partial sums, so it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
