//! The backward's block products on the f16 tiles of the AVX512-FP16 level (`lowp.rs`), for
//! f16 / bf16 inputs: `S = Q · K^T` and `dP = dO · V^T` take the input tensors themselves,
//! packed per block into f16 by the forward's packing (`lowp_pack.rs`: a power of two per
//! block brings the largest |x| into [4, 8), so bf16's range is kept and no f16 sum
//! overflows); `dV += P^T · dO` takes P rounded to f16 (P is in [0, 1]), as the forward's
//! P·V does. Everything else is the f32 code of `backward.rs`.
//!
//! `dK += dS^T · Q` and `dQ = dS · K` stay on the f32 tiles: dS = P (dP - delta) has no
//! bound below, and its small entries (a small P times a small difference) would flush to
//! f16 subnormals or zero without a per-block scale of dS. Scaling dS per block and moving
//! those two products to the f16 tiles is the next step (`PERF_NOTES.md`).

use crate::backward::{BwdProducts, Problem, Scratch, Task};
use crate::block::{self, ScoreBlock};
use crate::device::Isa;
use crate::io::AlignedBuf;
use crate::lowp::{Format, LowTile, LowTiles, Lowp};
use crate::lowp_pack::{self, block_scale, Rows};
use crate::params::{odd_lines, Blocks};
use flashattn_core::{CheckedSpec, DType};
use std::ops::Range;

/// Reduction steps an f16 accumulator of S and dP runs before it is flushed into f32: the
/// forward's Q·K^T chunk (`forward_lowp.rs`), for the same reason (S feeds exp).
const QK_CHUNK: usize = 16;
/// dV's f16 sums run over one query block (at most 128 rows of P <= 1 times dO in [-8, 8):
/// |sum| <= 1024), as the forward's P·V flushes once per 128 keys.
const PV_CHUNK: usize = 128;
/// Columns of one f16 register.
const COLS: usize = 32;

/// Sizes of the f16 operands of one backward call (in elements).
pub(crate) struct BwdLowLayout {
    /// Row stride of the packed K^T and V^T and of the f16 P rows: the key block rounded up
    /// to whole f16 registers, an odd number of cache lines.
    tld: usize,
    /// Row length of packed dO (the A operand of dP, the B operand of dV): dv rounded up to
    /// whole f16 registers, zero past dv.
    pub dv_pad: usize,
    /// Row stride of the f32 score blocks: room for whole f16 registers of keys.
    pub ld: usize,
    d: usize,
    dv: usize,
}

impl BwdLowLayout {
    /// Whether `isa` runs `spec`'s dtype on the f16 tiles.
    pub fn applies(isa: Isa, spec: &CheckedSpec<'_>) -> bool {
        isa == Isa::Avx512Fp16 && matches!(spec.dtype, DType::F16 | DType::Bf16)
    }

    /// The layout for `spec` and `blocks`.
    pub fn new(spec: &CheckedSpec<'_>, blocks: Blocks) -> BwdLowLayout {
        let keys = blocks.block_n.next_multiple_of(COLS);
        BwdLowLayout {
            tld: (keys.div_ceil(COLS) | 1) * COLS,
            dv_pad: spec.head_dim_v.next_multiple_of(COLS),
            ld: odd_lines(keys),
            d: spec.head_dim,
            dv: spec.head_dim_v,
        }
    }
}

/// Per-worker f16 operands (empty on the f32 path).
pub(crate) struct BwdLowScratch {
    kt: AlignedBuf,
    vt: AlignedBuf,
    q: AlignedBuf,
    dout: AlignedBuf,
    p: AlignedBuf,
    tmp: Vec<u16>,
    /// The packing factors of the task's K and V blocks and of the current Q and dO rows.
    k_scale: f32,
    v_scale: f32,
    q_scale: f32,
    do_scale: f32,
}

impl BwdLowScratch {
    pub fn new(layout: Option<&BwdLowLayout>, blocks: Blocks) -> BwdLowScratch {
        // u16 counts, as f32 buffers of half the length.
        let buf = |n: usize| AlignedBuf::zeroed(n.div_ceil(2));
        let (kt, vt, q, dout, p, tmp) = match layout {
            Some(l) => (
                l.d * l.tld,
                l.dv * l.tld,
                blocks.block_m * l.d,
                blocks.block_m * l.dv_pad,
                blocks.block_m * l.tld,
                l.d.max(l.dv),
            ),
            None => (0, 0, 0, 0, 0, 0),
        };
        BwdLowScratch {
            kt: buf(kt),
            vt: buf(vt),
            q: buf(q),
            dout: buf(dout),
            p: buf(p),
            tmp: vec![0; tmp],
            k_scale: 1.0,
            v_scale: 1.0,
            q_scale: 1.0,
            do_scale: 1.0,
        }
    }
}

/// The f16 tiles of `L` (`Problem::low` is set whenever these run; `L` is AVX512-FP16).
pub(crate) struct LowBwd;

fn layout<'a>(p: &'a Problem) -> &'a BwdLowLayout {
    p.low
        .as_ref()
        .expect("the f16 backward runs only with its layout")
}

/// The query rows `seen` of the block's head `h` in `src` laid out as `rows` (`len` wide).
fn query_rows(
    blk: &ScoreBlock,
    h: usize,
    seen: &Range<usize>,
    rows: crate::io::RowLayout,
    len: usize,
) -> Rows {
    Rows {
        off: rows.at(blk.s.q_start + blk.q0 + seen.start, h),
        stride: rows.token,
        n: seen.len(),
        len,
    }
}

/// `C = scale * A · B^T` of `n` packed rows `a` (`k` wide) and a transposed packed key
/// block `bt`, into the score rows `c` (key columns `keys`, rounded out to registers).
#[inline(always)]
unsafe fn scores_tile<L: Lowp>(n: usize, keys: Range<usize>, t: LowTile) {
    block::qk_product::<LowTiles<L>>(n, keys, t);
}

impl<L: Lowp> BwdProducts<L> for LowBwd {
    /// f32 K rows (for dQ), and K^T and V^T in f16, each block scaled by its own factor.
    #[inline(always)]
    unsafe fn load_keys(p: &Problem, sc: &mut Scratch, t: Task, j0: usize, nk: usize) {
        debug_assert!(L::FORMAT == Format::F16 && L::KW == 1);
        let l = layout(p);
        let tok0 = p.spec.seq(t.b).k_start + j0;
        crate::backward::load_k_rows(p, sc, tok0, t.kv_head, nk);
        let low = &mut sc.low;
        let n_pad = nk.next_multiple_of(COLS);
        for (src, rows, len, dst, scale) in [
            (&p.k, p.k_rows, l.d, &mut low.kt, &mut low.k_scale),
            (&p.v, p.v_rows, l.dv, &mut low.vt, &mut low.v_scale),
        ] {
            let rows = Rows {
                off: rows.at(tok0, t.kv_head),
                stride: rows.token,
                n: nk,
                len,
            };
            *scale = block_scale::<L>(src, rows);
            let dst = dst.as_mut_u16();
            lowp_pack::pack_transposed::<L>(src, rows, n_pad, *scale, &mut low.tmp, dst, l.tld);
        }
    }

    /// Packs the rows `seen` of Q, then `S = Q · K^T * k_mul`.
    #[inline(always)]
    unsafe fn scores(
        p: &Problem,
        sc: &mut Scratch,
        blk: &ScoreBlock,
        h: usize,
        seen: Range<usize>,
        keys: Range<usize>,
    ) {
        let l = layout(p);
        let low = &mut sc.low;
        let rows = query_rows(blk, h, &seen, p.q_rows, l.d);
        low.q_scale = block_scale::<L>(&p.q_in, rows);
        lowp_pack::pack_keys::<L>(&p.q_in, rows, low.q_scale, low.q.as_mut_u16(), l.d);
        let scale = p.k_mul as f64 / (low.q_scale as f64 * low.k_scale as f64);
        let t = LowTile {
            k: l.d,
            a: low.q.as_u16(),
            a_rs: l.d,
            a_cs: 1,
            b: low.kt.as_u16(),
            ldb: l.tld,
            c: sc.s.as_mut_ptr().add(seen.start * p.ld),
            ldc: p.ld,
            alpha: std::ptr::null(),
            scale: scale as f32,
            chunk: QK_CHUNK,
        };
        scores_tile::<L>(seen.len(), keys.start..keys.end.next_multiple_of(COLS), t);
    }

    /// Packs the rows `seen` of dO (kept for dV), then `dP = dO · V^T`.
    #[inline(always)]
    unsafe fn dprobs(
        p: &Problem,
        sc: &mut Scratch,
        blk: &ScoreBlock,
        h: usize,
        seen: Range<usize>,
        keys: Range<usize>,
    ) {
        let l = layout(p);
        let low = &mut sc.low;
        let rows = query_rows(blk, h, &seen, p.dout_rows, l.dv);
        low.do_scale = block_scale::<L>(&p.dout_in, rows);
        let dst = low.dout.as_mut_u16();
        lowp_pack::pack_keys::<L>(&p.dout_in, rows, low.do_scale, dst, l.dv_pad);
        let scale = 1.0 / (low.do_scale as f64 * low.v_scale as f64);
        let t = LowTile {
            k: l.dv,
            a: low.dout.as_u16(),
            a_rs: l.dv_pad,
            a_cs: 1,
            b: low.vt.as_u16(),
            ldb: l.tld,
            c: sc.dp.as_mut_ptr().add(seen.start * p.ld),
            ldc: p.ld,
            alpha: std::ptr::null(),
            scale: scale as f32,
            chunk: QK_CHUNK,
        };
        scores_tile::<L>(seen.len(), keys.start..keys.end.next_multiple_of(COLS), t);
    }

    /// P of the rows `seen` rounded to f16, then `dV += P^T · dO`.
    #[inline(always)]
    unsafe fn add_dv(
        p: &Problem,
        sc: &mut Scratch,
        blk: &ScoreBlock,
        _h: usize,
        seen: Range<usize>,
        keys: Range<usize>,
    ) {
        let l = layout(p);
        let low = &mut sc.low;
        let pp = low.p.as_mut_u16().as_mut_ptr();
        let sp = sc.s.as_ptr().add(seen.start * p.ld);
        lowp_pack::convert_probs::<L>(sp, p.ld, seen.len(), keys, pp, l.tld);
        let t = LowTile {
            k: seen.len(),
            a: low.p.as_u16(),
            a_rs: 1,
            a_cs: l.tld,
            b: low.dout.as_u16(),
            ldb: l.dv_pad,
            c: sc.dv.as_mut_ptr(),
            ldc: p.dv_pad,
            alpha: sc.ones.as_ptr(),
            scale: 1.0 / low.do_scale,
            chunk: PV_CHUNK,
        };
        block::pv_product::<LowTiles<L>>(0..blk.nk, l.dv_pad, t);
    }
}
