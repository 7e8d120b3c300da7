//! The tiled online-softmax forward (FlashAttention-2 style) on CPU threads.
//!
//! One task = (batch, query head, block of `block_m` query rows). A task packs its Q block once,
//! transposed and pre-scaled (`Qt[d][block_m]`), then walks the visible key blocks of `block_n`
//! keys: `S^T = K_blk · Qt` (keys x queries, so the softmax vectorises across queries), score
//! mod and mask, `P = 2^(S - m)`, `O = O * alpha + P · V_blk`. Only per-worker tile scratch is
//! allocated; the score matrix never exists. Key blocks the mask hides entirely are skipped
//! because each task only walks the union of its rows' visible keys (`Mask::keys`), and inside
//! a block the tiles of query rows that see none of its keys are skipped too.
//!
//! NaN: a NaN score gives p = NaN (the vector exp2 propagates it), so every row that sees a
//! NaN key or has a NaN query comes out NaN in out and LSE; the row max ignores NaN.

use crate::block::{self, PvTiles, QkTiles, ScoreBlock};
use crate::device::Isa;
use crate::forward_lowp::{LowLayout, LowProducts, LowScratch};
use crate::io::{AlignedBuf, LseBuf, OutBuf, RowLayout, Src};
use crate::lowp::Lowp;
use crate::params::{forward_blocks, odd_lines, Blocks};
use crate::simd::{Simd, Tile};
use crate::thread_pool::{Kernel, ThreadPool};
use flashattn_core::{CheckedSpec, Output, Result, ScoreMod, SeqBounds, TensorRef};
use std::f32::consts::{LN_2, LOG2_E};
use std::ops::Range;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Task {
    pub b: usize,
    pub h: usize,
    pub q0: usize,
}

/// Everything the workers share for one forward call.
pub(crate) struct Problem<'a> {
    pub spec: CheckedSpec<'a>,
    pub q: Src<'a>,
    pub k: Src<'a>,
    pub v: Src<'a>,
    /// Where q's, k's and v's rows lie (the spec's strides, or contiguous).
    pub rows: [RowLayout; 3],
    out: OutBuf,
    lse: Option<LseBuf>,
    tasks: Vec<Task>,
    /// Multiplier folded into Q when packing (into the scores with low-precision tiles):
    /// scale, times log2(e) unless softcap needs the natural-scale score first.
    pub q_mul: f32,
    /// Whether scores need the scalar softcap / ALiBi pass.
    post: bool,
    /// Value dimension padded to the vector width (O scratch row length).
    pub dv_pad: usize,
    /// f32 V with `dv` a multiple of the vector width is read in place, else packed.
    v_direct: bool,
    /// f32 K read in place, else packed.
    k_direct: bool,
    pub blocks: Blocks,
    /// Row stride of Qt and S^T (floats): block_m, padded to an odd number of cache lines.
    pub ld: usize,
    /// Row stride of the packed V block: dv_pad, padded likewise when the P·V loop reads
    /// it in chunks narrower than a row.
    vld: usize,
    /// The low-precision tiles' layout, when this call's dtype and instruction set use them.
    pub low: Option<LowLayout>,
}

/// Per-worker tile scratch: O(block_m * (d + dv) + block_n * (block_m + d + dv)) floats,
/// independent of the sequence lengths.
pub(crate) struct Scratch {
    qt: AlignedBuf,
    kp: AlignedBuf,
    vp: AlignedBuf,
    pub s: AlignedBuf,
    pub o: AlignedBuf,
    m: AlignedBuf,
    pub l: AlignedBuf,
    pub alpha: AlignedBuf,
    pub m_use: AlignedBuf,
    pub m_blk: AlignedBuf,
    row: Vec<f32>,
    lo: Vec<usize>,
    hi: Vec<usize>,
    /// The low-precision operands (empty with the f32 tiles).
    pub low: LowScratch,
}

impl Scratch {
    fn new(p: &Problem) -> Self {
        let d = p.spec.head_dim;
        let Blocks { block_m, block_n } = p.blocks;
        let f32_tiles = p.low.is_none();
        let size = |n: usize| if f32_tiles { n } else { 0 };
        Scratch {
            qt: AlignedBuf::zeroed(size(d * p.ld)),
            kp: AlignedBuf::zeroed(if p.k_direct { 0 } else { size(block_n * d) }),
            vp: AlignedBuf::zeroed(if p.v_direct { 0 } else { size(block_n * p.vld) }),
            s: AlignedBuf::zeroed(block_n * p.ld),
            o: AlignedBuf::zeroed(block_m * p.dv_pad),
            m: AlignedBuf::zeroed(block_m),
            l: AlignedBuf::zeroed(block_m),
            alpha: AlignedBuf::zeroed(block_m),
            m_use: AlignedBuf::zeroed(block_m),
            // Whole 64-column groups: the f16 tiles fold their column max straight into it.
            m_blk: AlignedBuf::zeroed(block_m.next_multiple_of(64)),
            row: vec![0.0; d.max(p.dv_pad)],
            lo: vec![0; block_m],
            hi: vec![0; block_m],
            low: LowScratch::new(p.low.as_ref(), block_n, p.spec.seqlen_k),
        }
    }
}

/// Vector width of an instruction set's f32 kernels (the padding unit of head dims).
pub(crate) fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512Fp16 | Isa::Avx512Bf16 | Isa::Avx512 => 16,
        Isa::Avx2 | Isa::Portable => 8,
    }
}

/// Flash forward on validated inputs.
pub(crate) fn forward(
    pool: &ThreadPool,
    isa: Isa,
    spec: &CheckedSpec<'_>,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<Output> {
    let lanes = lanes(isa);
    let dv = spec.head_dim_v;
    let blocks = forward_blocks(spec, pool.threads());
    let low = LowLayout::new(isa, spec, blocks);
    let dv_pad = low
        .as_ref()
        .map_or(dv.div_ceil(lanes) * lanes, |l| l.dv_pad);
    let (out_t, out) = OutBuf::zeroed(spec.dtype.output(), spec.sizes.out)?;
    let mut lse_v = if spec.return_lse {
        vec![f32::NEG_INFINITY; spec.sizes.lse]
    } else {
        Vec::new()
    };
    let (k, v) = (Src::new(k)?, Src::new(v)?);
    let rows = [RowLayout::q(spec), RowLayout::k(spec), RowLayout::v(spec)];
    let tasks = tasks(spec, blocks.block_m);
    let problem = Problem {
        spec: *spec,
        q: Src::new(q)?,
        k,
        v,
        rows,
        out,
        lse: spec.return_lse.then(|| LseBuf::new(&mut lse_v)),
        tasks,
        q_mul: if spec.softcap > 0.0 {
            spec.scale
        } else {
            spec.scale * LOG2_E
        },
        post: spec.softcap > 0.0 || spec.alibi.is_some(),
        dv_pad,
        // V is read in place only when its rows are contiguous (one kv head): with more
        // heads a block's rows lie a fixed stride apart and the P·V loop, which revisits
        // 128 rows, would thrash a handful of L1 sets; so the block is packed. K rows are
        // visited 8 at a time, which L1 holds unless the stride is a multiple of 4 KiB
        // (all 8 in the same sets; measured ~10% slower at 8 heads x 128 than packing).
        v_direct: rows[2].token == dv && v.as_f32().is_some() && dv == dv_pad,
        k_direct: k.as_f32().is_some()
            && (rows[1].token == spec.head_dim || !(rows[1].token * 4).is_multiple_of(4096)),
        blocks,
        ld: low.as_ref().map_or(odd_lines(blocks.block_m), |l| l.ld),
        vld: if dv_pad > 64 {
            odd_lines(dv_pad)
        } else {
            dv_pad
        },
        low,
    };
    pool.run_kernel(isa, &problem);
    Ok(Output {
        out: out_t,
        lse: spec.return_lse.then_some(lse_v),
    })
}

/// All (batch, head, query block) tasks, heaviest first when a mask makes them uneven
/// (so the dynamic queue ends with short tasks and the threads finish together).
fn tasks(spec: &CheckedSpec<'_>, block_m: usize) -> Vec<Task> {
    let mut tasks = Vec::new();
    for b in 0..spec.batch {
        let s = spec.seq(b);
        for h in 0..spec.heads_q {
            for q0 in (0..s.q_len).step_by(block_m) {
                tasks.push(Task { b, h, q0 });
            }
        }
    }
    if spec.mask.is_masked() || spec.is_varlen() {
        let work = |t: &Task| {
            let s = spec.seq(t.b);
            let rows = t.q0..(t.q0 + block_m).min(s.q_len);
            let keys = spec.mask.keys_of_rows(rows.clone(), s.q_len, s.k_len);
            keys.len() * rows.len()
        };
        tasks.sort_by_key(|t| std::cmp::Reverse(work(t)));
    }
    tasks
}

impl Kernel for Problem<'_> {
    type Task = Task;
    type Scratch = Scratch;
    fn scratch(&self) -> Scratch {
        Scratch::new(self)
    }
    fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    #[inline(always)]
    unsafe fn run_task<S: Simd>(&self, sc: &mut Scratch, t: Task) {
        run_task::<S, F32Products>(self, sc, t)
    }

    #[inline(always)]
    unsafe fn run_task_low<L: Lowp>(&self, sc: &mut Scratch, t: Task) {
        if self.low.is_some() {
            run_task::<L, LowProducts>(self, sc, t)
        } else {
            run_task::<L, F32Products>(self, sc, t)
        }
    }
}

/// The steps of a task whose operands differ between the f32 tiles and the low-precision
/// tiles (`forward_lowp.rs`); everything else (mask, score mod, online softmax, store) is
/// f32 code shared by both.
pub(crate) trait Products<S: Simd> {
    /// Packs the task's Q block (`rows` valid rows, zero up to `rows_l`).
    unsafe fn load_q(p: &Problem, sc: &mut Scratch, t: Task, s: &SeqBounds, rows_l: usize);
    /// S^T of the block for the query columns `cols` (K packed as needed), in the log2
    /// domain unless the score mod follows.
    unsafe fn scores(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock, cols: Range<usize>);
    /// O = O * alpha + P · V for the query rows `rows` (V packed as needed).
    unsafe fn accumulate(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock, rows: Range<usize>);
    /// Where `store_probs` writes besides S^T: the low-precision P operand and its row
    /// stride (nothing on the f32 path).
    #[inline(always)]
    unsafe fn probs_target(_p: &Problem, _sc: &mut Scratch) -> (*mut u16, usize) {
        (std::ptr::null_mut(), 0)
    }
    /// Whether `scores` leaves the column max of S^T in `m_blk` (its tiles fold it while
    /// they store S^T); otherwise the softmax takes the max itself.
    const FOLDS_MAX: bool = false;
    /// The probabilities (and their row sums, into `l`) of the query rows `0..n` that the
    /// tiles compute in their own arithmetic, returning `n`; the f32 pass does the rest.
    #[inline(always)]
    unsafe fn probs(_p: &Problem, _sc: &mut Scratch, _blk: &ScoreBlock) -> usize {
        0
    }
    /// The probabilities of key `j` for the query lanes from `i`: in place in S^T (`s`, row
    /// stride `ld`), the P·V operand of the f32 tiles.
    #[inline(always)]
    unsafe fn store_probs(
        s: *mut f32,
        ld: usize,
        _to: (*mut u16, usize),
        j: usize,
        i: usize,
        e: S::V,
    ) {
        S::store(s.add(j * ld + i), e)
    }
}

/// The f32 register tiles (`simd.rs`): f16 / bf16 inputs are widened while packing.
pub(crate) struct F32Products;

impl<S: Simd> Products<S> for F32Products {
    #[inline(always)]
    unsafe fn load_q(p: &Problem, sc: &mut Scratch, t: Task, s: &SeqBounds, rows_l: usize) {
        load_q_block(p, sc, t, s, rows_l);
    }
    #[inline(always)]
    unsafe fn scores(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock, cols: Range<usize>) {
        let k = load_k_block(p, sc, blk);
        scores::<S>(p, sc, blk, k, cols);
    }
    #[inline(always)]
    unsafe fn accumulate(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock, rows: Range<usize>) {
        let v = load_v_block(p, sc, blk);
        accumulate_pv::<S>(p, sc, blk, v, rows);
    }
}

/// One query block: load Q, then per visible key block: scores, score mod and mask, online
/// softmax, P·V; then normalise and store.
#[inline(always)]
unsafe fn run_task<S: Simd, O: Products<S>>(p: &Problem, sc: &mut Scratch, t: Task) {
    let spec = &p.spec;
    let s = spec.seq(t.b);
    let rows = p.blocks.block_m.min(s.q_len - t.q0);
    // Rows actually computed: the valid ones rounded up to the vector width (a short last
    // block or a decode step does not pay for a whole block).
    let rows_l = rows.div_ceil(S::LANES) * S::LANES;
    let Some(keys) = block::row_key_ranges(&spec.mask, &s, t.q0, rows, &mut sc.lo, &mut sc.hi)
    else {
        return; // every row is masked: out stays 0, LSE stays -inf
    };
    O::load_q(p, sc, t, &s, rows_l);
    sc.o.as_mut_slice()[..rows_l * p.dv_pad].fill(0.0);
    sc.m.as_mut_slice().fill(f32::NEG_INFINITY);
    sc.l.as_mut_slice().fill(0.0);
    let sm = ScoreMod::of(spec, t.b, t.h);
    let kh = spec.kv_head(t.h);
    for j0 in keys.clone().step_by(p.blocks.block_n) {
        let blk = ScoreBlock {
            s,
            q0: t.q0,
            rows,
            rows_l,
            j0,
            nk: p.blocks.block_n.min(keys.end - j0),
            kh,
            query_stride: 1,
            key_stride: p.ld,
        };
        let seen = block::rows_seeing(&sc.lo, &sc.hi, rows, j0..j0 + blk.nk);
        let seen_l = seen.start..seen.end.div_ceil(S::LANES) * S::LANES;
        O::scores(p, sc, &blk, seen_l.clone());
        if p.post {
            block::score_mod(sc.s.as_mut_slice(), &blk, 0..rows, &sm, None);
        }
        let masked = block::mask_block(sc.s.as_mut_slice(), &blk, 0..rows_l, &sc.lo, &sc.hi);
        online_softmax::<S, O>(p, sc, &blk, !masked && !p.post);
        O::accumulate(p, sc, &blk, seen_l);
    }
    store(p, sc, t, &s, rows);
}

/// Qt[x][i] = q[i][x] * q_mul; padding rows are zero.
#[inline(always)]
fn load_q_block(p: &Problem, sc: &mut Scratch, t: Task, s: &SeqBounds, rows_l: usize) {
    let (d, q_rows) = (p.spec.head_dim, p.rows[0]);
    let rows = p.blocks.block_m.min(s.q_len - t.q0);
    block::pack_transposed(
        &p.q,
        (q_rows.at(s.q_start + t.q0, t.h), q_rows.token),
        (rows, rows_l),
        d,
        p.q_mul,
        &mut sc.row,
        sc.qt.as_mut_slice(),
        p.ld,
    );
}

/// The block's K rows and their stride: in place for f32, else widened into `kp`.
#[inline(always)]
unsafe fn load_k_block(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock) -> (*const f32, usize) {
    let d = p.spec.head_dim;
    let (off, stride) = blk.key_rows(p.rows[1]);
    match p.k.as_f32() {
        Some(k) if p.k_direct => (k.as_ptr().add(off), stride),
        _ => {
            block::pack_rows(&p.k, off, stride, blk.nk, d, sc.kp.as_mut_slice(), d);
            (sc.kp.as_ptr(), d)
        }
    }
}

/// The block's V rows and their stride: in place for f32 with a vector-multiple dv, else
/// widened and padded into `vp`.
#[inline(always)]
unsafe fn load_v_block(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock) -> (*const f32, usize) {
    let dv = p.spec.head_dim_v;
    let (off, stride) = blk.key_rows(p.rows[2]);
    match (p.v_direct, p.v.as_f32()) {
        (true, Some(v)) => (v.as_ptr().add(off), stride),
        _ => {
            block::pack_rows(&p.v, off, stride, blk.nk, dv, sc.vp.as_mut_slice(), p.vld);
            (sc.vp.as_ptr(), p.vld)
        }
    }
}

/// S^T[j][i] = k_j · qt_i (keys x queries) for the query columns `cols`.
#[inline(always)]
unsafe fn scores<S: Simd>(
    p: &Problem,
    sc: &mut Scratch,
    blk: &ScoreBlock,
    (kptr, krs): (*const f32, usize),
    cols: Range<usize>,
) {
    block::qk_product::<QkTiles<S>>(
        blk.nk,
        cols,
        Tile {
            k: p.spec.head_dim,
            a: kptr,
            a_rs: krs,
            a_cs: 1,
            b: sc.qt.as_ptr(),
            ldb: p.ld,
            c: sc.s.as_mut_ptr(),
            ldc: p.ld,
            alpha: std::ptr::null(),
        },
    );
}

/// Online softmax, vectorised across queries: the block's row max (the one the tiles folded
/// when `as_scored`: no mask or score mod changed S^T since), the rescale factor of the
/// running O and l (`alpha`), then `P = 2^(S - m)` in place and `l = l * alpha + rowsum(P)`.
#[inline(always)]
unsafe fn online_softmax<S: Simd, O: Products<S>>(
    p: &Problem,
    sc: &mut Scratch,
    blk: &ScoreBlock,
    as_scored: bool,
) {
    let (ld, nk, rows_l) = (blk.key_stride, blk.nk, blk.rows_l);
    let to = O::probs_target(p, sc);
    let sp = sc.s.as_mut_ptr();
    if !(as_scored && O::FOLDS_MAX) {
        let mb = sc.m_blk.as_mut_ptr();
        for ig in (0..rows_l).step_by(S::LANES) {
            let mut mx = S::splat(f32::NEG_INFINITY);
            for j in 0..nk {
                mx = S::max(mx, S::load(sp.add(j * ld + ig)));
            }
            S::store(mb.add(ig), mx);
        }
    }
    {
        let m = sc.m.as_mut_slice();
        let alpha = sc.alpha.as_mut_slice();
        let m_use = sc.m_use.as_mut_slice();
        let m_blk = sc.m_blk.as_slice();
        for i in 0..rows_l {
            let m_new = m[i].max(m_blk[i]);
            if m_new == f32::NEG_INFINITY {
                // Nothing visible yet: keep O and l at 0, p = 2^-inf = 0.
                alpha[i] = 1.0;
                m_use[i] = 0.0;
            } else {
                // Once a row's max settles it rarely moves: skip the libm call (2% at d 64).
                alpha[i] = if m[i] == m_new {
                    1.0
                } else {
                    (m[i] - m_new).exp2()
                };
                m_use[i] = m_new;
            }
            m[i] = m_new;
        }
    }
    let done = O::probs(p, sc, blk);
    let (lp, ap, up) = (sc.l.as_mut_ptr(), sc.alpha.as_ptr(), sc.m_use.as_ptr());
    for ig in (done..rows_l).step_by(S::LANES) {
        let mu = S::load(up.add(ig));
        let mut sum = S::zero();
        for j in 0..nk {
            let e = S::exp2(S::sub(S::load(sp.add(j * ld + ig)), mu));
            O::store_probs(sp, ld, to, j, ig, e);
            sum = S::add(sum, e);
        }
        let l = S::fma(S::load(lp.add(ig)), S::load(ap.add(ig)), sum);
        S::store(lp.add(ig), l);
    }
}

/// O = O * alpha + P · V for the rows `rows` (those that see a key of the block).
#[inline(always)]
unsafe fn accumulate_pv<S: Simd>(
    p: &Problem,
    sc: &mut Scratch,
    blk: &ScoreBlock,
    (vptr, vrs): (*const f32, usize),
    rows: Range<usize>,
) {
    block::pv_product::<PvTiles<S>>(
        rows,
        p.dv_pad,
        Tile {
            k: blk.nk,
            a: sc.s.as_ptr(),
            a_rs: 1,
            a_cs: p.ld,
            b: vptr,
            ldb: vrs,
            c: sc.o.as_mut_ptr(),
            ldc: p.dv_pad,
            alpha: sc.alpha.as_ptr(),
        },
    );
}

/// Normalises once and writes out and LSE. A row that saw no key (l = 0) keeps out 0 and
/// LSE -inf; a NaN l (a NaN score) writes NaN.
#[inline(always)]
unsafe fn store(p: &Problem, sc: &mut Scratch, t: Task, s: &SeqBounds, rows: usize) {
    let (hq, dv, dv_pad) = (p.spec.heads_q, p.spec.head_dim_v, p.dv_pad);
    let o = sc.o.as_mut_slice();
    let (m, l) = (sc.m.as_slice(), sc.l.as_slice());
    for i in 0..rows {
        if l[i] == 0.0 {
            continue; // fully masked row: out 0, LSE -inf (already there)
        }
        let inv = 1.0 / l[i];
        let orow = &mut o[i * dv_pad..i * dv_pad + dv];
        for x in orow.iter_mut() {
            *x *= inv;
        }
        // SAFETY: row (token, head t.h) and its LSE entry belong to this task only.
        p.out
            .write_row(((s.q_start + t.q0 + i) * hq + t.h) * dv, orow);
        if let Some(lse) = &p.lse {
            lse.write(
                p.spec.lse_index(t.b, t.h, t.q0 + i),
                (m[i] + l[i].log2()) * LN_2,
            );
        }
    }
}
