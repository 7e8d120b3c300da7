//! Split-KV attention for decode ("flash decoding"): few query rows against a long cache.
//!
//! Decode is memory-bound, so the kernel is built around reading each K / V row once:
//! - the query rows that share a KV head (GQA group x seqlen_q) form one tile, so a key row
//!   is widened once and used by every query head of its group;
//! - the keys of each batch entry are split into chunks; a task = (batch, chunk, a range of
//!   KV heads) walks its chunk in blocks of `BC` keys, all its heads per block (with every
//!   head, a block is one contiguous run of the cache), and leaves a partial
//!   (unnormalised out, running max `m`, sum `l`, log2 domain) per (batch, KV head, chunk);
//! - a combine pass merges the chunks: `M = max m_c`, `L = sum 2^(m_c - M) l_c`,
//!   `out = sum 2^(m_c - M) O_c / L`, `lse = M + log2 L` (chunks a row does not see have
//!   `m_c = -inf` and weigh nothing).
//!
//! f16 / bf16 caches are widened in registers (`widen.rs`). Keys a row's mask hides get
//! probability 0 and, at the block edges, are skipped in the P·V product, so a NaN in a
//! hidden V row never leaks into the row; a NaN or +inf score of a visible key makes the
//! row NaN (output and LSE), as in the reference.

use crate::io::{LseBuf, OutBuf};
use crate::isa::Isa;
use crate::parallel::Pool;
use crate::simd::Portable;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::widen::{Elem, Widen};
use flashattn_core::{AttentionSpec, KvCache, Mask};
use std::f32::consts::{LN_2, LOG2_E};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Keys per block: the scores of one block and head stay in L1.
const BC: usize = 64;
/// Bytes of K and V one task reads, at most and at least (long caches give many tasks, so
/// the threads balance; a tiny cache gives one).
const MAX_TASK_BYTES: usize = 2 << 20;
const MIN_TASK_BYTES: usize = 64 << 10;
/// Tasks per thread aimed for when the cache is short.
const TASKS_PER_THREAD: usize = 8;
/// Bound on the partial results' memory (they are small next to the cache in decode; this
/// caps many-row calls).
const MAX_PARTIAL_FLOATS: usize = 8 << 20;

/// One decode call's attention, after the append: what every worker reads.
pub(crate) struct Attend<'a, E> {
    pub spec: &'a AttentionSpec,
    pub cache: &'a KvCache,
    pub mask: Mask,
    pub k: &'a [E],
    pub v: &'a [E],
    /// q per (batch, KV head): `[batch, heads_kv, rows, d_pad]`, rotated, pre-scaled by the
    /// softmax scale (and log2(e) unless softcap needs the natural-scale score first).
    pub q: &'a [f32],
    pub d_pad: usize,
    /// Query rows of one (batch, KV head): row `r = i * group + g` is query row `i` of head
    /// `kv_head * group + g`.
    pub rows: usize,
    /// Keys each batch entry walks: the union of its rows' visible keys.
    pub walk: Vec<Range<usize>>,
}

#[derive(Clone, Copy, Debug)]
struct Task {
    b: usize,
    chunk: usize,
    heads: (usize, usize),
}

/// How the keys are split.
struct Plan {
    /// Keys per chunk (a multiple of BC).
    chunk: usize,
    /// Chunks of the longest walk: the partials' stride.
    chunks: usize,
    tasks: Vec<Task>,
}

impl Plan {
    fn new<E>(p: &Attend<'_, E>, threads: usize) -> Plan {
        let spec = p.spec;
        let hkv = spec.heads_kv;
        let row_bytes = (spec.head_dim + spec.head_dim_v) * std::mem::size_of::<E>();
        let keys: usize = p.walk.iter().map(|w| w.len()).sum();
        let longest = p.walk.iter().map(|w| w.len()).max().unwrap_or(0);
        let target = (keys * hkv * row_bytes / (threads * TASKS_PER_THREAD).max(1))
            .clamp(MIN_TASK_BYTES, MAX_TASK_BYTES);
        // All KV heads per task where one block of them fits the target (then a block is
        // one contiguous run of memory), else fewer.
        let heads = (target / (BC * row_bytes)).clamp(1, hkv);
        let mut chunk = (target / (heads * row_bytes) / BC).max(1) * BC;
        let per_chunk = spec.batch * hkv * p.rows * (spec.head_dim_v + 2);
        let max_chunks = (MAX_PARTIAL_FLOATS / per_chunk.max(1)).max(1);
        if longest.div_ceil(chunk) > max_chunks {
            chunk = longest.div_ceil(max_chunks).div_ceil(BC) * BC;
        }
        let mut tasks = Vec::new();
        for (b, w) in p.walk.iter().enumerate() {
            for c in 0..w.len().div_ceil(chunk) {
                for h0 in (0..hkv).step_by(heads) {
                    tasks.push(Task {
                        b,
                        chunk: c,
                        heads: (h0, (h0 + heads).min(hkv)),
                    });
                }
            }
        }
        Plan {
            chunk,
            chunks: longest.div_ceil(chunk),
            tasks,
        }
    }
}

/// Partial results of every (batch, KV head, chunk): O `[rows, dv]`, then m and l `[rows]`.
struct Partials {
    o: *mut f32,
    ml: *mut f32,
    rows: usize,
    dv: usize,
    chunks: usize,
    heads_kv: usize,
}

// SAFETY: each (batch, KV head, chunk) slot is written by the one task that owns it, and
// read by the combine pass only after every task has finished.
unsafe impl Sync for Partials {}

/// One slot's pointers.
#[derive(Clone, Copy)]
struct Slot {
    o: *mut f32,
    m: *mut f32,
    l: *mut f32,
}

impl Partials {
    fn slot(&self, b: usize, kh: usize, chunk: usize) -> Slot {
        let s = (b * self.heads_kv + kh) * self.chunks + chunk;
        // SAFETY: `s` < batch * heads_kv * chunks, the buffers' slot count.
        unsafe {
            Slot {
                o: self.o.add(s * self.rows * self.dv),
                m: self.ml.add(s * self.rows * 2),
                l: self.ml.add(s * self.rows * 2 + self.rows),
            }
        }
    }
}

/// Runs the chunk tasks, then combines them into `out` and `lse`.
pub(crate) fn attend<E: Elem>(
    pool: &Pool,
    isa: Isa,
    p: &Attend<'_, E>,
    out: &OutBuf,
    lse: Option<&LseBuf>,
) {
    let plan = Plan::new(p, pool.threads());
    let (hkv, dv) = (p.spec.heads_kv, p.spec.head_dim_v);
    let slots = p.spec.batch * hkv * plan.chunks;
    let mut o = vec![0.0f32; slots * p.rows * dv];
    let mut ml = vec![0.0f32; slots * p.rows * 2];
    let part = Partials {
        o: o.as_mut_ptr(),
        ml: ml.as_mut_ptr(),
        rows: p.rows,
        dv,
        chunks: plan.chunks,
        heads_kv: hkv,
    };
    let next = AtomicUsize::new(0);
    pool.run(plan.tasks.len(), &|| {
        // SAFETY: a backend only holds an `Isa` that `Isa::available()` confirmed.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => worker_avx512(p, &plan, &part, &next),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => worker_avx2(p, &plan, &part, &next),
                _ => worker::<Portable, E>(p, &plan, &part, &next),
            }
        }
    });
    let jobs = p.spec.batch * hkv;
    let next = AtomicUsize::new(0);
    pool.run(jobs, &|| {
        let mut acc = vec![0.0f32; dv];
        loop {
            let job = next.fetch_add(1, Ordering::Relaxed);
            if job >= jobs {
                break;
            }
            combine(p, &plan, &part, job / hkv, job % hkv, &mut acc, out, lse);
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn worker_avx512<E: Elem>(
    p: &Attend<'_, E>,
    plan: &Plan,
    part: &Partials,
    next: &AtomicUsize,
) {
    worker::<Avx512, E>(p, plan, part, next)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn worker_avx2<E: Elem>(
    p: &Attend<'_, E>,
    plan: &Plan,
    part: &Partials,
    next: &AtomicUsize,
) {
    worker::<Avx2, E>(p, plan, part, next)
}

/// Per-worker scratch: a block's scores and row state, O(rows x BC).
struct Scratch<E> {
    /// Scores, then probabilities, `[rows][BC]`.
    s: Vec<f32>,
    alpha: Vec<f32>,
    /// Visible keys `[lo, hi)` and log2-domain ALiBi slope of each row.
    lo: Vec<usize>,
    hi: Vec<usize>,
    slope: Vec<f32>,
    /// Cache rows of the block's keys, and this head's K / V row pointers.
    crow: Vec<usize>,
    kp: Vec<*const E>,
    vp: Vec<*const E>,
}

#[inline(always)]
unsafe fn worker<S: Widen, E: Elem>(
    p: &Attend<'_, E>,
    plan: &Plan,
    part: &Partials,
    next: &AtomicUsize,
) {
    let rows = p.rows;
    let mut sc = Scratch {
        s: vec![0.0; rows * BC],
        alpha: vec![0.0; rows],
        lo: vec![0; rows],
        hi: vec![0; rows],
        slope: vec![0.0; rows],
        crow: vec![0; BC],
        kp: vec![std::ptr::null(); BC],
        vp: vec![std::ptr::null(); BC],
    };
    loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        let Some(&task) = plan.tasks.get(t) else {
            break;
        };
        run_task::<S, E>(p, plan, part, &mut sc, task);
    }
}

#[inline(always)]
unsafe fn run_task<S: Widen, E: Elem>(
    p: &Attend<'_, E>,
    plan: &Plan,
    part: &Partials,
    sc: &mut Scratch<E>,
    t: Task,
) {
    let spec = p.spec;
    let s = spec.seq(t.b);
    let group = spec.group_size();
    let (dv, hkv) = (spec.head_dim_v, spec.heads_kv);
    for r in 0..p.rows {
        let keys = p.mask.keys(r / group, s.q_len, s.k_len);
        (sc.lo[r], sc.hi[r]) = (keys.start, keys.end);
    }
    let c0 = p.walk[t.b].start + t.chunk * plan.chunk;
    let c1 = (c0 + plan.chunk).min(p.walk[t.b].end);
    for kh in t.heads.0..t.heads.1 {
        let slot = part.slot(t.b, kh, t.chunk);
        std::slice::from_raw_parts_mut(slot.o, p.rows * dv).fill(0.0);
        std::slice::from_raw_parts_mut(slot.m, p.rows).fill(f32::NEG_INFINITY);
        std::slice::from_raw_parts_mut(slot.l, p.rows).fill(0.0);
    }
    let mut j0 = c0;
    while j0 < c1 {
        let nk = BC.min(c1 - j0);
        for (jj, row) in sc.crow[..nk].iter_mut().enumerate() {
            *row = p.cache.row(t.b, j0 + jj);
        }
        for kh in t.heads.0..t.heads.1 {
            for r in 0..p.rows {
                let h = kh * group + r % group;
                sc.slope[r] = spec.alibi_slope(t.b, h) * LOG2_E;
            }
            for jj in 0..nk {
                let row = sc.crow[jj] * hkv + kh;
                sc.kp[jj] = p.k.as_ptr().add(row * spec.head_dim);
                sc.vp[jj] = p.v.as_ptr().add(row * dv);
            }
            let slot = part.slot(t.b, kh, t.chunk);
            block::<S, E>(p, sc, slot, t.b, kh, j0, nk);
        }
        j0 += nk;
    }
}

/// One block of `nk` keys for one KV head: scores, online softmax, O += P·V.
#[inline(always)]
unsafe fn block<S: Widen, E: Elem>(
    p: &Attend<'_, E>,
    sc: &mut Scratch<E>,
    slot: Slot,
    b: usize,
    kh: usize,
    j0: usize,
    nk: usize,
) {
    let spec = p.spec;
    let seq = spec.seq(b);
    let (rows, d, dv) = (p.rows, spec.head_dim, spec.head_dim_v);
    let group = spec.group_size();
    let q = p.q.as_ptr().add((b * spec.heads_kv + kh) * rows * p.d_pad);
    let sp = sc.s.as_mut_ptr();
    let mut r0 = 0;
    while r0 < rows {
        let mr = S::DOT_ROWS.min(rows - r0);
        let (qr, sr) = (q.add(r0 * p.d_pad), sp.add(r0 * BC));
        match mr {
            4 => dots::<S, E, 4>(qr, p.d_pad, d, &sc.kp[..nk], sr),
            3 => dots::<S, E, 3>(qr, p.d_pad, d, &sc.kp[..nk], sr),
            2 => dots::<S, E, 2>(qr, p.d_pad, d, &sc.kp[..nk], sr),
            _ => dots::<S, E, 1>(qr, p.d_pad, d, &sc.kp[..nk], sr),
        }
        r0 += mr;
    }

    // Mask, softcap / ALiBi, online softmax (log2 domain), per row.
    let cap = spec.softcap;
    let diag = seq.k_len as i64 - seq.q_len as i64;
    for r in 0..rows {
        let row = &mut sc.s[r * BC..(r + 1) * BC];
        let lo = sc.lo[r].clamp(j0, j0 + nk) - j0;
        let hi = sc.hi[r].clamp(j0 + lo, j0 + nk) - j0;
        let slope = sc.slope[r];
        if cap > 0.0 || slope != 0.0 {
            let i = (r / group) as i64;
            for (jj, x) in row.iter_mut().enumerate().take(hi).skip(lo) {
                let mut val = *x;
                if cap > 0.0 {
                    val = cap * (val / cap).tanh() * LOG2_E;
                }
                let dist = (i + diag - (j0 + jj) as i64).unsigned_abs();
                *x = val - slope * dist as f32;
            }
        }
        row[..lo].fill(f32::NEG_INFINITY);
        row[hi..].fill(f32::NEG_INFINITY);
        let (mut mx, mut bad) = (f32::NEG_INFINITY, false);
        for &x in &row[lo..hi] {
            bad |= x.is_nan() || x == f32::INFINITY;
            mx = mx.max(x);
        }
        let m_old = *slot.m.add(r);
        let m_new = m_old.max(mx);
        let (alpha, mu) = if m_new == f32::NEG_INFINITY {
            (1.0, 0.0)
        } else {
            ((m_old - m_new).exp2(), m_new)
        };
        let mut sum = S::zero();
        let rp = row.as_mut_ptr();
        for x in (0..BC).step_by(S::LANES) {
            let e = S::exp2(S::sub(S::load(rp.add(x)), S::splat(mu)));
            S::store(rp.add(x), e);
            sum = S::add(sum, e);
        }
        let l = *slot.l.add(r) * alpha + S::hsum(sum);
        *slot.l.add(r) = if bad { f32::NAN } else { l };
        *slot.m.add(r) = m_new;
        sc.alpha[r] = alpha;
    }

    // O = O * alpha + P·V: keys every row of a row group sees go through the register
    // tile; the few at the mask's edges are added row by row where visible.
    let dvv = dv / S::LANES * S::LANES;
    let mut r0 = 0;
    while r0 < rows {
        let mr = S::PV_ROWS.min(rows - r0);
        let rr = r0..r0 + mr;
        let cs = rr
            .clone()
            .map(|r| sc.lo[r])
            .max()
            .unwrap_or(0)
            .clamp(j0, j0 + nk)
            - j0;
        let ce = rr
            .clone()
            .map(|r| sc.hi[r])
            .min()
            .unwrap_or(0)
            .clamp(j0, j0 + nk)
            - j0;
        let (cs, ce) = if cs < ce { (cs, ce) } else { (0, 0) };
        let (pr, o, al) = (
            sp.add(r0 * BC),
            slot.o.add(r0 * dv),
            sc.alpha.as_ptr().add(r0),
        );
        let vals = &sc.vp[cs..ce];
        let mut n0 = 0;
        while n0 < dvv {
            let nv = S::PV_NV.min((dvv - n0) / S::LANES);
            pv_dispatch::<S, E>(mr, nv, pr.add(cs), vals, n0, o, dv, al);
            n0 += nv * S::LANES;
        }
        for r in rr.clone() {
            let (orow, prow) = (slot.o.add(r * dv), sp.add(r * BC));
            for x in dvv..dv {
                let mut acc = *orow.add(x) * sc.alpha[r];
                for (jj, &vp) in vals.iter().enumerate() {
                    acc += *prow.add(cs + jj) * (*vp.add(x)).to_f32();
                }
                *orow.add(x) = acc;
            }
            let visible = sc.lo[r].max(j0) - j0..sc.hi[r].min(j0 + nk).max(j0) - j0;
            for jj in visible.filter(|jj| !(cs..ce).contains(jj)) {
                axpy::<S, E>(*prow.add(jj), sc.vp[jj], orow, dv);
            }
        }
        r0 += mr;
    }
}

/// `out[r * BC + jj] = q_r · k_jj` for MR query rows (stride `ldq`) and every key, four
/// keys at a time (16 independent accumulator chains with four rows).
#[inline(always)]
unsafe fn dots<S: Widen, E: Elem, const MR: usize>(
    q: *const f32,
    ldq: usize,
    d: usize,
    keys: &[*const E],
    out: *mut f32,
) {
    let four = keys.len() / 4 * 4;
    for jj in (0..four).step_by(4) {
        dots_kj::<S, E, MR, 4>(q, ldq, d, &keys[jj..jj + 4], out.add(jj));
    }
    for jj in four..keys.len() {
        dots_kj::<S, E, MR, 1>(q, ldq, d, &keys[jj..jj + 1], out.add(jj));
    }
}

#[inline(always)]
unsafe fn dots_kj<S: Widen, E: Elem, const MR: usize, const KJ: usize>(
    q: *const f32,
    ldq: usize,
    d: usize,
    keys: &[*const E],
    out: *mut f32,
) {
    let kp: [*const E; KJ] = std::array::from_fn(|t| keys[t]);
    let mut acc = [[S::zero(); KJ]; MR];
    let dvec = d / S::LANES * S::LANES;
    for x in (0..dvec).step_by(S::LANES) {
        let kv: [S::V; KJ] = std::array::from_fn(|t| E::load::<S>(kp[t].add(x)));
        for (r, row) in acc.iter_mut().enumerate() {
            let qv = S::load(q.add(r * ldq + x));
            for (a, k) in row.iter_mut().zip(&kv) {
                *a = S::fma(qv, *k, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (t, a) in row.iter().enumerate() {
            let mut s = S::hsum(*a);
            for x in dvec..d {
                s += *q.add(r * ldq + x) * (*kp[t].add(x)).to_f32();
            }
            *out.add(r * BC + t) = s;
        }
    }
}

/// Dispatches runtime tile sizes to the const-generic P·V tile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv_dispatch<S: Widen, E: Elem>(
    mr: usize,
    nv: usize,
    p: *const f32,
    vals: &[*const E],
    n0: usize,
    o: *mut f32,
    ldo: usize,
    alpha: *const f32,
) {
    macro_rules! rows {
        ($($mr:literal)+) => {
            match mr {
                $($mr => match nv {
                    4 => pv::<S, E, $mr, 4>(p, vals, n0, o, ldo, alpha),
                    3 => pv::<S, E, $mr, 3>(p, vals, n0, o, ldo, alpha),
                    2 => pv::<S, E, $mr, 2>(p, vals, n0, o, ldo, alpha),
                    _ => pv::<S, E, $mr, 1>(p, vals, n0, o, ldo, alpha),
                },)+
                _ => {}
            }
        };
    }
    rows!(1 2 3 4)
}

/// `O[r][n0..n0 + NV * LANES] = O * alpha[r] + sum_jj p[r][jj] * v_jj[..]` for MR rows,
/// accumulators in registers across the block's keys.
#[inline(always)]
unsafe fn pv<S: Widen, E: Elem, const MR: usize, const NV: usize>(
    p: *const f32,
    vals: &[*const E],
    n0: usize,
    o: *mut f32,
    ldo: usize,
    alpha: *const f32,
) {
    let mut acc = [[S::zero(); NV]; MR];
    for (r, row) in acc.iter_mut().enumerate() {
        let a = S::splat(*alpha.add(r));
        for (v, x) in row.iter_mut().enumerate() {
            *x = S::mul(S::load(o.add(r * ldo + n0 + v * S::LANES)), a);
        }
    }
    for (jj, &vp) in vals.iter().enumerate() {
        let vv: [S::V; NV] = std::array::from_fn(|v| E::load::<S>(vp.add(n0 + v * S::LANES)));
        for (r, row) in acc.iter_mut().enumerate() {
            let pb = S::splat(*p.add(r * BC + jj));
            for (x, vx) in row.iter_mut().zip(&vv) {
                *x = S::fma(pb, *vx, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            S::store(o.add(r * ldo + n0 + v * S::LANES), *x);
        }
    }
}

/// `o[..n] += p * v[..n]`.
#[inline(always)]
unsafe fn axpy<S: Widen, E: Elem>(p: f32, v: *const E, o: *mut f32, n: usize) {
    let nv = n / S::LANES * S::LANES;
    let pb = S::splat(p);
    for x in (0..nv).step_by(S::LANES) {
        S::store(
            o.add(x),
            S::fma(pb, E::load::<S>(v.add(x)), S::load(o.add(x))),
        );
    }
    for x in nv..n {
        *o.add(x) += p * (*v.add(x)).to_f32();
    }
}

/// Merges the chunks of (batch `b`, KV head `kh`) and writes its rows of out and LSE.
#[allow(clippy::too_many_arguments)]
fn combine<E>(
    p: &Attend<'_, E>,
    plan: &Plan,
    part: &Partials,
    b: usize,
    kh: usize,
    acc: &mut [f32],
    out: &OutBuf,
    lse: Option<&LseBuf>,
) {
    let spec = p.spec;
    let seq = spec.seq(b);
    let (group, dv) = (spec.group_size(), spec.head_dim_v);
    let chunks = p.walk[b].len().div_ceil(plan.chunk);
    let slots: Vec<Slot> = (0..chunks).map(|c| part.slot(b, kh, c)).collect();
    for r in 0..p.rows {
        let (i, h) = (r / group, kh * group + r % group);
        // SAFETY: every task has finished; the slots are initialised and read-only now.
        let ml = |c: usize| unsafe { (*slots[c].m.add(r), *slots[c].l.add(r)) };
        let m = (0..chunks).fold(f32::NEG_INFINITY, |m, c| m.max(ml(c).0));
        let visible = !p.mask.keys(i, seq.q_len, seq.k_len).is_empty();
        if !visible {
            continue; // fully masked: out 0, LSE -inf
        }
        acc.fill(0.0);
        // Visible keys whose scores are all -inf (or NaN) give NaN, as the definition does.
        let mut l = if m == f32::NEG_INFINITY {
            f32::NAN
        } else {
            0.0
        };
        for (c, s) in slots.iter().enumerate() {
            let (mc, lc) = ml(c);
            if mc == f32::NEG_INFINITY {
                if lc.is_nan() {
                    l = f32::NAN;
                }
                continue;
            }
            let w = (mc - m).exp2();
            l += w * lc;
            // SAFETY: as above.
            let o = unsafe { std::slice::from_raw_parts(s.o.add(r * dv), dv) };
            for (a, x) in acc.iter_mut().zip(o) {
                *a += w * x;
            }
        }
        let inv = 1.0 / l;
        for a in acc.iter_mut() {
            *a *= inv;
        }
        // SAFETY: (b, kh) owns its rows of out and LSE; one job per (b, kh).
        unsafe {
            out.write_row(((seq.q_start + i) * spec.heads_q + h) * dv, acc);
            if let Some(lse) = lse {
                lse.write(spec.lse_index(b, h, i), (m + l.log2()) * LN_2);
            }
        }
    }
}
