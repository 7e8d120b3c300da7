//! Operations on one (query block, key block) pair that the forward and the backward share:
//! packing rows, the per-row visible key ranges, the two shapes of block product built from
//! the register tiles of `simd.rs`, and the score modification and mask on a score block.
//!
//! The forward stores score blocks transposed, `S^T[j][i]` (keys x queries), so that its
//! online softmax (max, sum per query) vectorises across queries; the backward stores
//! `S[i][j]` (queries x keys), so that its per-key-block K^T and V^T serve every query block
//! and no query block needs transposing.

use crate::io::{RowLayout, Src};
use crate::simd::{Simd, Tile};
use flashattn_core::score::{alibi, softcap, softcap_grad};
use flashattn_core::{Mask, ScoreMod, SeqBounds};
use std::f32::consts::LOG2_E;
use std::marker::PhantomData;
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

/// A register-tile kernel that the two block products below walk over a block: the f32
/// Q·K and P·V tiles of `simd.rs` ([`QkTiles`], [`PvTiles`]) and the low-precision tiles
/// of `lowp.rs`.
pub(crate) trait TileKernel {
    type Tile;
    /// Tile shape: MR broadcast rows x NV vectors of COLS output columns.
    const MR: usize;
    const NV: usize;
    const COLS: usize;
    /// Vectors of a Q·K tile with `cols` columns left: whole vectors only, or the last one
    /// part-filled where the kernel's buffers have room for it.
    fn vectors(cols: usize) -> usize;
    /// The product `t` moved to row `r`, column `c`; with `alpha`, the rows' alpha too
    /// (a null alpha stays null), else none.
    unsafe fn at(t: &Self::Tile, r: usize, c: usize, alpha: bool) -> Self::Tile;
    /// One tile of `mr` (1..=MR) rows and `nv` (1..=NV) vectors.
    unsafe fn run(mr: usize, nv: usize, t: Self::Tile);
}

/// `C[r][c] = sum_x A[r][x] * B[x][c]` for the `nk` rows of A and the columns `cols`
/// (rounded out to whole groups of `NV` vectors), in tiles: S^T = K · Q^T in the forward,
/// S = Q · K^T and dP = dO · V^T in the backward. `t` describes the product at row 0,
/// column 0 (`t.k` is the inner dimension, `t.alpha` is ignored).
///
/// Column groups outer: one group's B slice stays in L1 while A's rows stream past it.
#[inline(always)]
pub(crate) unsafe fn qk_product<K: TileKernel>(nk: usize, cols: Range<usize>, t: K::Tile) {
    qk_product_with::<K>(nk, cols, t, || {})
}

/// `qk_product` calling `step` before each of its `qk_tiles` tiles (a paced prefetch).
#[inline(always)]
pub(crate) unsafe fn qk_product_with<K: TileKernel>(
    nk: usize,
    cols: Range<usize>,
    t: K::Tile,
    mut step: impl FnMut(),
) {
    let w = K::NV * K::COLS;
    for ig in (cols.start / w * w..cols.end).step_by(w) {
        let nv = K::vectors(cols.end - ig);
        let mut jt = 0;
        while jt < nk {
            let mr = K::MR.min(nk - jt);
            step();
            K::run(mr, nv, K::at(&t, jt, ig, false));
            jt += mr;
        }
    }
}

/// The tiles `qk_product` runs for `nk` keys and the query columns `cols`.
pub(crate) fn qk_tiles<K: TileKernel>(nk: usize, cols: &Range<usize>) -> usize {
    let w = K::NV * K::COLS;
    (cols.end - cols.start / w * w).div_ceil(w) * nk.div_ceil(K::MR)
}

/// `C[i][0..width] = C[i] * alpha[i] + sum_k A(i, k) B[k]` for the rows `rows` (rounded down
/// to whole tiles at the start): O = O * alpha + P · V in the forward; dQ = dS · K,
/// dV += P^T · dO and dK += dS^T · Q in the backward. `t` describes the product at row 0,
/// column 0; a null `t.alpha` overwrites C. `width` is a multiple of `COLS`.
///
/// Column chunks outer: one chunk of B stays in L1 while the rows pass over it.
#[inline(always)]
pub(crate) unsafe fn pv_product<K: TileKernel>(rows: Range<usize>, width: usize, t: K::Tile) {
    let mut n0 = 0;
    while n0 < width {
        let nv = K::NV.min((width - n0) / K::COLS);
        for ig in (rows.start / K::MR * K::MR..rows.end).step_by(K::MR) {
            K::run(K::MR.min(rows.end - ig), nv, K::at(&t, ig, n0, true));
        }
        n0 += nv * K::COLS;
    }
}

/// The f32 register tiles of `S`: the Q·K shape (`MR_QK` x `NV_QK`, `qk_tile`) or, with
/// `PV`, the P·V shape (`MR_PV` x `NV_PV`, `pv_tile`).
pub(crate) struct F32Tiles<S, const PV: bool>(PhantomData<S>);
pub(crate) type QkTiles<S> = F32Tiles<S, false>;
pub(crate) type PvTiles<S> = F32Tiles<S, true>;

impl<S: Simd, const PV: bool> TileKernel for F32Tiles<S, PV> {
    type Tile = Tile;
    const MR: usize = if PV { S::MR_PV } else { S::MR_QK };
    const NV: usize = if PV { S::NV_PV } else { S::NV_QK };
    const COLS: usize = S::LANES;
    #[inline(always)]
    fn vectors(cols: usize) -> usize {
        Self::NV.min(cols / S::LANES)
    }
    #[inline(always)]
    unsafe fn at(t: &Tile, r: usize, c: usize, alpha: bool) -> Tile {
        Tile {
            a: t.a.add(r * t.a_rs),
            b: t.b.add(c),
            c: t.c.add(r * t.ldc + c),
            alpha: alpha_at(t.alpha, r, alpha),
            ..*t
        }
    }
    #[inline(always)]
    unsafe fn run(mr: usize, nv: usize, t: Tile) {
        if PV {
            S::pv_tile(mr, nv, t)
        } else {
            S::qk_tile(mr, nv, t)
        }
    }
}

/// Row `r`'s alpha of a tile's `alpha` when `keep`, else none (a null alpha stays null).
#[inline(always)]
pub(crate) unsafe fn alpha_at(alpha: *const f32, r: usize, keep: bool) -> *const f32 {
    if !keep || alpha.is_null() {
        std::ptr::null()
    } else {
        alpha.add(r)
    }
}

/// Where a score block lies: keys `j0..j0 + nk` of a sequence (of KV head `kh`), query rows `q0..q0 + rows`
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
    /// The KV head of the keys.
    pub kh: usize,
    pub query_stride: usize,
    pub key_stride: usize,
}

impl ScoreBlock {
    /// The element offset of the block's first key row in K or V laid out as `rows`, and
    /// the stride between its rows.
    #[inline(always)]
    pub fn key_rows(&self, rows: RowLayout) -> (usize, usize) {
        (rows.at(self.s.k_start + self.j0, self.kh), rows.token)
    }

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
/// rows `rows`; returns whether it did. Nothing to do when every row of the block sees the
/// whole block (padding rows are then left alone: their zero queries never reach the output,
/// and the backward never reads them).
pub(crate) fn mask_block(
    st: &mut [f32],
    blk: &ScoreBlock,
    rows: Range<usize>,
    lo: &[usize],
    hi: &[usize],
) -> bool {
    let (j0, end) = (blk.j0, blk.j0 + blk.nk);
    if (0..blk.rows).all(|i| lo[i] <= j0 && hi[i] >= end) {
        return false;
    }
    // Per row, the hidden keys of this block are the two runs outside [lo, hi).
    for i in rows {
        let l = lo[i].clamp(j0, end);
        let h = hi[i].clamp(l, end);
        for j in (j0..l).chain(h..end) {
            st[blk.at(i, j - j0)] = f32::NEG_INFINITY;
        }
    }
    true
}
