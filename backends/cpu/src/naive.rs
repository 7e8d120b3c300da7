//! Naive attention: materialises the whole `[batch, heads, seqlen_q, seqlen_k]` f32
//! probability matrix P (scores, softmaxed in place), then multiplies by V; the naive backward
//! keeps the same P and builds each row's dP and dS from it. The memory-hungry baselines
//! that benchmarks compare flash against (and second, independent CPU implementations: the
//! backward takes delta from P and dP, not from the forward's output and LSE).

use crate::io::{LseBuf, OutBuf, SharedRows, Src};
use crate::thread_pool::{TaskQueue, ThreadPool};
use flashattn_core::score::{softcap, softcap_grad};
use flashattn_core::{
    AttentionSpec, BackwardInputs, CheckedSpec, Error, Grads, Output, Result, ScoreMod, TensorRef,
};

/// Naive forward on validated inputs.
pub(crate) fn forward(
    pool: &ThreadPool,
    spec: &CheckedSpec<'_>,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<Output> {
    let (q, k, v) = (Src::new(q)?, Src::new(k)?, Src::new(v)?);
    let (mut probs, offsets) = probability_matrix(spec)?;
    let probs = SharedRows::new(&mut probs);
    let (out_t, out) = OutBuf::zeroed(spec.dtype.output(), spec.sizes.out)?;
    let mut lse_v = if spec.return_lse {
        vec![f32::NEG_INFINITY; spec.sizes.lse]
    } else {
        Vec::new()
    };
    let lse = spec.return_lse.then(|| LseBuf::new(&mut lse_v));
    let (hq, dv) = (spec.heads_q, spec.head_dim_v);
    let jobs = spec.batch * hq;
    let queue = TaskQueue::new(jobs);
    pool.run(jobs, &|| {
        while let Some(job) = queue.take() {
            let (b, h) = (job / hq, job % hq);
            let s = spec.seq(b);
            let (ks, vs) = (
                head_rows(spec, &k, b, h, false),
                head_rows(spec, &v, b, h, true),
            );
            // SAFETY: each job owns its own disjoint block of the matrix.
            let p = unsafe { probs.rows(offsets[job], s.q_len * s.k_len) };
            let row_lse = probabilities(spec, b, h, &q, &ks, p);
            let mut orow = vec![0.0f32; dv];
            for (i, prow) in p.chunks_exact(s.k_len.max(1)).enumerate() {
                if row_lse[i] == f32::NEG_INFINITY {
                    continue; // fully masked: out 0, LSE -inf
                }
                orow.fill(0.0);
                for (j, &pj) in prow.iter().enumerate() {
                    axpy(pj, &vs[j * dv..(j + 1) * dv], &mut orow);
                }
                // SAFETY: row (token, head h) and its LSE entry belong to this job only.
                unsafe {
                    out.write_row(((s.q_start + i) * hq + h) * dv, &orow);
                    if let Some(lse) = &lse {
                        lse.write(spec.lse_index(b, h, i), row_lse[i]);
                    }
                }
            }
        }
    });
    Ok(Output {
        out: out_t,
        lse: spec.return_lse.then_some(lse_v),
    })
}

/// Naive backward on validated inputs: one job per (batch, kv head), its query heads in
/// order (so dk and dv sum over them without races).
pub(crate) fn backward(
    pool: &ThreadPool,
    spec: &CheckedSpec<'_>,
    inputs: BackwardInputs<'_>,
) -> Result<Grads> {
    let (q, k, v) = (
        Src::new(inputs.q)?,
        Src::new(inputs.k)?,
        Src::new(inputs.v)?,
    );
    let dout = Src::new(inputs.dout)?;
    let (mut probs, offsets) = probability_matrix(spec)?;
    let probs = SharedRows::new(&mut probs);
    let (dq_t, dq) = OutBuf::zeroed(spec.dtype, spec.sizes.q)?;
    let (dk_t, dk) = OutBuf::zeroed(spec.dtype, spec.sizes.k)?;
    let (dv_t, dv) = OutBuf::zeroed(spec.dtype, spec.sizes.v)?;
    let (hq, hkv, d, dvw) = (spec.heads_q, spec.heads_kv, spec.head_dim, spec.head_dim_v);
    let group = spec.group_size();
    let jobs = spec.batch * hkv;
    let queue = TaskQueue::new(jobs);
    pool.run(jobs, &|| {
        while let Some(job) = queue.take() {
            let (b, kh) = (job / hkv, job % hkv);
            let s = spec.seq(b);
            let (ks, vs) = (
                head_rows(spec, &k, b, kh * group, false),
                head_rows(spec, &v, b, kh * group, true),
            );
            let (mut dks, mut dvs) = (vec![0.0f32; ks.len()], vec![0.0f32; vs.len()]);
            for h in kh * group..(kh + 1) * group {
                // SAFETY: each (batch, head) block of the matrix belongs to one job.
                let p = unsafe { probs.rows(offsets[b * hq + h], s.q_len * s.k_len) };
                let row_lse = probabilities(spec, b, h, &q, &ks, p);
                let head = HeadGrads {
                    b,
                    h,
                    ks: &ks,
                    vs: &vs,
                    dk: &mut dks,
                    dv: &mut dvs,
                };
                head_backward(spec, head, (&q, &dout), p, &row_lse, &dq);
            }
            for j in 0..s.k_len {
                let row = (s.k_start + j) * hkv + kh;
                // SAFETY: the rows of (batch b, kv head kh) belong to this job only.
                unsafe {
                    dk.write_row(row * d, &dks[j * d..(j + 1) * d]);
                    dv.write_row(row * dvw, &dvs[j * dvw..(j + 1) * dvw]);
                }
            }
        }
    });
    Ok(Grads {
        dq: dq_t,
        dk: dk_t,
        dv: dv_t,
    })
}

/// One head's inputs and its kv head's gradient accumulators.
struct HeadGrads<'a> {
    b: usize,
    h: usize,
    ks: &'a [f32],
    vs: &'a [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// Per row of head `g.h`: `dP_j = dout · v_j`, `delta = sum_j P_j dP_j`,
/// `dS_j = P_j (dP_j - delta) * softcap' * scale`; dq row written, dk and dv accumulated.
fn head_backward(
    spec: &CheckedSpec<'_>,
    g: HeadGrads<'_>,
    (q, dout): (&Src, &Src),
    p: &[f32],
    row_lse: &[f32],
    dq: &OutBuf,
) {
    let s = spec.seq(g.b);
    let (hq, d, dv) = (spec.heads_q, spec.head_dim, spec.head_dim_v);
    let sm = ScoreMod::of(spec, g.b, g.h);
    let (mut qrow, mut dorow, mut dqrow) = (vec![0.0; d], vec![0.0; dv], vec![0.0; d]);
    let mut dp = vec![0.0f32; s.k_len];
    for (i, prow) in p.chunks_exact(s.k_len.max(1)).enumerate() {
        if row_lse[i] == f32::NEG_INFINITY {
            continue; // fully masked: zero gradients
        }
        let keys = spec.mask.keys(i, s.q_len, s.k_len);
        q.read_row(((s.q_start + i) * hq + g.h) * d, &mut qrow);
        dout.read_row(((s.q_start + i) * hq + g.h) * dv, &mut dorow);
        let mut delta = 0.0f32;
        for j in keys.clone() {
            dp[j] = dot(&dorow, &g.vs[j * dv..(j + 1) * dv]);
            delta += prow[j] * dp[j];
        }
        dqrow.fill(0.0);
        for j in keys {
            let mut ds = prow[j] * (dp[j] - delta) * sm.scale;
            if sm.softcap > 0.0 {
                let raw = sm.scale * dot(&qrow, &g.ks[j * d..(j + 1) * d]);
                ds *= softcap_grad(softcap(raw, sm.softcap), sm.softcap);
            }
            axpy(ds, &g.ks[j * d..(j + 1) * d], &mut dqrow);
            axpy(ds, &qrow, &mut g.dk[j * d..(j + 1) * d]);
            axpy(prow[j], &dorow, &mut g.dv[j * dv..(j + 1) * dv]);
        }
        // SAFETY: row (token, head h) belongs to this job only.
        unsafe { dq.write_row(((s.q_start + i) * hq + g.h) * d, &dqrow) };
    }
}

/// The zeroed `[batch, heads_q, q_len, k_len]` matrix and the offset of each (batch, head)
/// block; an error (not an abort) when it cannot be allocated.
fn probability_matrix(spec: &CheckedSpec<'_>) -> Result<(Vec<f32>, Vec<usize>)> {
    let mut offsets = Vec::with_capacity(spec.batch * spec.heads_q);
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
    let mut probs: Vec<f32> = Vec::new();
    probs.try_reserve_exact(total).map_err(|_| too_big(spec))?;
    probs.resize(total, 0.0);
    Ok((probs, offsets))
}

fn too_big(spec: &AttentionSpec) -> Error {
    Error::backend(
        "cpu",
        format!("naive attention cannot allocate the full score matrix of {spec}"),
    )
}

/// The K (or V) rows of the kv head of (batch b, query head h) as f32 (a copy even for f32
/// keeps the code simple).
fn head_rows(spec: &CheckedSpec<'_>, src: &Src, b: usize, h: usize, value: bool) -> Vec<f32> {
    let s = spec.seq(b);
    let (hkv, kh) = (spec.heads_kv, spec.kv_head(h));
    let dim = if value {
        spec.head_dim_v
    } else {
        spec.head_dim
    };
    let mut rows = vec![0.0f32; s.k_len * dim];
    for (j, row) in rows.chunks_exact_mut(dim).enumerate() {
        src.read_row(((s.k_start + j) * hkv + kh) * dim, row);
    }
    rows
}

/// One (batch, head): scores, then the softmax in place (P, 0 for masked keys); returns
/// each row's LSE (-inf for a fully masked row, NaN for a row that sees a NaN score).
fn probabilities(
    spec: &CheckedSpec<'_>,
    b: usize,
    h: usize,
    q: &Src,
    ks: &[f32],
    p: &mut [f32],
) -> Vec<f32> {
    let s = spec.seq(b);
    let (d, hq) = (spec.head_dim, spec.heads_q);
    let sm = ScoreMod::of(spec, b, h);
    let mut qrow = vec![0.0f32; d];
    let mut lse = vec![f32::NEG_INFINITY; s.q_len];
    for (i, row) in p.chunks_exact_mut(s.k_len.max(1)).enumerate() {
        q.read_row(((s.q_start + i) * hq + h) * d, &mut qrow);
        let keys = spec.mask.keys(i, s.q_len, s.k_len);
        for (j, x) in row.iter_mut().enumerate() {
            *x = if keys.contains(&j) {
                sm.apply(dot(&qrow, &ks[j * d..(j + 1) * d]), i, j, s.q_len, s.k_len)
            } else {
                f32::NEG_INFINITY
            };
        }
        if keys.is_empty() {
            row.fill(0.0);
            continue;
        }
        // NaN propagates: max skips it, but the sum (and so every p) becomes NaN.
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in row.iter_mut() {
            *x /= sum;
        }
        lse[i] = max + sum.ln();
    }
    lse
}

/// `y += a * x`.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Dot product with 8 independent partial sums, so it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
