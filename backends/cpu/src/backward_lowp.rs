//! The backward's block products on the f16 tiles of the AVX512-FP16 level (`lowp.rs`), for
//! f16 / bf16 inputs: `S = Q · K^T` and `dP = dO · V^T` take the input tensors themselves,
//! packed into f16 by the forward's packing (`lowp_pack.rs`: a power of two per block brings
//! the largest |x| into [4, 8), so bf16's range is kept and no f16 sum overflows); K and V
//! per key block (per task), Q and dO once per call per (head, query block);
//! `dV += P^T · dO` takes P rounded to f16 (P is in [0, 1]), as the forward's P·V does.
//! `dK += dS^T · Q` and `dQ = dS · K` take dS rounded to f16 after a power of two per
//! (query block, head, key block) that brings its largest finite |dS| into [4, 8)
//! (`pow2_scale`, as the inputs): dS = P (dP - delta) has no bound below, and unscaled its
//! small entries would flush to f16 subnormals or zero. K is packed in rows (per task) for
//! dQ; Q is the packed copy S reads. Every product of two operands in [4, 8) is below 64, so
//! no f16 chunk sum of `DS_CHUNK` steps can overflow. Infinities and NaN in dS are rounded
//! into the operand as they are (not into the scale) and propagate as in f32.
//! Everything else (softmax, dS) is the f32 code of `backward.rs`.

use crate::backward::{BlockPart, BwdProducts, Problem, Scratch, Task};
use crate::block;
use crate::device::Isa;
use crate::io::{try_zeroed, AlignedBuf, RowLayout, SharedRows, Src};
use crate::lowp::{Format, LowTile, LowTiles, Lowp};
use crate::lowp_pack::{self, block_scale, pow2_scale, Rows};
use crate::params::{odd_lines, Blocks};
use crate::simd::Simd;
use crate::thread_pool::{Kernel, ThreadPool};
use flashattn_core::{CheckedSpec, DType, Result};

/// Reduction steps an f16 accumulator of S and dP runs before it is flushed into f32: the
/// forward's Q·K^T chunk (`forward_lowp.rs`), for the same reason (S feeds exp).
const QK_CHUNK: usize = 16;
/// dV's f16 sums run over one query block (at most 128 rows of P <= 1 times dO in [-8, 8):
/// |sum| <= 1024), as the forward's P·V flushes once per 128 keys.
const PV_CHUNK: usize = 128;
/// dK's and dQ's f16 chunk sums: 32 steps of products below 64 (|sum| <= 2048). dS sums to
/// zero along a row, so long f16 partial sums cancel: 128 steps ran ~9% faster but raised
/// the f16 dq / dk error 1.6x (1.1e-3 -> 1.8e-3; PERF_NOTES_BACKWARD_F16.md).
const DS_CHUNK: usize = 32;
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
    block_m: usize,
    queries: PackedQueries,
}

/// Q and dO in f16, packed once per call: head-major `[heads_q][q_tokens][qld]` and
/// `[heads_q][q_tokens][dv_pad]` (zero past dv), each (head, query block) scaled by its own
/// power of two. (Packed per key block instead, every query block was scanned and converted
/// once per key block.) The u16 data lives in f32 buffers of half the length.
struct PackedQueries {
    q: Vec<f32>,
    dout: Vec<f32>,
    /// Q's row length: head_dim rounded up to whole f16 registers (Q is dK's B operand;
    /// zero past head_dim).
    qld: usize,
    /// The Q and dO factors of (head h, query block i): `scales[(h * blocks + i) * 2..]`.
    scales: Vec<f32>,
    /// The index of each sequence's first query block, and the blocks of all sequences.
    first_block: Vec<usize>,
    blocks: usize,
}

impl BwdLowLayout {
    /// Whether `isa` runs `spec`'s dtype on the f16 tiles.
    pub fn applies(isa: Isa, spec: &CheckedSpec<'_>) -> bool {
        isa == Isa::Avx512Fp16 && matches!(spec.dtype, DType::F16 | DType::Bf16)
    }

    /// The layout for `spec` and `blocks`, with Q and dO (tensors and row layouts) packed
    /// on `pool` (`isa` is AVX512-FP16: `applies`).
    pub fn new(
        pool: &ThreadPool,
        isa: Isa,
        spec: &CheckedSpec<'_>,
        blocks: Blocks,
        q: (Src, RowLayout),
        dout: (Src, RowLayout),
    ) -> Result<BwdLowLayout> {
        let keys = blocks.block_n.next_multiple_of(COLS);
        let (d, dv) = (spec.head_dim, spec.head_dim_v);
        let dv_pad = dv.next_multiple_of(COLS);
        let qld = d.next_multiple_of(COLS);
        let (mut first_block, mut tasks) = (Vec::with_capacity(spec.batch), Vec::new());
        let mut n = 0;
        for b in 0..spec.batch {
            first_block.push(n);
            let qbs = spec.seq(b).q_len.div_ceil(blocks.block_m);
            for qb in 0..qbs {
                tasks.extend((0..spec.heads_q).map(|h| PackTask { b, h, qb }));
            }
            n += qbs;
        }
        let rows = spec.sizes.q_tokens * spec.heads_q;
        let mut queries = PackedQueries {
            q: try_zeroed(rows, qld / 2, "an f16 copy of q")?,
            dout: try_zeroed(rows, dv_pad / 2, "an f16 copy of dout")?,
            qld,
            scales: try_zeroed(spec.heads_q * n, 2, "the f16 copies' scales")?,
            first_block,
            blocks: n,
        };
        let packing = Packing {
            spec,
            block_m: blocks.block_m,
            src: [(q.0, q.1, d, qld), (dout.0, dout.1, dv, dv_pad)],
            out: [
                SharedRows::new(&mut queries.q),
                SharedRows::new(&mut queries.dout),
            ],
            scales: SharedRows::new(&mut queries.scales),
            first_block: &queries.first_block,
            blocks: n,
            tasks,
        };
        pool.run_kernel(isa, &packing);
        drop(packing);
        Ok(BwdLowLayout {
            tld: (keys.div_ceil(COLS) | 1) * COLS,
            dv_pad,
            ld: odd_lines(keys),
            d,
            dv,
            block_m: blocks.block_m,
            queries,
        })
    }

    /// The row length of dK, dQ and the packed Q and K rows (whole f16 registers).
    pub fn d_pad(&self) -> usize {
        self.queries.qld
    }

    /// The first packed Q and dO rows of the rows `seen` of `part`, and their factors.
    fn queries(&self, p: &Problem, part: BlockPart) -> [(*const u16, f32); 2] {
        let qs = &self.queries;
        let row = part.query_row0(p);
        let at = (part.h * qs.blocks + qs.first_block[part.b] + part.blk.q0 / self.block_m) * 2;
        let (q, dout) = (qs.q.as_ptr() as *const u16, qs.dout.as_ptr() as *const u16);
        assert!(row < p.spec.sizes.q_tokens * p.spec.heads_q || part.seen().is_empty());
        // SAFETY (of the caller's reads): `row` and its block's rows lie inside the copies.
        [
            (q.wrapping_add(row * qs.qld), qs.scales[at]),
            (dout.wrapping_add(row * self.dv_pad), qs.scales[at + 1]),
        ]
    }
}

/// One (batch, head, query block) of the packing.
#[derive(Clone, Copy)]
struct PackTask {
    b: usize,
    h: usize,
    qb: usize,
}

/// Packs Q and dO into `PackedQueries` on the f16 level's workers.
struct Packing<'a> {
    spec: &'a CheckedSpec<'a>,
    block_m: usize,
    /// Q and dO: tensor, row layout, row length, packed row stride.
    src: [(Src<'a>, RowLayout, usize, usize); 2],
    out: [SharedRows; 2],
    scales: SharedRows,
    first_block: &'a [usize],
    blocks: usize,
    tasks: Vec<PackTask>,
}

impl Kernel for Packing<'_> {
    type Task = PackTask;
    type Scratch = ();
    fn scratch(&self) {}
    fn tasks(&self) -> &[PackTask] {
        &self.tasks
    }

    unsafe fn run_task<S: Simd>(&self, _: &mut (), _: PackTask) {
        unreachable!("the f16 packing runs on the AVX512-FP16 level only");
    }

    #[inline(always)]
    unsafe fn run_task_low<L: Lowp>(&self, _: &mut (), t: PackTask) {
        assert!(
            L::FORMAT == Format::F16,
            "the f16 packing needs the f16 tiles"
        );
        let s = self.spec.seq(t.b);
        let q0 = t.qb * self.block_m;
        let (tok, m) = (s.q_start + q0, self.block_m.min(s.q_len - q0));
        let row = t.h * self.spec.sizes.q_tokens + tok;
        let at = (t.h * self.blocks + self.first_block[t.b] + t.qb) * 2;
        // SAFETY: each task writes its own (head, query block) rows and scales.
        let scales = self.scales.rows(at, 2);
        for (i, &(src, layout, len, ld)) in self.src.iter().enumerate() {
            let rows = Rows {
                off: layout.at(tok, t.h),
                stride: layout.token,
                n: m,
                len,
            };
            scales[i] = block_scale::<L>(&src, rows);
            // SAFETY: as above; `ld` is even, so the rows are whole f32 of the buffer.
            let dst = self.out[i].rows(row * ld / 2, m * ld / 2);
            let dst = std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u16, m * ld);
            lowp_pack::pack_keys::<L>(&src, rows, scales[i], dst, ld);
        }
    }
}

/// Per-worker f16 operands (empty on the f32 path).
pub(crate) struct BwdLowScratch {
    /// K rows (dQ's B operand), `d_pad` apart.
    k: AlignedBuf,
    kt: AlignedBuf,
    vt: AlignedBuf,
    p: AlignedBuf,
    tmp: Vec<u16>,
    /// The packing factors of the task's K and V blocks.
    k_scale: f32,
    v_scale: f32,
}

impl BwdLowScratch {
    pub fn new(layout: Option<&BwdLowLayout>, blocks: Blocks) -> BwdLowScratch {
        // u16 counts, as f32 buffers of half the length.
        let buf = |n: usize| AlignedBuf::zeroed(n.div_ceil(2));
        let (k, kt, vt, p, tmp) = match layout {
            Some(l) => (
                blocks.block_n * l.d_pad(),
                l.d * l.tld,
                l.dv * l.tld,
                blocks.block_m * l.tld,
                l.d.max(l.dv),
            ),
            None => (0, 0, 0, 0, 0),
        };
        BwdLowScratch {
            k: buf(k),
            kt: buf(kt),
            vt: buf(vt),
            p: buf(p),
            tmp: vec![0; tmp],
            k_scale: 1.0,
            v_scale: 1.0,
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

/// `C = scale * A · B^T` of the packed rows `a` of `part` (`k` wide, `a_rs` apart) and a
/// transposed packed key block `bt`, into the rows `seen` of the score block `c` (S or dP;
/// key columns rounded out to registers).
#[inline(always)]
unsafe fn scores_tile<L: Lowp>(
    p: &Problem,
    part: BlockPart,
    (a, a_rs, k): (*const u16, usize, usize),
    bt: *const u16,
    c: *mut f32,
    scale: f64,
) {
    let (seen, keys) = (part.seen(), part.keys());
    let t = LowTile {
        k,
        a,
        a_rs,
        a_cs: 1,
        b: bt,
        ldb: layout(p).tld,
        c: c.add(seen.start * p.ld),
        ldc: p.ld,
        alpha: std::ptr::null(),
        scale: scale as f32,
        chunk: QK_CHUNK,
        max: std::ptr::null_mut(),
    };
    block::qk_product::<LowTiles<L>>(seen.len(), keys.start..keys.end.next_multiple_of(COLS), t);
}

impl<L: Lowp> BwdProducts<L> for LowBwd {
    /// K, K^T and V^T in f16, each block scaled by its own factor (K and K^T by one).
    #[inline(always)]
    unsafe fn load_keys(p: &Problem, sc: &mut Scratch, t: Task, j0: usize, nk: usize) {
        debug_assert!(L::FORMAT == Format::F16 && L::KW == 1);
        let l = layout(p);
        let tok0 = p.spec.seq(t.b).k_start + j0;
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
        let rows = Rows {
            off: p.k_rows.at(tok0, t.kv_head),
            stride: p.k_rows.token,
            n: nk,
            len: l.d,
        };
        let ld = l.d_pad();
        lowp_pack::pack_keys::<L>(&p.k, rows, low.k_scale, low.k.as_mut_u16(), ld);
    }

    /// `S = Q · K^T * k_mul` from the packed Q rows.
    #[inline(always)]
    unsafe fn scores(p: &Problem, sc: &mut Scratch, part: BlockPart) {
        let l = layout(p);
        let [(q, q_scale), _] = l.queries(p, part);
        let scale = p.k_mul as f64 / (q_scale as f64 * sc.low.k_scale as f64);
        let (a, kt) = ((q, l.queries.qld, l.d), sc.low.kt.as_u16());
        scores_tile::<L>(p, part, a, kt, sc.s.as_mut_ptr(), scale);
    }

    /// `dP = dO · V^T` from the packed dO rows.
    #[inline(always)]
    unsafe fn dprobs(p: &Problem, sc: &mut Scratch, part: BlockPart) {
        let l = layout(p);
        let [_, (dout, do_scale)] = l.queries(p, part);
        let scale = 1.0 / (do_scale as f64 * sc.low.v_scale as f64);
        let (a, vt) = ((dout, l.dv_pad, l.dv), sc.low.vt.as_u16());
        scores_tile::<L>(p, part, a, vt, sc.dp.as_mut_ptr(), scale);
    }

    /// P of the rows `seen` rounded to f16, then `dV += P^T · dO`.
    #[inline(always)]
    unsafe fn add_dv(p: &Problem, sc: &mut Scratch, part: BlockPart) {
        let (l, seen) = (layout(p), part.seen());
        let [_, (dout, do_scale)] = l.queries(p, part);
        let low = &mut sc.low;
        let pp = low.p.as_mut_u16().as_mut_ptr();
        let sp = sc.s.as_ptr().add(seen.start * p.ld);
        lowp_pack::convert_probs::<L>(sp, p.ld, seen.len(), part.keys(), pp, l.tld, 1.0);
        let t = LowTile {
            k: seen.len(),
            a: low.p.as_u16(),
            a_rs: 1,
            a_cs: l.tld,
            b: dout,
            ldb: l.dv_pad,
            c: sc.dv.as_mut_ptr(),
            ldc: p.dv_pad,
            alpha: sc.ones.as_ptr(),
            scale: 1.0 / do_scale,
            chunk: PV_CHUNK,
            max: std::ptr::null_mut(),
        };
        block::pv_product::<LowTiles<L>>(0..part.blk.nk, l.dv_pad, t);
    }

    /// dS of the rows `seen` scaled by its block's power of two and rounded to f16 (into the
    /// P operand, which `add_dv` has used), then `dK += dS^T · Q` and `dQ_blk = dS · K`.
    #[inline(always)]
    unsafe fn dk_dq(p: &Problem, sc: &mut Scratch, part: BlockPart) {
        let (l, blk, seen, keys) = (layout(p), part.blk, part.seen(), part.keys());
        let [(q, q_scale), _] = l.queries(p, part);
        let (n, d_pad) = (seen.len(), l.d_pad());
        let low = &mut sc.low;
        let dsp = sc.dp.as_ptr().add(seen.start * p.ld);
        let ds_scale = pow2_scale(L::max_finite_f32(dsp, p.ld, n, keys.end));
        let pp = low.p.as_mut_u16().as_mut_ptr();
        lowp_pack::convert_probs::<L>(dsp, p.ld, n, keys, pp, l.tld, ds_scale);
        let ds = low.p.as_u16();
        let dk = LowTile {
            k: n,
            a: ds,
            a_rs: 1,
            a_cs: l.tld,
            b: q,
            ldb: l.queries.qld,
            c: sc.dk.as_mut_ptr(),
            ldc: d_pad,
            alpha: sc.ones.as_ptr(),
            scale: (1.0 / (ds_scale as f64 * q_scale as f64)) as f32,
            chunk: DS_CHUNK,
            max: std::ptr::null_mut(),
        };
        block::pv_product::<LowTiles<L>>(0..blk.nk, d_pad, dk);
        let dq = LowTile {
            k: blk.nk,
            a: ds,
            a_rs: l.tld,
            a_cs: 1,
            b: low.k.as_u16(),
            ldb: d_pad,
            c: sc.dq.as_mut_ptr().add(seen.start * d_pad),
            ldc: d_pad,
            alpha: std::ptr::null(),
            scale: (1.0 / (ds_scale as f64 * low.k_scale as f64)) as f32,
            chunk: DS_CHUNK,
            max: std::ptr::null_mut(),
        };
        block::pv_product::<LowTiles<L>>(0..n, d_pad, dq);
    }
}
