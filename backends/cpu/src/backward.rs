//! The backward pass (FlashAttention-2's algorithm) on CPU threads, deterministic.
//!
//! First `delta = rowsum(dout * out)` for every (token, head). Then one task = (batch, kv
//! head, block of `block_n` keys): it packs its K and V block once, keeps dK and dV of the
//! block in per-worker f32 accumulators, and walks the query blocks that see its keys
//! (`Mask::rows_of_keys`), for every query head of the kv head (GQA sums there). Per
//! (query block, head): recompute `S^T = K · Q^T` (then score mod and mask as the forward),
//! `P^T = 2^(S^T - lse)`, `dV += P^T · dO`, `dP^T = V · dO^T`, `dS^T = P^T (dP^T - delta)`
//! (times the softcap's derivative and the scale), `dK += dS^T · Q`, `dQ_blk = dS · K`.
//! Every block product is a register-tile product of `block.rs`; score blocks are stored
//! keys x queries so that lse and delta vectorise across queries. Extra memory: delta, the
//! f32 dq accumulator (f16/bf16 only: f32 accumulates in dq itself) and per-worker tiles,
//! O(tokens) in all.
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

use crate::block::{self, ScoreBlock};
use crate::device::Isa;
use crate::forward::lanes;
use crate::io::{AlignedBuf, OutBuf, SharedRows, Src};
use crate::params::{backward_blocks, odd_lines, Blocks};
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::simd::{Portable, Simd, Tile};
use crate::thread_pool::{TaskQueue, ThreadPool};
use flashattn_core::mask::blocks as block_range;
use flashattn_core::{BackwardInputs, CheckedSpec, DType, Grads, Result, ScoreMod, Tensor};
use std::f32::consts::LOG2_E;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Clone, Copy, Debug)]
struct Task {
    b: usize,
    kv_head: usize,
    /// Key block index within the sequence.
    kb: usize,
}

/// Everything the workers share for one backward call.
struct Problem<'a> {
    spec: CheckedSpec<'a>,
    q: Src<'a>,
    k: Src<'a>,
    v: Src<'a>,
    dout: Src<'a>,
    lse: &'a [f32],
    /// rowsum(dout * out) per (token, query head).
    delta: &'a [f32],
    dq: SharedRows,
    dk: OutBuf,
    dv: OutBuf,
    tasks: Vec<Task>,
    queue: TaskQueue,
    turns: Turns,
    /// Multiplier folded into Q^T: scale, times log2(e) unless softcap needs the natural scale.
    q_mul: f32,
    post: bool,
    d_pad: usize,
    dv_pad: usize,
    blocks: Blocks,
    /// Row stride of Q^T, dO^T and the score blocks: block_m padded to an odd line count.
    ld: usize,
}

/// Per-worker scratch: O(block_n * (block_m + d + dv) + block_m * (d + dv)) floats.
struct Scratch {
    kp: AlignedBuf,
    vp: AlignedBuf,
    dk: AlignedBuf,
    dv: AlignedBuf,
    qt: AlignedBuf,
    q_rows: AlignedBuf,
    dot: AlignedBuf,
    do_rows: AlignedBuf,
    s: AlignedBuf,
    dp: AlignedBuf,
    /// The softcap's derivative per score (empty without softcap).
    grad: AlignedBuf,
    dq: AlignedBuf,
    lse2: AlignedBuf,
    delta: AlignedBuf,
    ones: AlignedBuf,
    row: Vec<f32>,
    lo: Vec<usize>,
    hi: Vec<usize>,
}

impl Scratch {
    fn new(p: &Problem) -> Self {
        let (d, dv) = (p.spec.head_dim, p.spec.head_dim_v);
        let Blocks { block_m, block_n } = p.blocks;
        let mut ones = AlignedBuf::zeroed(block_m.max(block_n));
        ones.as_mut_slice().fill(1.0);
        Scratch {
            kp: AlignedBuf::zeroed(block_n * p.d_pad),
            vp: AlignedBuf::zeroed(block_n * p.dv_pad),
            dk: AlignedBuf::zeroed(block_n * p.d_pad),
            dv: AlignedBuf::zeroed(block_n * p.dv_pad),
            qt: AlignedBuf::zeroed(d * p.ld),
            q_rows: AlignedBuf::zeroed(block_m * p.d_pad),
            dot: AlignedBuf::zeroed(dv * p.ld),
            do_rows: AlignedBuf::zeroed(block_m * p.dv_pad),
            s: AlignedBuf::zeroed(block_n * p.ld),
            dp: AlignedBuf::zeroed(block_n * p.ld),
            grad: AlignedBuf::zeroed(if p.spec.softcap > 0.0 {
                block_n * p.ld
            } else {
                0
            }),
            dq: AlignedBuf::zeroed(block_m * p.d_pad),
            lse2: AlignedBuf::zeroed(p.ld),
            delta: AlignedBuf::zeroed(p.ld),
            ones,
            row: vec![0.0; d.max(dv)],
            lo: vec![0; block_m],
            hi: vec![0; block_m],
        }
    }
}

/// Whose turn it is to add into the dq rows of each (batch, query head, query block).
struct Turns {
    /// Index of the first query block of each sequence.
    first_block: Vec<usize>,
    heads_q: usize,
    /// The key block that adds next.
    next: Vec<AtomicUsize>,
}

impl Turns {
    /// Each counter starts at the first key block that sees its query block.
    fn new(spec: &CheckedSpec<'_>, blocks: Blocks) -> Turns {
        let (mut first_block, mut next) = (Vec::with_capacity(spec.batch), Vec::new());
        for b in 0..spec.batch {
            let s = spec.seq(b);
            first_block.push(next.len() / spec.heads_q);
            for q0 in (0..s.q_len).step_by(blocks.block_m) {
                let rows = q0..(q0 + blocks.block_m).min(s.q_len);
                let keys = spec.mask.keys_of_rows(rows, s.q_len, s.k_len);
                let kb = keys.start / blocks.block_n;
                next.extend((0..spec.heads_q).map(|_| AtomicUsize::new(kb)));
            }
        }
        Turns {
            first_block,
            heads_q: spec.heads_q,
            next,
        }
    }

    fn counter(&self, b: usize, h: usize, qb: usize) -> &AtomicUsize {
        &self.next[(self.first_block[b] + qb) * self.heads_q + h]
    }

    /// Waits until key block `kb` may add into (b, h, qb). Spins briefly, then yields (the
    /// turn's holder may be descheduled on a loaded machine).
    fn wait(&self, b: usize, h: usize, qb: usize, kb: usize) {
        let c = self.counter(b, h, qb);
        let mut spins = 0u32;
        while c.load(Ordering::Acquire) != kb {
            if spins < 64 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn pass(&self, b: usize, h: usize, qb: usize, kb: usize) {
        self.counter(b, h, qb).store(kb + 1, Ordering::Release);
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
    let delta = row_deltas(pool, spec, Src::new(inputs.out)?, Src::new(inputs.dout)?);
    // dq accumulates in f32: in dq itself for f32, else in a buffer converted at the end.
    let mut dq_acc = vec![0.0f32; spec.sizes.q];
    let (dk_t, dk) = OutBuf::zeroed(spec.dtype, spec.sizes.k)?;
    let (dv_t, dv_out) = OutBuf::zeroed(spec.dtype, spec.sizes.v)?;
    let blocks = backward_blocks();
    let tasks = tasks(spec, blocks);
    let problem = Problem {
        spec: *spec,
        q: Src::new(inputs.q)?,
        k: Src::new(inputs.k)?,
        v: Src::new(inputs.v)?,
        dout: Src::new(inputs.dout)?,
        lse: inputs.lse,
        delta: &delta,
        dq: SharedRows::new(&mut dq_acc),
        dk,
        dv: dv_out,
        queue: TaskQueue::new(tasks.len()),
        tasks,
        turns: Turns::new(spec, blocks),
        q_mul: if spec.softcap > 0.0 {
            spec.scale
        } else {
            spec.scale * LOG2_E
        },
        post: spec.softcap > 0.0 || spec.alibi.is_some(),
        d_pad: d.div_ceil(lanes) * lanes,
        dv_pad: dv.div_ceil(lanes) * lanes,
        blocks,
        ld: odd_lines(blocks.block_m),
    };
    pool.run(problem.tasks.len(), &|| run_worker(isa, &problem));
    drop(problem);
    let dq = match spec.dtype {
        DType::F32 => Tensor::F32(dq_acc),
        dtype => Tensor::from_f32(dtype, &dq_acc),
    };
    Ok(Grads {
        dq,
        dk: dk_t,
        dv: dv_t,
    })
}

/// `delta[token * heads_q + h] = dout_row · out_row` (f32, in a fixed order).
fn row_deltas(pool: &ThreadPool, spec: &CheckedSpec<'_>, out: Src, dout: Src) -> Vec<f32> {
    const CHUNK: usize = 256;
    let dv = spec.head_dim_v;
    let rows = spec.sizes.q_tokens * spec.heads_q;
    let mut delta = vec![0.0f32; rows];
    let shared = SharedRows::new(&mut delta);
    let queue = TaskQueue::new(rows.div_ceil(CHUNK));
    pool.run(rows.div_ceil(CHUNK), &|| {
        let (mut o, mut g) = (vec![0.0f32; dv], vec![0.0f32; dv]);
        while let Some(c) = queue.take() {
            let range = c * CHUNK..((c + 1) * CHUNK).min(rows);
            // SAFETY: each chunk of rows belongs to one task.
            let dst = unsafe { shared.rows(range.start, range.len()) };
            for (r, x) in range.zip(dst) {
                out.read_row(r * dv, &mut o);
                dout.read_row(r * dv, &mut g);
                *x = o.iter().zip(&g).map(|(a, b)| a * b).sum();
            }
        }
    });
    delta
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

fn run_worker(isa: Isa, p: &Problem) {
    let mut sc = Scratch::new(p);
    // SAFETY: a backend only holds an `Isa` that `Isa::available()` confirmed on this CPU.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => worker_avx512(p, &mut sc),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => worker_avx2(p, &mut sc),
            _ => worker::<Portable>(p, &mut sc),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn worker_avx512(p: &Problem, sc: &mut Scratch) {
    worker::<Avx512>(p, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn worker_avx2(p: &Problem, sc: &mut Scratch) {
    worker::<Avx2>(p, sc)
}

#[inline(always)]
unsafe fn worker<S: Simd>(p: &Problem, sc: &mut Scratch) {
    while let Some(t) = p.queue.take() {
        run_task::<S>(p, sc, p.tasks[t]);
    }
}

/// One key block: load K and V, then for each query block that sees it and each query head
/// of the kv head, the block's gradients; finally store dK and dV.
#[inline(always)]
unsafe fn run_task<S: Simd>(p: &Problem, sc: &mut Scratch, t: Task) {
    let spec = &p.spec;
    let s = spec.seq(t.b);
    let Blocks { block_m, block_n } = p.blocks;
    let j0 = t.kb * block_n;
    let nk = block_n.min(s.k_len - j0);
    let (hkv, d, dv) = (spec.heads_kv, spec.head_dim, spec.head_dim_v);
    let k_off = (s.k_start + j0) * hkv + t.kv_head;
    block::pack_rows(
        &p.k,
        k_off * d,
        hkv * d,
        nk,
        d,
        sc.kp.as_mut_slice(),
        p.d_pad,
    );
    block::pack_rows(
        &p.v,
        k_off * dv,
        hkv * dv,
        nk,
        dv,
        sc.vp.as_mut_slice(),
        p.dv_pad,
    );
    sc.dk.as_mut_slice()[..nk * p.d_pad].fill(0.0);
    sc.dv.as_mut_slice()[..nk * p.dv_pad].fill(0.0);
    let rows = spec.mask.rows_of_keys(j0..j0 + nk, s.q_len, s.k_len);
    let group = spec.group_size();
    for qb in block_range(rows, block_m) {
        let q0 = qb * block_m;
        let m = block_m.min(s.q_len - q0);
        let m_l = m.div_ceil(S::LANES) * S::LANES;
        let blk = ScoreBlock {
            s,
            q0,
            rows: m,
            rows_l: m_l,
            j0,
            nk,
            ld: p.ld,
        };
        block::row_key_ranges(&spec.mask, &s, q0, m, &mut sc.lo, &mut sc.hi);
        let seen = block::rows_seeing(&sc.lo, &sc.hi, m, j0..j0 + nk);
        for h in t.kv_head * group..(t.kv_head + 1) * group {
            block_grads::<S>(p, sc, &blk, t.b, h, seen.clone());
            p.turns.wait(t.b, h, qb, t.kb);
            add_dq(p, sc, &blk, h, seen.clone());
            p.turns.pass(t.b, h, qb, t.kb);
        }
    }
    store_dk_dv(p, sc, k_off, nk);
}

/// The gradients of one (query block, head) against the task's key block: dK and dV
/// accumulate in scratch, this block's dQ lands in `sc.dq` (rows `seen`).
#[inline(always)]
unsafe fn block_grads<S: Simd>(
    p: &Problem,
    sc: &mut Scratch,
    blk: &ScoreBlock,
    b: usize,
    h: usize,
    seen: Range<usize>,
) {
    // Columns (queries) worked on: the rows that see the block, in whole vectors.
    let cols = seen.start / S::LANES * S::LANES..seen.end.div_ceil(S::LANES) * S::LANES;
    load_query_block(p, sc, blk, b, h);
    // S^T = K · Q^T, score mod, mask, P^T = 2^(S^T - lse).
    block::rows_by_queries::<S>(
        blk.nk,
        cols.clone(),
        product(
            p.spec.head_dim,
            sc.kp.as_ptr(),
            p.d_pad,
            sc.qt.as_ptr(),
            sc.s.as_mut_ptr(),
            p.ld,
        ),
    );
    if p.post {
        let grad = (p.spec.softcap > 0.0).then_some(sc.grad.as_mut_slice());
        block::score_mod(sc.s.as_mut_slice(), blk, &ScoreMod::of(&p.spec, b, h), grad);
    }
    block::mask_block(sc.s.as_mut_slice(), blk, &sc.lo, &sc.hi);
    probabilities::<S>(sc, blk, cols.clone());
    // dP^T = V · dO^T, then dS^T in place.
    block::rows_by_queries::<S>(
        blk.nk,
        cols.clone(),
        product(
            p.spec.head_dim_v,
            sc.vp.as_ptr(),
            p.dv_pad,
            sc.dot.as_ptr(),
            sc.dp.as_mut_ptr(),
            p.ld,
        ),
    );
    score_grads::<S>(p, sc, blk, cols);
    // dV += P^T · dO and dK += dS^T · Q over the queries that see the block.
    let k = seen.len();
    let (a0, ld) = (seen.start, p.ld);
    for (a, bm, ldb, c, width) in [
        (
            sc.s.as_ptr(),
            sc.do_rows.as_ptr(),
            p.dv_pad,
            sc.dv.as_mut_ptr(),
            p.dv_pad,
        ),
        (
            sc.dp.as_ptr(),
            sc.q_rows.as_ptr(),
            p.d_pad,
            sc.dk.as_mut_ptr(),
            p.d_pad,
        ),
    ] {
        block::rows_by_columns::<S>(
            0..blk.nk,
            width,
            Tile {
                k,
                a: a.add(a0),
                a_rs: ld,
                a_cs: 1,
                b: bm.add(a0 * ldb),
                ldb,
                c,
                ldc: width,
                alpha: sc.ones.as_ptr(),
            },
        );
    }
    // dQ_blk = dS · K (overwrites the rows `seen`, rounded out to whole tiles).
    block::rows_by_columns::<S>(
        seen,
        p.d_pad,
        Tile {
            k: blk.nk,
            a: sc.dp.as_ptr(),
            a_rs: 1,
            a_cs: ld,
            b: sc.kp.as_ptr(),
            ldb: p.d_pad,
            c: sc.dq.as_mut_ptr(),
            ldc: p.d_pad,
            alpha: std::ptr::null(),
        },
    );
}

/// The `C^T = A · B^T` product of a key block's rows `a` (`k` wide, row stride `a_rs`)
/// with a transposed query block `bt` into `c` (both `ld` apart).
fn product(k: usize, a: *const f32, a_rs: usize, bt: *const f32, c: *mut f32, ld: usize) -> Tile {
    Tile {
        k,
        a,
        a_rs,
        a_cs: 1,
        b: bt,
        ldb: ld,
        c,
        ldc: ld,
        alpha: std::ptr::null(),
    }
}

/// Packs the query block of head `h`: Q^T (pre-scaled), Q rows, dO^T, dO rows, the LSE in
/// log2 (+inf for masked rows and padding, so their P is 0, never NaN) and delta.
#[inline(always)]
fn load_query_block(p: &Problem, sc: &mut Scratch, blk: &ScoreBlock, b: usize, h: usize) {
    let spec = &p.spec;
    let (hq, d, dv) = (spec.heads_q, spec.head_dim, spec.head_dim_v);
    let (m, m_l) = (blk.rows, blk.rows_l);
    let tok = blk.s.q_start + blk.q0;
    let (q_off, o_off) = ((tok * hq + h) * d, (tok * hq + h) * dv);
    let (qt, dot) = (sc.qt.as_mut_slice(), sc.dot.as_mut_slice());
    block::pack_transposed(
        &p.q,
        (q_off, hq * d),
        (m, m_l),
        d,
        p.q_mul,
        &mut sc.row,
        qt,
        p.ld,
    );
    block::pack_rows(&p.q, q_off, hq * d, m, d, sc.q_rows.as_mut_slice(), p.d_pad);
    block::pack_transposed(
        &p.dout,
        (o_off, hq * dv),
        (m, m_l),
        dv,
        1.0,
        &mut sc.row,
        dot,
        p.ld,
    );
    block::pack_rows(
        &p.dout,
        o_off,
        hq * dv,
        m,
        dv,
        sc.do_rows.as_mut_slice(),
        p.dv_pad,
    );
    let (lse2, delta) = (sc.lse2.as_mut_slice(), sc.delta.as_mut_slice());
    for i in 0..m_l {
        (lse2[i], delta[i]) = if i < m {
            let lse = p.lse[spec.lse_index(b, h, blk.q0 + i)];
            let lse2 = if lse == f32::NEG_INFINITY {
                f32::INFINITY
            } else {
                lse * LOG2_E
            };
            (lse2, p.delta[(tok + i) * hq + h])
        } else {
            (f32::INFINITY, 0.0)
        };
    }
}

/// `P^T = 2^(S^T - lse2)` in place, over the query columns `cols`.
#[inline(always)]
unsafe fn probabilities<S: Simd>(sc: &mut Scratch, blk: &ScoreBlock, cols: Range<usize>) {
    let (sp, lp) = (sc.s.as_mut_ptr(), sc.lse2.as_ptr());
    for ig in cols.step_by(S::LANES) {
        let l = S::load(lp.add(ig));
        for j in 0..blk.nk {
            let x = sp.add(j * blk.ld + ig);
            S::store(x, S::exp2(S::sub(S::load(x), l)));
        }
    }
}

/// `dS^T = P^T (dP^T - delta) * softcap' * scale` in place of dP^T, over `cols`. The scale
/// turns the gradient of the score into that of `q·k`, so dQ and dK need no further factor.
#[inline(always)]
unsafe fn score_grads<S: Simd>(
    p: &Problem,
    sc: &mut Scratch,
    blk: &ScoreBlock,
    cols: Range<usize>,
) {
    let (pp, dp, gp, dl) = (
        sc.s.as_ptr(),
        sc.dp.as_mut_ptr(),
        sc.grad.as_ptr(),
        sc.delta.as_ptr(),
    );
    let scale = S::splat(p.spec.scale);
    let softcap = p.spec.softcap > 0.0;
    for ig in cols.step_by(S::LANES) {
        let delta = S::load(dl.add(ig));
        for j in 0..blk.nk {
            let at = j * blk.ld + ig;
            let mut ds = S::mul(S::load(pp.add(at)), S::sub(S::load(dp.add(at)), delta));
            if softcap {
                ds = S::mul(ds, S::load(gp.add(at)));
            }
            S::store(dp.add(at), S::mul(ds, scale));
        }
    }
}

/// Adds this key block's dQ rows into the dq accumulator (the caller holds the turn).
#[inline(always)]
unsafe fn add_dq(p: &Problem, sc: &Scratch, blk: &ScoreBlock, h: usize, seen: Range<usize>) {
    let (hq, d) = (p.spec.heads_q, p.spec.head_dim);
    let src = sc.dq.as_slice();
    for i in seen {
        // SAFETY: the turn of (b, h, this query block) gives this task its dq rows alone.
        let dst = p.dq.rows(((blk.s.q_start + blk.q0 + i) * hq + h) * d, d);
        for (x, &y) in dst.iter_mut().zip(&src[i * p.d_pad..]) {
            *x += y;
        }
    }
}

/// Writes the task's dK and dV rows (they belong to this task alone).
#[inline(always)]
unsafe fn store_dk_dv(p: &Problem, sc: &Scratch, k_off: usize, nk: usize) {
    let (hkv, d, dv) = (p.spec.heads_kv, p.spec.head_dim, p.spec.head_dim_v);
    let (dk, dvs) = (sc.dk.as_slice(), sc.dv.as_slice());
    for j in 0..nk {
        let row = k_off + j * hkv;
        p.dk.write_row(row * d, &dk[j * p.d_pad..j * p.d_pad + d]);
        p.dv.write_row(row * dv, &dvs[j * p.dv_pad..j * p.dv_pad + dv]);
    }
}
