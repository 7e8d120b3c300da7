//! The backward's per-call copies: Q and dO head-major in f32 (with delta), and the f32 dq
//! accumulator written out token-major in the input dtype.

use crate::io::{try_zeroed, OutBuf, RowLayout, SharedRows, Src};
use crate::thread_pool::{TaskQueue, ThreadPool};
use flashattn_core::{CheckedSpec, Result, Tensor};
use std::ops::Range;

/// A `[tokens, heads_q, dim]` tensor (read through its row layout) as f32
/// `[heads_q][tokens][dim_pad]` (zero padded). With `delta`, also
/// `delta[h][token] = row · out_row` (dout's rowsum with out, in a fixed order).
pub(crate) fn head_major(
    pool: &ThreadPool,
    spec: &CheckedSpec<'_>,
    (src, layout): (Src, RowLayout),
    dim: usize,
    dim_pad: usize,
    delta: Option<((Src, RowLayout), SharedRows)>,
) -> Result<Vec<f32>> {
    let (tokens, hq) = (spec.sizes.q_tokens, spec.heads_q);
    let mut dst = try_zeroed(tokens * hq, dim_pad, "a head-major copy of q or dout")?;
    let shared = SharedRows::new(&mut dst);
    per_head_chunks(pool, tokens, hq, &|h, toks| {
        let mut o = vec![0.0f32; dim];
        // SAFETY: each (head, chunk of tokens) belongs to one task.
        let rows =
            unsafe { shared.rows((h * tokens + toks.start) * dim_pad, toks.len() * dim_pad) };
        // SAFETY: as above.
        let mut d_rows = delta
            .as_ref()
            .map(|(_, d)| unsafe { d.rows(h * tokens + toks.start, toks.len()) });
        for (i, tok) in toks.enumerate() {
            let row = &mut rows[i * dim_pad..i * dim_pad + dim];
            src.read_row(layout.at(tok, h), row);
            if let (Some(((out, out_rows), _)), Some(dr)) = (&delta, &mut d_rows) {
                out.read_row(out_rows.at(tok, h), &mut o);
                dr[i] = row.iter().zip(&o).map(|(a, b)| a * b).sum();
            }
        }
    });
    Ok(dst)
}

/// Runs `work(head, tokens)` for every head and chunk of tokens, on the pool's threads.
fn per_head_chunks(
    pool: &ThreadPool,
    tokens: usize,
    heads: usize,
    work: &(dyn Fn(usize, Range<usize>) + Sync),
) {
    const CHUNK: usize = 256;
    let chunks = tokens.div_ceil(CHUNK);
    let queue = TaskQueue::new(chunks * heads);
    pool.run(chunks * heads, &|| {
        while let Some(t) = queue.take() {
            let c = t % chunks;
            work(t / chunks, c * CHUNK..((c + 1) * CHUNK).min(tokens));
        }
    });
}

/// The head-major `[heads_q][q_tokens][d]` f32 accumulator as dq: `[q_tokens, heads_q, d]`
/// in the input dtype.
pub(crate) fn token_major(
    pool: &ThreadPool,
    spec: &CheckedSpec<'_>,
    acc: &[f32],
) -> Result<Tensor> {
    let (tokens, hq, d) = (spec.sizes.q_tokens, spec.heads_q, spec.head_dim);
    let (dq, out) = OutBuf::zeroed(spec.dtype, spec.sizes.q)?;
    per_head_chunks(pool, tokens, hq, &|h, toks| {
        for tok in toks {
            let row = &acc[(h * tokens + tok) * d..][..d];
            // SAFETY: each (token, head) row is written by one task.
            unsafe { out.write_row((tok * hq + h) * d, row) };
        }
    });
    Ok(dq)
}
