//! Operations on one (query block, key block) pair that the forward and the backward share:
//! packing rows, the per-row visible key ranges, the two shapes of block product built from
//! the register tiles of `simd.rs`, and the score modification and mask on a score block.
//!
//! The forward stores score blocks transposed, `S^T[j][i]` (keys x queries), so that its
//! online softmax (max, sum per query) vectorises across queries; the backward stores
//! `S[i][j]` (queries x keys), so that its per-key-block K^T and V^T serve every query block
//! and no query block needs transposing.

use crate::io::Src;
use crate::simd::{Simd, Tile};
use flashattn_core::score::{alibi, softcap, softcap_grad};
use flashattn_core::{Mask, ScoreMod, SeqBounds};
use std::f32::consts::LOG2_E;
use std::ops::Range;

/// Rows the packing loops prefetch ahead of the row they copy.
const PACK_AHEAD: usize = 8;

/// Copies `n` rows of `len` elements (row `r` at `off + r * stride`, widened to f32) to
/// `dst[r * ld..]`. Rows a page apart defeat the hardware prefetcher, so it asks a few rows
/// ahead itself. Padding past `len` in `dst` is never written.
#[inline(always)]
pub(crate) fn pack_rows(
    src: &Src,
    off: usize,
    stride: usize,
    n: usize,
    len: usize,
    dst: &mut [f32],
    ld: usize,
) {
    for r in 0..n {
        let at = off + r * stride;
        if r + PACK_AHEAD < n {
            src.prefetch(at + PACK_AHEAD * stride, len);
        }
        src.read_row(at, &mut dst[r * ld..r * ld + len]);
    }
}

/// `dst[x * ld + r] = row_r[x] * mul` for `r < n` (rows as in [`pack_rows`]) and 0 for the
/// padding rows `n..n_pad`. `row` is scratch of at least `len` floats.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn pack_transposed(
    src: &Src,
    (off, stride): (usize, usize),
    (n, n_pad): (usize, usize),
    len: usize,
    mul: f32,
    row: &mut [f32],
    dst: &mut [f32],
    ld: usize,
) {
    for r in 0..n_pad {
        if r < n {
            src.read_row(off + r * stride, &mut row[..len]);
            for (x, &val) in row[..len].iter().enumerate() {
                dst[x * ld + r] = val * mul;
            }
        } else {
            for x in 0..len {
                dst[x * ld + r] = 0.0;
            }
        }
    }
}

/// The visible keys `[lo[i], hi[i])` of rows `q0 + i` (i < `rows`) of a sequence, with empty
/// ranges for the padding rows up to `lo.len()`. Returns the union (a task's key range), or
/// `None` when every row is masked.
pub(crate) fn row_key_ranges(
    mask: &Mask,
    s: &SeqBounds,
    q0: usize,
    rows: usize,
    lo: &mut [usize],
    hi: &mut [usize],
) -> Option<Range<usize>> {
    let (mut klo, mut khi) = (usize::MAX, 0);
    for i in 0..lo.len() {
        let r = if i < rows {
            mask.keys(q0 + i, s.q_len, s.k_len)
        } else {
            0..0
        };
        lo[i] = r.start;
        hi[i] = r.end;
        if r.start < r.end {
            klo = klo.min(r.start);
            khi = khi.max(r.end);
        }
    }
    (klo < khi).then_some(klo..khi)
}

/// Rows (of the first `rows`) that see any key of `keys`: a contiguous range, because both
/// ends of a row's key range grow with the row. Empty (`0..0`) when none does.
pub(crate) fn rows_seeing(
    lo: &[usize],
    hi: &[usize],
    rows: usize,
    keys: Range<usize>,
) -> Range<usize> {
    let seen = |i: &usize| lo[*i] < keys.end && hi[*i] > keys.start && lo[*i] < hi[*i];
    let r0 = (0..rows).find(seen).unwrap_or(0);
    let r1 = (0..rows).rev().find(seen).map_or(0, |i| i + 1);
    r0..r1.max(r0)
}

/// `C[r][c] = sum_x A[r][x] * B[x][c]` for the `nk` rows of A and the columns `cols`
/// (rounded out to whole groups of `NV_QK` vectors), in `qk_tile`s: S^T = K · Q^T in the
/// forward, S = Q · K^T and dP = dO · V^T in the backward. `t` describes the product at
/// row 0, column 0 (`t.k` is the inner dimension, `t.alpha` is ignored).
///
/// Column groups outer: one group's B slice (k x 48 floats) stays in L1 while A's rows
/// stream past it.
#[inline(always)]
pub(crate) unsafe fn qk_product<S: Simd>(nk: usize, cols: Range<usize>, t: Tile) {
    let qw = S::NV_QK * S::LANES;
    for ig in (cols.start / qw * qw..cols.end).step_by(qw) {
        let nv = S::NV_QK.min((cols.end - ig) / S::LANES);
        let mut jt = 0;
        while jt < nk {
            let mr = S::MR_QK.min(nk - jt);
            S::qk_tile(
                mr,
                nv,
                Tile {
                    a: t.a.add(jt * t.a_rs),
                    b: t.b.add(ig),
                    c: t.c.add(jt * t.ldc + ig),
                    alpha: std::ptr::null(),
                    ..t
                },
            );
            jt += mr;
        }
    }
}

/// `C[i][0..width] = C[i] * alpha[i] + sum_k A(i, k) B[k]` for the rows `rows` (rounded down
/// to whole tiles at the start), in `pv_tile`s: O = O * alpha + P · V in the forward;
/// dQ = dS · K, dV += P^T · dO and dK += dS^T · Q in the backward. `t` describes the product
/// at row 0, column 0; a null `t.alpha` overwrites C.
///
/// Column chunks outer: one chunk of B (k x 64 floats) stays in L1 while the rows pass over it.
#[inline(always)]
pub(crate) unsafe fn pv_product<S: Simd>(rows: Range<usize>, width: usize, t: Tile) {
    let mut n0 = 0;
    while n0 < width {
        let nv = S::NV_PV.min((width - n0) / S::LANES);
        for ig in (rows.start / S::MR_PV * S::MR_PV..rows.end).step_by(S::MR_PV) {
            S::pv_tile(
                S::MR_PV.min(rows.end - ig),
                nv,
                Tile {
                    a: t.a.add(ig * t.a_rs),
                    b: t.b.add(n0),
                    c: t.c.add(ig * t.ldc + n0),
                    alpha: if t.alpha.is_null() {
                        t.alpha
                    } else {
                        t.alpha.add(ig)
                    },
                    ..t
                },
            );
        }
        n0 += nv * S::LANES;
    }
}

/// Where a score block lies: keys `j0..j0 + nk` of a sequence, query rows `q0..q0 + rows`
/// (`rows_l` with the padding rows), and the layout of its scores: score (row i, key j0 + j)
/// at `i * query_stride + j * key_stride` (the forward stores S^T, the backward S).
#[derive(Clone, Copy)]
pub(crate) struct ScoreBlock {
    pub s: SeqBounds,
    pub q0: usize,
    pub rows: usize,
    pub rows_l: usize,
    pub j0: usize,
    pub nk: usize,
    pub query_stride: usize,
    pub key_stride: usize,
}

impl ScoreBlock {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> usize {
        i * self.query_stride + j * self.key_stride
    }
}

/// Softcap and ALiBi on the scaled scores of `rows`, then into the log2 domain. Scores
/// arrive as `scale * q·k`, times log2(e) already when there is no softcap. With `grad`, the
/// softcap's derivative at each score is stored there, laid out as the scores (the
/// backward's dS factor).
pub(crate) fn score_mod(
    st: &mut [f32],
    blk: &ScoreBlock,
    rows: Range<usize>,
    sm: &ScoreMod,
    grad: Option<&mut [f32]>,
) {
    let cap = sm.softcap;
    let mul = if cap > 0.0 { LOG2_E } else { 1.0 };
    let slope = sm.slope * LOG2_E;
    let (ql, kl) = (blk.s.q_len, blk.s.k_len);
    let mut grad = grad;
    for j in 0..blk.nk {
        let kj = blk.j0 + j;
        for i in rows.clone() {
            let at = blk.at(i, j);
            let capped = softcap(st[at], cap);
            if let Some(g) = grad.as_deref_mut() {
                g[at] = softcap_grad(capped, cap);
            }
            st[at] = capped * mul + alibi(slope, blk.q0 + i, kj, ql, kl);
        }
    }
}

/// Sets the scores of keys outside each row's `[lo, hi)` to -inf (so their P is 0), for the
/// rows `rows`. Nothing to do when every row of the block sees the whole block (padding rows
/// are then left alone: their zero queries never reach the output, and the backward never
/// reads them).
pub(crate) fn mask_block(
    st: &mut [f32],
    blk: &ScoreBlock,
    rows: Range<usize>,
    lo: &[usize],
    hi: &[usize],
) {
    let (j0, end) = (blk.j0, blk.j0 + blk.nk);
    if (0..blk.rows).all(|i| lo[i] <= j0 && hi[i] >= end) {
        return;
    }
    // Per row, the hidden keys of this block are the two runs outside [lo, hi).
    for i in rows {
        let l = lo[i].clamp(j0, end);
        let h = hi[i].clamp(l, end);
        for j in (j0..l).chain(h..end) {
            st[blk.at(i, j - j0)] = f32::NEG_INFINITY;
        }
    }
}
