//! The forward's block products on the low-precision tiles (`lowp.rs`), for f16 / bf16
//! inputs on the AVX512-FP16 and AVX512-BF16 levels. Q, K and V blocks are packed in the
//! tiles' format (`lowp_pack.rs`: f16 scaled by a power of two per block, or bf16 pairs);
//! the scores land in the same f32 S^T as on the f32 path, so mask, score mod and the
//! online softmax's max and rescaling are the f32 code. The probabilities are rounded to the
//! format for P·V; on the f16 tiles they are computed in f16 (`lowp_exp.rs`), with row sums
//! in f32 every 16 keys. O accumulates in f32.

use crate::block::{self, ScoreBlock};
use crate::device::Isa;
use crate::forward::{Problem, Products, Scratch, Task};
use crate::io::{AlignedBuf, RowLayout};
use crate::kv_prefetch::Paced;
use crate::lowp::{Format, LowTile, LowTiles, Lowp};
use crate::lowp_pack::{self, block_scale, Rows};
use crate::lowp_reuse::PackedBlocks;
use crate::params::{odd_lines, Blocks};
use flashattn_core::{CheckedSpec, DType, SeqBounds};
use std::ops::Range;

/// Reduction steps an f16 accumulator of Q·K^T runs before it is flushed into f32: 16 keeps
/// the LSE within f16's tolerance for scores with a standard deviation near 20 (32 did not:
/// 0.13 against 0.1, `tests/low_precision.rs`). Summing 8-step chunks in f16 and flushing
/// every 64 steps was no faster and raised that error by 35-65%. The scores' error feeds
/// exp, the output's does not: P·V flushes once per default key block of 128 (32-key
/// chunks changed that test's output error by under 1%, and each flush costs an f32
/// conversion per accumulator).
const QK_CHUNK: usize = 16;
const PV_CHUNK: usize = 128;

/// Sizes and strides of the low-precision operands of one forward call (all in elements).
pub(crate) struct LowLayout {
    /// Reduction elements per step: 1 (f16) or 2 (bf16 pairs).
    kw: usize,
    /// Columns of one step-row of Q^T and of the probabilities: block_m padded so that a
    /// row is an odd number of cache lines (as the f32 path's strides, `odd_lines`).
    qld: usize,
    /// Length of a packed K row: head_dim rounded up to `kw`.
    kld: usize,
    /// Columns of one step-row of packed V.
    vld: usize,
    /// Value dimension padded to whole tiles (the O scratch row).
    pub dv_pad: usize,
    /// Row stride of S^T (f32): whole 32-query vectors fit in every row.
    pub ld: usize,
    d: usize,
    dv: usize,
}

/// `n` columns of `kw` elements padded to an odd number of 64-byte lines.
fn odd_line_cols(n: usize, kw: usize) -> usize {
    ((n * kw).div_ceil(32) | 1) * 32 / kw
}

impl LowLayout {
    /// The layout when `isa` has low-precision tiles for `spec`'s dtype, else `None`.
    pub fn new(isa: Isa, spec: &CheckedSpec<'_>, blocks: Blocks) -> Option<LowLayout> {
        let format = match (isa, spec.dtype) {
            (Isa::Avx512Fp16, DType::F16 | DType::Bf16) => Format::F16,
            (Isa::Avx512Bf16, DType::Bf16) => Format::Bf16,
            _ => return None,
        };
        let kw = if format == Format::Bf16 { 2 } else { 1 };
        let block_m = blocks.block_m.next_multiple_of(64);
        let dv_pad = spec.head_dim_v.next_multiple_of(32);
        Some(LowLayout {
            kw,
            qld: odd_line_cols(block_m, kw),
            kld: spec.head_dim.next_multiple_of(kw),
            // The P·V loop reads V in 64-column chunks; a wider row gets odd lines.
            vld: if dv_pad > 64 {
                odd_line_cols(dv_pad, kw)
            } else {
                dv_pad
            },
            dv_pad,
            ld: odd_lines(block_m),
            d: spec.head_dim,
            dv: spec.head_dim_v,
        })
    }
}

/// Per-worker low-precision operands (empty on the f32 path).
pub(crate) struct LowScratch {
    qt: AlignedBuf,
    k: PackedBlocks,
    v: PackedBlocks,
    /// The (batch, KV head) whose blocks `k` and `v` hold.
    head: Option<(usize, usize)>,
    p: AlignedBuf,
    tmp: Vec<u16>,
    /// The Q block's packing factor.
    q_scale: f32,
    /// Lines of blocks not yet packed, prefetched while the Q·K^T tiles run.
    paced: Paced,
}

impl LowScratch {
    /// Operands for blocks of `block_n` of `keys` keys.
    pub fn new(layout: Option<&LowLayout>, block_n: usize, keys: usize) -> LowScratch {
        // u16 counts, as f32 buffers of half the length.
        let buf = |n: usize| AlignedBuf::zeroed(n.div_ceil(2));
        let Some(l) = layout else {
            return LowScratch {
                qt: buf(0),
                k: PackedBlocks::new(0, block_n, 0),
                v: PackedBlocks::new(0, block_n, 0),
                head: None,
                p: buf(0),
                tmp: Vec::new(),
                q_scale: 1.0,
                paced: Paced::default(),
            };
        };
        let padded = block_n.next_multiple_of(l.kw);
        LowScratch {
            qt: buf(l.kld * l.qld),
            k: PackedBlocks::new(block_n * l.kld, block_n, keys),
            v: PackedBlocks::new(padded * l.vld, block_n, keys),
            head: None,
            p: buf(padded * l.qld),
            tmp: vec![0; l.kld.max(l.dv)],
            q_scale: 1.0,
            paced: Paced::default(),
        }
    }
}

/// The low-precision tiles of `L` (`Problem::low` is set whenever these run).
pub(crate) struct LowProducts;

fn layout<'a>(p: &'a Problem) -> &'a LowLayout {
    p.low
        .as_ref()
        .expect("the low-precision path runs only with its layout")
}

/// The block's K (`len` = d) or V (`len` = dv) rows, laid out as `rows`.
fn key_rows(blk: &ScoreBlock, rows: RowLayout, len: usize) -> Rows {
    let (off, stride) = blk.key_rows(rows);
    Rows {
        off,
        stride,
        n: blk.nk,
        len,
    }
}

/// Queues the rows of this block's V and of the next block's K that are not packed yet:
/// a head's first task reads them from memory, rows a head apart, which the hardware
/// prefetcher does not follow (their scan stalled on misses: 4% of a d 64 forward).
fn queue_unpacked(p: &Problem, low: &mut LowScratch, blk: &ScoreBlock) {
    low.paced.clear();
    let mut queue = |src: &crate::io::Src, rows: RowLayout, j0: usize, nk: usize, len: usize| {
        let Some(bits) = src.bits() else { return };
        let first = rows.at(blk.s.k_start + j0, blk.kh);
        for r in 0..nk {
            if let Some(row) = bits.get(first + r * rows.token..) {
                low.paced.push(row.as_ptr(), len.min(row.len()));
            }
        }
    };
    if !low.v.holds(blk.j0, blk.nk) {
        queue(&p.v, p.rows[2], blk.j0, blk.nk, p.spec.head_dim_v);
    }
    let next = blk.j0 + blk.nk;
    let next_nk = p.blocks.block_n.min(blk.s.k_len.saturating_sub(next));
    if next_nk > 0 && !low.k.holds(next, next_nk) {
        queue(&p.k, p.rows[1], next, next_nk, p.spec.head_dim);
    }
}

impl<L: Lowp> Products<L> for LowProducts {
    /// Q^T in the format, `qt[((x / kw) * qld + i) * kw + x % kw]`, zero past the block's
    /// rows up to whole 32-query vectors.
    #[inline(always)]
    unsafe fn load_q(p: &Problem, sc: &mut Scratch, t: Task, s: &SeqBounds, rows_l: usize) {
        let l = layout(p);
        let q_rows = p.rows[0];
        let rows = Rows {
            off: q_rows.at(s.q_start + t.q0, t.h),
            stride: q_rows.token,
            n: p.blocks.block_m.min(s.q_len - t.q0),
            len: l.d,
        };
        let low = &mut sc.low;
        let head = Some((t.b, p.spec.kv_head(t.h)));
        if low.head != head {
            low.head = head;
            low.k.clear();
            low.v.clear();
        }
        low.q_scale = block_scale::<L>(&p.q, rows);
        let n_pad = rows_l.next_multiple_of(32);
        let dst = low.qt.as_mut_u16();
        lowp_pack::pack_transposed::<L>(&p.q, rows, n_pad, low.q_scale, &mut low.tmp, dst, l.qld);
    }

    /// K rows in the format, then `S^T = K · Q^T * q_mul / (q_scale * k_scale)`.
    #[inline(always)]
    unsafe fn scores(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock, cols: Range<usize>) {
        let l = layout(p);
        let rows = key_rows(blk, p.rows[1], l.d);
        let (kp, k_scale) = sc.low.k.get(blk.j0, blk.nk, |dst| {
            let k_scale = block_scale::<L>(&p.k, rows);
            lowp_pack::pack_keys::<L>(&p.k, rows, k_scale, dst, l.kld);
            k_scale
        });
        queue_unpacked(p, &mut sc.low, blk);
        sc.low
            .paced
            .pace(block::qk_tiles::<LowTiles<L>>(blk.nk, &cols));
        let scale = p.q_mul as f64 / (sc.low.q_scale as f64 * k_scale as f64);
        // The f16 tiles fold the column max into `m_blk` (`FOLDS_MAX`); they cover whole
        // 64-column groups from the group of `cols.start`.
        let max = if <Self as Products<L>>::FOLDS_MAX {
            let mb = sc.m_blk.as_mut_slice();
            let end = cols.end.next_multiple_of(L::NV * L::COLS);
            debug_assert!(end <= mb.len(), "m_blk holds whole tile groups");
            mb[..end].fill(f32::NEG_INFINITY);
            mb.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        };
        let t = LowTile {
            k: l.kld / l.kw,
            a: kp,
            a_rs: l.kld,
            a_cs: l.kw,
            b: sc.low.qt.as_u16(),
            ldb: l.qld * l.kw,
            c: sc.s.as_mut_ptr(),
            ldc: p.ld,
            alpha: std::ptr::null(),
            scale: scale as f32,
            chunk: QK_CHUNK,
            max,
        };
        let paced = &mut sc.low.paced;
        block::qk_product_with::<LowTiles<L>>(blk.nk, cols, t, || paced.step());
        paced.finish();
    }

    /// The probabilities and the V block in the format, then `O = O * alpha + P · V`.
    #[inline(always)]
    unsafe fn accumulate(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock, rows: Range<usize>) {
        let l = layout(p);
        let low = &mut sc.low;
        // The P·V tiles start at a multiple of MR rows; convert from the 16-column chunk
        // that holds it (those columns' probabilities are exact: 0 where masked).
        if L::FORMAT != Format::F16 {
            let cols = rows.start / L::MR * L::MR / 16 * 16..rows.end;
            let pp = low.p.as_mut_u16().as_mut_ptr();
            lowp_pack::convert_probs::<L>(sc.s.as_ptr(), p.ld, blk.nk, cols, pp, l.qld, 1.0);
        }
        let vrows = key_rows(blk, p.rows[2], l.dv);
        let tmp = &mut low.tmp;
        let (vp, v_scale) = low.v.get(blk.j0, blk.nk, |dst| {
            let v_scale = block_scale::<L>(&p.v, vrows);
            lowp_pack::pack_rows::<L>(&p.v, vrows, v_scale, tmp, dst, l.vld);
            v_scale
        });
        let t = LowTile {
            k: blk.nk.div_ceil(l.kw),
            a: low.p.as_u16(),
            a_rs: l.kw,
            a_cs: l.qld * l.kw,
            b: vp,
            ldb: l.vld * l.kw,
            c: sc.o.as_mut_ptr(),
            ldc: p.dv_pad,
            alpha: sc.alpha.as_ptr(),
            scale: 1.0 / v_scale,
            chunk: PV_CHUNK,
            max: std::ptr::null_mut(),
        };
        block::pv_product::<LowTiles<L>>(rows, l.dv_pad, t);
    }

    /// The f16 tiles fold the block's column max while they store S^T (`scores`).
    const FOLDS_MAX: bool = matches!(L::FORMAT, Format::F16);

    /// On the f16 tiles, P of the whole 32-query groups in f16 arithmetic (`lowp_exp.rs`):
    /// half the instructions of the f32 pass, which is a sixth of the time at d 64.
    #[inline(always)]
    unsafe fn probs(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock) -> usize {
        #[cfg(target_arch = "x86_64")]
        if L::FORMAT == Format::F16 {
            let t = crate::lowp_exp::Probs {
                s: sc.s.as_ptr(),
                ld: blk.key_stride,
                nk: blk.nk,
                mu: sc.m_use.as_ptr(),
                alpha: sc.alpha.as_ptr(),
                l: sc.l.as_mut_ptr(),
                p: sc.low.p.as_mut_u16().as_mut_ptr(),
                qld: layout(p).qld,
            };
            let n = blk.rows_l / 32 * 32;
            for i in (0..n).step_by(32) {
                crate::lowp_exp::probs_f16(&t, i);
            }
            return n;
        }
        0
    }

    /// The f16 tiles' P operand, `p[j * qld + i]`: the softmax rounds into it directly
    /// (a separate pass over S^T cost ~4% at d 64). The bf16 pairs are converted in `accumulate`.
    #[inline(always)]
    unsafe fn probs_target(p: &Problem, sc: &mut Scratch) -> (*mut u16, usize) {
        (sc.low.p.as_mut_u16().as_mut_ptr(), layout(p).qld)
    }

    #[inline(always)]
    unsafe fn store_probs(
        s: *mut f32,
        ld: usize,
        to: (*mut u16, usize),
        j: usize,
        i: usize,
        e: L::V,
    ) {
        if L::FORMAT == Format::F16 {
            (to.0.add(j * to.1 + i) as *mut [u16; 16]).write_unaligned(L::from_f32(e));
        } else {
            L::store(s.add(j * ld + i), e);
        }
    }
}
