//! The backward pass (FlashAttention-2's algorithm) on CPU threads, deterministic.
//!
//! First, once per call: head-major f32 copies of Q and dO (`[heads][tokens][d]`, so that a
//! query block's rows are contiguous and read in place by every key block) and
//! `delta = rowsum(dout * out)`. Then one task = (batch, kv head, block of `block_n` keys): it
//! packs K, K^T (pre-scaled) and V^T once, keeps dK and dV of the block in per-worker f32
//! accumulators, and walks the query blocks that see its keys (`Mask::rows_of_keys`), for
//! every query head of the kv head (GQA sums there). Per (query block, head): recompute
//! `S = Q · K^T` (then score mod and mask as the forward), `P = 2^(S - lse)`,
//! `dV += P^T · dO`, `dP = dO · V^T`, `dS = P (dP - delta)` (times the softcap's derivative
//! and the scale), `dK += dS^T · Q`, `dQ_blk = dS · K`. Every block product is a register-tile
//! product of `block.rs`; score blocks are queries x keys (lse and delta are per-row
//! broadcasts), so no query block is ever transposed. Extra memory: the Q and dO copies, the
//! head-major f32 dq accumulator, delta and per-worker tiles, O(tokens x heads) in all.
//!
//! The five block products run on the f32 tiles (`backward_f32.rs`), or for f16 / bf16
//! inputs on AVX512-FP16 on the f16 tiles (`backward_lowp.rs`; dS scaled per block).
//!
//! dq is summed over key blocks without races and in a fixed order: each (batch, head, query
//! block) has a turn counter that says which key block adds next; a task computes its dQ
//! block privately, waits for its turn, adds it, and passes the turn on. Tasks are queued key
//! block first, so a turn never waits on a task that has not started, and in the common case
//! (more heads than threads) the threads work on different heads and never wait at all.
//! The sum order is then the key-block order, whatever the thread count or the run: the
//! gradients are bitwise reproducible. This costs no extra FLOPs, unlike a separate dq pass
//! (which recomputes S and dP: 7 block products instead of 5), and no O(key blocks x tokens)
//! partial-dq buffers.

use crate::backward_f32::F32Bwd;
use crate::backward_io::{head_major, token_major};
use crate::backward_lowp::{BwdLowLayout, BwdLowScratch, LowBwd};
use crate::block::{self, PvTiles, ScoreBlock};
use crate::device::Isa;
use crate::dq_turns::Turns;
use crate::forward::lanes;
use crate::io::{try_zeroed, AlignedBuf, OutBuf, RowLayout, SharedRows, Src};
use crate::lowp::{Format, Lowp};
use crate::params::{backward_blocks, odd_lines, Blocks};
use crate::simd::{Simd, Tile};
use crate::thread_pool::{Kernel, ThreadPool};
use flashattn_core::mask::blocks as block_range;
use flashattn_core::{BackwardInputs, CheckedSpec, Grads, Result, ScoreMod};
use std::f32::consts::LOG2_E;
use std::ops::Range;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Task {
    pub b: usize,
    pub kv_head: usize,
    /// Key block index within the sequence.
    kb: usize,
}

/// Everything the workers share for one backward call.
pub(crate) struct Problem<'a> {
    pub spec: CheckedSpec<'a>,
    /// Q and dO head-major, `[heads_q][q_tokens][d_pad]` (and dv_pad), f32, zero padded: a
    /// query block's rows are contiguous, read in place by every key block.
    pub q: &'a [f32],
    pub dout: &'a [f32],
    pub k: Src<'a>,
    pub v: Src<'a>,
    /// Where k's and v's rows lie (the spec's strides, or contiguous).
    pub k_rows: RowLayout,
    pub v_rows: RowLayout,
    lse: &'a [f32],
    /// rowsum(dout * out), head-major `[heads_q][q_tokens]`.
    delta: &'a [f32],
    dq: SharedRows,
    dk: OutBuf,
    dv: OutBuf,
    tasks: Vec<Task>,
    turns: Turns,
    /// Multiplier folded into K^T: scale, times log2(e) unless softcap needs the natural scale.
    pub k_mul: f32,
    post: bool,
    pub d_pad: usize,
    pub dv_pad: usize,
    blocks: Blocks,
    /// Row stride of K^T, V^T and the score blocks: block_n padded to an odd line count.
    pub ld: usize,
    /// The f16 tiles' layout, when this call's dtype and instruction set use them.
    pub low: Option<BwdLowLayout>,
}

/// Per-worker scratch: O(block_n * (d + dv) + block_m * (block_n + d)) floats.
pub(crate) struct Scratch {
    pub kp: AlignedBuf,
    pub kt: AlignedBuf,
    pub vt: AlignedBuf,
    pub dk: AlignedBuf,
    pub dv: AlignedBuf,
    pub s: AlignedBuf,
    pub dp: AlignedBuf,
    /// The softcap's derivative per score (empty without softcap).
    grad: AlignedBuf,
    pub dq: AlignedBuf,
    lse2: Vec<f32>,
    pub ones: AlignedBuf,
    pub row: Vec<f32>,
    lo: Vec<usize>,
    hi: Vec<usize>,
    /// The f16 tiles' operands (empty on the f32 path).
    pub low: BwdLowScratch,
}

impl Scratch {
    fn new(p: &Problem) -> Self {
        let (d, dv) = (p.spec.head_dim, p.spec.head_dim_v);
        let Blocks { block_m, block_n } = p.blocks;
        let mut ones = AlignedBuf::zeroed(block_m.max(block_n));
        ones.as_mut_slice().fill(1.0);
        // The f16 tiles read K, K^T and V^T in f16 (`low`), not these.
        let f32_t = if p.low.is_some() { 0 } else { p.ld };
        Scratch {
            kp: AlignedBuf::zeroed(block_n * if p.low.is_some() { 0 } else { p.d_pad }),
            kt: AlignedBuf::zeroed(d * f32_t),
            vt: AlignedBuf::zeroed(dv * f32_t),
            dk: AlignedBuf::zeroed(block_n * p.d_pad),
            dv: AlignedBuf::zeroed(block_n * p.dv_pad),
            s: AlignedBuf::zeroed(block_m * p.ld),
            dp: AlignedBuf::zeroed(block_m * p.ld),
            grad: AlignedBuf::zeroed(if p.spec.softcap > 0.0 {
                block_m * p.ld
            } else {
                0
            }),
            dq: AlignedBuf::zeroed(block_m * p.d_pad),
            lse2: vec![0.0; block_m],
            ones,
            row: vec![0.0; d.max(dv)],
            lo: vec![0; block_m],
            hi: vec![0; block_m],
            low: BwdLowScratch::new(p.low.as_ref(), p.blocks),
        }
    }
}

/// Backward on validated inputs (`BackwardInputs` checked against `spec`).
pub(crate) fn backward(
    pool: &ThreadPool,
    isa: Isa,
    spec: &CheckedSpec<'_>,
    inputs: BackwardInputs<'_>,
) -> Result<Grads> {
    let lanes = lanes(isa);
    let (d, dv) = (spec.head_dim, spec.head_dim_v);
    let f16_tiles = BwdLowLayout::applies(isa, spec);
    let blocks = backward_blocks(f16_tiles);
    let (q_in, q_rows) = (Src::new(inputs.q)?, RowLayout::q(spec));
    let mut delta = try_zeroed(spec.sizes.q_tokens, spec.heads_q, "delta")?;
    let out = (
        Src::new(inputs.out)?,
        RowLayout::out(spec, spec.strides.out),
    );
    let (dout_in, dout_rows) = (
        Src::new(inputs.dout)?,
        RowLayout::out(spec, spec.strides.dout),
    );
    let out = Some((out, SharedRows::new(&mut delta)));
    let low = if f16_tiles {
        let (q, dout) = ((q_in, q_rows), (dout_in, dout_rows));
        Some(BwdLowLayout::new(pool, isa, spec, blocks, q, dout)?)
    } else {
        None
    };
    // The f16 tiles' dV, dK and dQ rows are whole f16 registers; they read Q in f16 only.
    let dv_pad = low
        .as_ref()
        .map_or(dv.div_ceil(lanes) * lanes, |l| l.dv_pad);
    let d_pad = low
        .as_ref()
        .map_or(d.div_ceil(lanes) * lanes, |l| l.d_pad());
    let q = match low {
        Some(_) => Vec::new(),
        None => head_major(pool, spec, (q_in, q_rows), d, d_pad, None)?,
    };
    // (On the f16 tiles only delta needs dO in f32; the copy is kept for simplicity.)
    let dout = head_major(pool, spec, (dout_in, dout_rows), dv, dv_pad, out)?;
    // dq accumulates in f32, head-major (a query block's rows are contiguous, not a page
    // apart), and is written out in the input's layout and dtype at the end.
    let mut dq_acc = try_zeroed(spec.sizes.q, 1, "the dq accumulator")?;
    let (dk_t, dk) = OutBuf::zeroed(spec.dtype, spec.sizes.k)?;
    let (dv_t, dv_out) = OutBuf::zeroed(spec.dtype, spec.sizes.v)?;
    let tasks = tasks(spec, blocks);
    let problem = Problem {
        spec: *spec,
        q: &q,
        dout: &dout,
        k: Src::new(inputs.k)?,
        v: Src::new(inputs.v)?,
        k_rows: RowLayout::k(spec),
        v_rows: RowLayout::v(spec),
        lse: inputs.lse,
        delta: &delta,
        dq: SharedRows::new(&mut dq_acc),
        dk,
        dv: dv_out,
        tasks,
        turns: Turns::new(spec, blocks),
        k_mul: if spec.softcap > 0.0 {
            spec.scale
        } else {
            spec.scale * LOG2_E
        },
        post: spec.softcap > 0.0 || spec.alibi.is_some(),
        d_pad,
        dv_pad,
        blocks,
        ld: low.as_ref().map_or(odd_lines(blocks.block_n), |l| l.ld),
        low,
    };
    pool.run_kernel(isa, &problem);
    drop(problem);
    Ok(Grads {
        dq: token_major(pool, spec, &dq_acc)?,
        dk: dk_t,
        dv: dv_t,
    })
}

/// All (batch, kv head, key block) tasks whose keys some query sees, key block first (the
/// order the dq turns need; with causal masks it also puts the heaviest blocks first).
fn tasks(spec: &CheckedSpec<'_>, blocks: Blocks) -> Vec<Task> {
    let mut tasks = Vec::new();
    for b in 0..spec.batch {
        let s = spec.seq(b);
        for kv_head in 0..spec.heads_kv {
            for kb in 0..s.k_len.div_ceil(blocks.block_n) {
                let keys = kb * blocks.block_n..((kb + 1) * blocks.block_n).min(s.k_len);
                if !spec.mask.rows_of_keys(keys, s.q_len, s.k_len).is_empty() {
                    tasks.push(Task { b, kv_head, kb });
                }
            }
        }
    }
    tasks.sort_by_key(|t| t.kb);
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
        run_key_block::<S, F32Bwd>(self, sc, t)
    }

    /// The f16 tiles for S, dP and dV where `low` is set (AVX512-FP16 with f16 / bf16).
    #[inline(always)]
    unsafe fn run_task_low<L: Lowp>(&self, sc: &mut Scratch, t: Task) {
        if self.low.is_some() && L::FORMAT == Format::F16 {
            run_key_block::<L, LowBwd>(self, sc, t)
        } else {
            run_key_block::<L, F32Bwd>(self, sc, t)
        }
    }
}

/// One key block: load K, K^T and V^T, then for each query block that sees it and each
/// query head of the kv head, the block's gradients; finally store dK and dV.
#[inline(always)]
unsafe fn run_key_block<S: Simd, B: BwdProducts<S>>(p: &Problem, sc: &mut Scratch, t: Task) {
    let spec = &p.spec;
    let s = spec.seq(t.b);
    let Blocks { block_m, block_n } = p.blocks;
    let j0 = t.kb * block_n;
    let nk = block_n.min(s.k_len - j0);
    B::load_keys(p, sc, t, j0, nk);
    sc.dk.as_mut_slice()[..nk * p.d_pad].fill(0.0);
    sc.dv.as_mut_slice()[..nk * p.dv_pad].fill(0.0);
    let rows = spec.mask.rows_of_keys(j0..j0 + nk, s.q_len, s.k_len);
    let group = spec.group_size();
    for qb in block_range(rows, block_m) {
        let q0 = qb * block_m;
        let m = block_m.min(s.q_len - q0);
        let blk = ScoreBlock {
            s,
            q0,
            rows: m,
            rows_l: m,
            j0,
            nk,
            kh: t.kv_head,
            query_stride: p.ld,
            key_stride: 1,
        };
        block::row_key_ranges(&spec.mask, &s, q0, m, &mut sc.lo, &mut sc.hi);
        let seen = block::rows_seeing(&sc.lo, &sc.hi, m, j0..j0 + nk);
        let keys = 0..nk.div_ceil(S::LANES) * S::LANES;
        for h in t.kv_head * group..(t.kv_head + 1) * group {
            let part = BlockPart::new(&blk, (t.b, h), seen.clone(), keys.clone());
            block_grads::<S, B>(p, sc, part);
            p.turns.wait(t.b, h, qb, t.kb);
            add_dq(p, sc, part);
            p.turns.pass(t.b, h, qb, t.kb);
        }
    }
    store_dk_dv(p, sc, t, j0, nk);
}

/// The part of a score block that one query head computes: the query rows `seen` of the
/// block `blk` that see its keys, for (batch `b`, head `h`), over the key columns `keys`
/// (whole f32 vectors). (Ranges are not `Copy`, so they are kept as bounds.)
#[derive(Clone, Copy)]
pub(crate) struct BlockPart<'a> {
    pub blk: &'a ScoreBlock,
    pub b: usize,
    pub h: usize,
    seen: (usize, usize),
    keys: (usize, usize),
}

impl<'a> BlockPart<'a> {
    #[inline(always)]
    fn new(
        blk: &'a ScoreBlock,
        (b, h): (usize, usize),
        seen: Range<usize>,
        keys: Range<usize>,
    ) -> Self {
        BlockPart {
            blk,
            b,
            h,
            seen: (seen.start, seen.end),
            keys: (keys.start, keys.end),
        }
    }

    /// The query rows (within the block) that see the key block.
    #[inline(always)]
    pub fn seen(&self) -> Range<usize> {
        self.seen.0..self.seen.1
    }

    /// The key columns (within the block), whole f32 vectors.
    #[inline(always)]
    pub fn keys(&self) -> Range<usize> {
        self.keys.0..self.keys.1
    }

    /// The first head-major row of the rows `seen`.
    #[inline(always)]
    pub fn query_row0(&self, p: &Problem) -> usize {
        self.h * p.spec.sizes.q_tokens + self.blk.s.q_start + self.blk.q0 + self.seen.0
    }
}

/// The block products, on the f32 tiles (`backward_f32.rs`) or the f16 tiles
/// (`backward_lowp.rs`): S, dP, dV, dK and dQ of one `BlockPart`.
pub(crate) trait BwdProducts<S: Simd> {
    /// The task's key block: the operands of S, dP and dQ.
    unsafe fn load_keys(p: &Problem, sc: &mut Scratch, t: Task, j0: usize, nk: usize);
    /// `S = Q · K^T * k_mul` into `sc.s`.
    unsafe fn scores(p: &Problem, sc: &mut Scratch, part: BlockPart);
    /// `dP = dO · V^T` into `sc.dp`.
    unsafe fn dprobs(p: &Problem, sc: &mut Scratch, part: BlockPart);
    /// `dV += P^T · dO` (P in `sc.s`).
    unsafe fn add_dv(p: &Problem, sc: &mut Scratch, part: BlockPart);
    /// `dK += dS^T · Q` and `dQ_blk = dS · K` into `sc.dk` and the rows `seen` of `sc.dq`
    /// (dS in `sc.dp`), after `add_dv`.
    unsafe fn dk_dq(p: &Problem, sc: &mut Scratch, part: BlockPart);
}

/// The `nk` K rows from token `tok0` of `kv_head`, widened to f32 (dQ = dS · K reads them).
#[inline(always)]
pub(crate) fn load_k_rows(p: &Problem, sc: &mut Scratch, tok0: usize, kv_head: usize, nk: usize) {
    let d = p.spec.head_dim;
    let (k0, k_stride) = (p.k_rows.at(tok0, kv_head), p.k_rows.token);
    // Each row is read once (no software prefetch: unlike the forward, a task reads its K and
    // V block once, and prefetching it measured slower).
    let kp = sc.kp.as_mut_slice();
    for j in 0..nk {
        p.k.read_row(k0 + j * k_stride, &mut kp[j * p.d_pad..j * p.d_pad + d]);
    }
}

/// The gradients of one `BlockPart` (a query block and head against the task's key block):
/// dK and dV accumulate in scratch, this block's dQ lands in `sc.dq`.
#[inline(always)]
unsafe fn block_grads<S: Simd, B: BwdProducts<S>>(p: &Problem, sc: &mut Scratch, part: BlockPart) {
    let (ld, blk, seen, keys) = (p.ld, part.blk, part.seen(), part.keys());
    // S = Q · K^T, score mod, mask, P = 2^(S - lse).
    B::scores(p, sc, part);
    if p.post {
        let grad = (p.spec.softcap > 0.0).then_some(sc.grad.as_mut_slice());
        let sm = ScoreMod::of(&p.spec, part.b, part.h);
        block::score_mod(sc.s.as_mut_slice(), blk, seen.clone(), &sm, grad);
    }
    block::mask_block(sc.s.as_mut_slice(), blk, seen.clone(), &sc.lo, &sc.hi);
    load_lse(p, sc, part);
    probabilities::<S>(sc, ld, seen.clone(), keys.clone());
    // dP = dO · V^T, then dS in place (P stays in `sc.s`).
    B::dprobs(p, sc, part);
    let delta = &p.delta[part.query_row0(p) - seen.start..];
    score_grads::<S>(p, sc, delta, seen, keys);
    // dV += P^T · dO, dK += dS^T · Q and dQ_blk = dS · K (dV after dP: the f16 tiles pack
    // dO there).
    B::add_dv(p, sc, part);
    B::dk_dq(p, sc, part);
}

/// `dK += dS^T · Q` over the queries `seen` and `dQ_blk = dS · K` (into the rows `seen` of
/// `sc.dq`, rounded out to whole tiles) on the f32 tiles, dS in `sc.dp`.
#[inline(always)]
pub(crate) unsafe fn dk_dq_f32<S: Simd>(p: &Problem, sc: &mut Scratch, part: BlockPart) {
    let (ld, d_pad, blk, seen) = (p.ld, p.d_pad, part.blk, part.seen());
    let q = p.q.as_ptr().add(part.query_row0(p) * d_pad);
    let t = Tile {
        k: seen.len(),
        a: sc.dp.as_ptr().add(seen.start * ld),
        a_rs: 1,
        a_cs: ld,
        b: q,
        ldb: d_pad,
        c: sc.dk.as_mut_ptr(),
        ldc: d_pad,
        alpha: sc.ones.as_ptr(),
    };
    block::pv_product::<PvTiles<S>>(0..blk.nk, d_pad, t);
    let t = Tile {
        k: blk.nk,
        a: sc.dp.as_ptr(),
        a_rs: ld,
        a_cs: 1,
        b: sc.kp.as_ptr(),
        ldb: d_pad,
        c: sc.dq.as_mut_ptr(),
        ldc: d_pad,
        alpha: std::ptr::null(),
    };
    block::pv_product::<PvTiles<S>>(seen, d_pad, t);
}

/// The LSE of the rows `seen` in log2; +inf for a fully masked row (LSE -inf), so that its
/// P is 0, never NaN.
#[inline(always)]
fn load_lse(p: &Problem, sc: &mut Scratch, part: BlockPart) {
    for i in part.seen() {
        let lse = p.lse[p.spec.lse_index(part.b, part.h, part.blk.q0 + i)];
        sc.lse2[i] = if lse == f32::NEG_INFINITY {
            f32::INFINITY
        } else {
            lse * LOG2_E
        };
    }
}

/// `P = 2^(S - lse2)` in place, rows `rows`, key columns `keys`.
#[inline(always)]
unsafe fn probabilities<S: Simd>(
    sc: &mut Scratch,
    ld: usize,
    rows: Range<usize>,
    keys: Range<usize>,
) {
    let sp = sc.s.as_mut_ptr();
    for i in rows {
        let l = S::splat(sc.lse2[i]);
        for j in keys.clone().step_by(S::LANES) {
            let x = sp.add(i * ld + j);
            S::store(x, S::exp2(S::sub(S::load(x), l)));
        }
    }
}

/// `dS = P (dP - delta) * softcap' * scale` in place of dP, rows `rows` (`delta[i]` is row
/// i's), key columns `keys`.
/// The scale turns the gradient of the score into that of `q·k`, so dQ and dK need no
/// further factor.
#[inline(always)]
unsafe fn score_grads<S: Simd>(
    p: &Problem,
    sc: &mut Scratch,
    delta: &[f32],
    rows: Range<usize>,
    keys: Range<usize>,
) {
    let (pp, dp, gp) = (sc.s.as_ptr(), sc.dp.as_mut_ptr(), sc.grad.as_ptr());
    let scale = S::splat(p.spec.scale);
    let softcap = p.spec.softcap > 0.0;
    for i in rows {
        let delta = S::splat(delta[i]);
        for j in keys.clone().step_by(S::LANES) {
            let at = i * p.ld + j;
            let mut ds = S::mul(S::load(pp.add(at)), S::sub(S::load(dp.add(at)), delta));
            if softcap {
                ds = S::mul(ds, S::load(gp.add(at)));
            }
            S::store(dp.add(at), S::mul(ds, scale));
        }
    }
}

/// Adds this key block's dQ rows into the head-major dq accumulator (the caller holds the
/// turn).
#[inline(always)]
unsafe fn add_dq(p: &Problem, sc: &Scratch, part: BlockPart) {
    let (d, seen) = (p.spec.head_dim, part.seen());
    // SAFETY: the turn of (b, h, this query block) gives this task these dq rows alone.
    let dst = p.dq.rows(part.query_row0(p) * d, seen.len() * d);
    let src = sc.dq.as_slice();
    for (dst, i) in dst.chunks_exact_mut(d).zip(seen) {
        for (x, &y) in dst.iter_mut().zip(&src[i * p.d_pad..]) {
            *x += y;
        }
    }
}

/// Writes the task's dK and dV rows (they belong to this task alone).
#[inline(always)]
unsafe fn store_dk_dv(p: &Problem, sc: &Scratch, t: Task, j0: usize, nk: usize) {
    let (hkv, d, dv) = (p.spec.heads_kv, p.spec.head_dim, p.spec.head_dim_v);
    let row0 = (p.spec.seq(t.b).k_start + j0) * hkv + t.kv_head;
    let (dk, dvs) = (sc.dk.as_slice(), sc.dv.as_slice());
    for j in 0..nk {
        let row = row0 + j * hkv;
        p.dk.write_row(row * d, &dk[j * p.d_pad..j * p.d_pad + d]);
        p.dv.write_row(row * dv, &dvs[j * p.dv_pad..j * p.dv_pad + dv]);
    }
}
