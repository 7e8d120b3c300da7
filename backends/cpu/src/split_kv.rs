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

use crate::decode_tiles::{block, Scratch, Slot, BC};
use crate::device::Isa;
use crate::io::{LseBuf, OutBuf};
use crate::kv_prefetch::{prefetch, L1};
use crate::simd::Portable;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::thread_pool::ThreadPool;
use crate::widen::{Elem, Widen};
use flashattn_core::{AttentionSpec, KvCache, Mask};
use std::f32::consts::{LN_2, LOG2_E};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    pool: &ThreadPool,
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
                Isa::Avx512Fp16 | Isa::Avx512Bf16 | Isa::Avx512 => {
                    worker_avx512(p, &plan, &part, &next)
                }
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

#[inline(always)]
unsafe fn worker<S: Widen, E: Elem>(
    p: &Attend<'_, E>,
    plan: &Plan,
    part: &Partials,
    next: &AtomicUsize,
) {
    let mut sc = Scratch::new(p.rows);
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
    let rows_of = |j0: usize, crow: &mut [usize]| {
        let nk = BC.min(c1.saturating_sub(j0));
        for (jj, row) in crow[..nk].iter_mut().enumerate() {
            *row = p.cache.row(t.b, j0 + jj);
        }
        nk
    };
    let mut j0 = c0;
    rows_of(j0, &mut sc.crow);
    while j0 < c1 {
        let nk = BC.min(c1 - j0);
        let next = rows_of(j0 + nk, &mut sc.crow_next);
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
            prefetch_ahead(p, sc, t.heads, kh, nk, next);
            block::<S, E>(p, sc, part.slot(t.b, kh, t.chunk), t.b, kh, j0, nk);
        }
        std::mem::swap(&mut sc.crow, &mut sc.crow_next);
        j0 += nk;
    }
}

/// Software prefetch before head `kh` of a block (rows `sc.crow[..nk]`, the next block's
/// `sc.crow_next[..next]`), in two levels:
/// - into L2, this head's share of the next block, in address order (all the task's heads
///   of a row are one run), paced through the block's compute (`sc.paced`);
/// - into L1, what the next microseconds read: this head's V rows (read after its scores)
///   and the next head's K rows.
///
/// Measured at 32k keys, bf16, 8 KV heads x 128 on the 2-core box (back-to-back runs): the
/// L2 stream took decode from ~0.6 to ~0.85 of the copy bandwidth, L1 hints to ~0.95.
#[inline(always)]
unsafe fn prefetch_ahead<E>(
    p: &Attend<'_, E>,
    sc: &mut Scratch<E>,
    heads: (usize, usize),
    kh: usize,
    nk: usize,
    next: usize,
) {
    let (hkv, d, dv) = (p.spec.heads_kv, p.spec.head_dim, p.spec.head_dim_v);
    let nh = heads.1 - heads.0;
    let share = kh - heads.0;
    sc.paced.clear();
    for &row in &sc.crow_next[next * share / nh..next * (share + 1) / nh] {
        let row = row * hkv + heads.0;
        sc.paced.push(p.k.as_ptr().add(row * d), nh * d);
        sc.paced.push(p.v.as_ptr().add(row * dv), nh * dv);
    }
    let (rows, head) = if kh + 1 < heads.1 {
        (&sc.crow[..nk], kh + 1)
    } else {
        (&sc.crow_next[..next], heads.0)
    };
    for &row in rows {
        prefetch::<E, L1>(p.k.as_ptr().add((row * hkv + head) * d), d);
    }
    for &vp in &sc.vp[..nk] {
        prefetch::<E, L1>(vp, dv);
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
