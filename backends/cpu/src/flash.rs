//! The tiled online-softmax forward (FlashAttention-2 style) on CPU threads.
//!
//! One task = (batch, query head, block of br query rows). A task packs its Q block once,
//! transposed and pre-scaled (`Qt[d][br]`), then walks the visible key blocks of bc keys:
//! `S^T = K_blk · Qt` (keys x queries, so the softmax vectorises across queries), masks and
//! rescales, `P = 2^(S - m)`, `O = O * alpha + P · V_blk`. Only per-worker tile scratch is
//! allocated; the score matrix never exists. Key blocks the mask hides entirely are skipped
//! because each task only walks `[min lo, max hi)` of its rows' visible keys (`Mask::keys`), and inside a
//! block the tiles of query rows that see none of its keys are skipped too.

use crate::io::{AlignedBuf, LseBuf, OutBuf, Src};
use crate::isa::Isa;
use crate::parallel::Pool;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::simd::{Portable, Simd, Tile};
use flashattn_core::{AttentionSpec, Mask, Output, Result, TensorRef};
use std::f32::consts::{LN_2, LOG2_E};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Granularity of the query block: a multiple of every ISA's vector width and P·V tile height.
const BR_STEP: usize = 48;
/// Largest query block. Every task streams its head's whole K and V once, so large blocks
/// cut that traffic (with flashattn's [b, s, h, d] layout those rows lie a page apart and
/// cost more than the arithmetic suggests). Measured on the 2-core AVX-512 box at
/// [1, 8, 2048, 64/128]: 192 beat 48 and 96 clearly, 384 beat 192 by ~2-13% (CPU-time).
const BR_MAX: usize = 384;
/// Largest query block under a causal or window mask: smaller blocks waste less along the
/// diagonal and balance better (measured: 192 beat 384 by ~10-20% causal at 2048).
const BR_MAX_MASKED: usize = 192;
/// Rows the block packing prefetches ahead of the row it copies.
const PACK_AHEAD: usize = 8;
/// Keys per block (measured: 128 beat 32, 64 and 256 with 192-row blocks).
const BC: usize = 128;

#[derive(Clone, Copy, Debug)]
struct Task {
    b: usize,
    h: usize,
    q0: usize,
}

/// Everything the workers share for one forward call.
struct Problem<'a> {
    spec: &'a AttentionSpec,
    mask: Mask,
    q: Src<'a>,
    k: Src<'a>,
    v: Src<'a>,
    out: OutBuf,
    lse: Option<LseBuf>,
    tasks: Vec<Task>,
    next: AtomicUsize,
    /// Multiplier folded into Q when packing: scale, times log2(e) unless softcap needs
    /// the natural-scale score first.
    q_mul: f32,
    /// Whether scores need the scalar softcap / ALiBi pass.
    post: bool,
    /// Value dimension padded to the vector width (O scratch row length).
    dv_pad: usize,
    /// f32 V with `dv` a multiple of the vector width is read in place, else packed.
    v_direct: bool,
    /// f32 K read in place, else packed.
    k_direct: bool,
    br: usize,
    bc: usize,
    /// Row stride of Qt and S^T (floats): br, padded so that it is an odd number of cache
    /// lines (see `odd_lines`).
    ld: usize,
    /// Row stride of the packed V block: dv_pad, padded likewise when the P·V loop reads
    /// it in chunks narrower than a row.
    vld: usize,
}

/// `n` floats rounded up to an odd number of 64-byte lines. The tiles walk Qt, S^T and V
/// down their columns; with a stride of an even number of lines (384 floats = 24 lines,
/// 128 floats = 8) those columns fall into a fraction of L1's 64 sets and evict each other
/// (at 384 x 128: the 48-query Qt slice and the 128 x 64 V chunk each need 16 ways of a
/// 12-way L1). An odd stride spreads them over every set.
fn odd_lines(n: usize) -> usize {
    let lines = n.div_ceil(16);
    (lines | 1) * 16
}

/// Per-worker tile scratch: O(br * (d + dv) + bc * (br + d + dv)) floats, independent of
/// the sequence lengths.
struct Scratch {
    qt: AlignedBuf,
    kp: AlignedBuf,
    vp: AlignedBuf,
    s: AlignedBuf,
    o: AlignedBuf,
    m: AlignedBuf,
    l: AlignedBuf,
    alpha: AlignedBuf,
    m_use: AlignedBuf,
    m_blk: AlignedBuf,
    row: Vec<f32>,
    lo: Vec<usize>,
    hi: Vec<usize>,
}

impl Scratch {
    fn new(p: &Problem) -> Self {
        let d = p.spec.head_dim;
        let (br, bc) = (p.br, p.bc);
        Scratch {
            qt: AlignedBuf::zeroed(d * p.ld),
            kp: AlignedBuf::zeroed(if p.k_direct { 0 } else { bc * d }),
            vp: AlignedBuf::zeroed(if p.v_direct { 0 } else { bc * p.vld }),
            s: AlignedBuf::zeroed(bc * p.ld),
            o: AlignedBuf::zeroed(br * p.dv_pad),
            m: AlignedBuf::zeroed(br),
            l: AlignedBuf::zeroed(br),
            alpha: AlignedBuf::zeroed(br),
            m_use: AlignedBuf::zeroed(br),
            m_blk: AlignedBuf::zeroed(br),
            row: vec![0.0; d.max(p.dv_pad)],
            lo: vec![0; br],
            hi: vec![0; br],
        }
    }
}

/// Flash forward on validated inputs.
pub(crate) fn forward(
    pool: &Pool,
    isa: Isa,
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<Output> {
    let lanes = match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 | Isa::Portable => 8,
    };
    let dv = spec.head_dim_v;
    let dv_pad = dv.div_ceil(lanes) * lanes;
    let (out_t, out) = OutBuf::zeroed(spec.dtype.output(), spec.out_elems().unwrap_or(0))?;
    let mut lse_v = if spec.return_lse {
        vec![f32::NEG_INFINITY; spec.lse_elems().unwrap_or(0)]
    } else {
        Vec::new()
    };
    let (k, v) = (Src::new(k)?, Src::new(v)?);
    let (br, bc) = match tuning() {
        Some((br, bc)) => (br, bc),
        None => (block_rows(spec, pool.threads()), BC),
    };
    let post = spec.softcap > 0.0 || spec.alibi.is_some();
    let scale = spec.scale_value();
    let problem = Problem {
        spec,
        mask: spec.mask(),
        q: Src::new(q)?,
        k,
        v,
        out,
        lse: spec.return_lse.then(|| LseBuf::new(&mut lse_v)),
        tasks: tasks(spec, br),
        next: AtomicUsize::new(0),
        q_mul: if spec.softcap > 0.0 {
            scale
        } else {
            scale * LOG2_E
        },
        post,
        dv_pad,
        // V is read in place only when its rows are contiguous (one kv head): with more
        // heads a block's rows lie a fixed stride apart and the P·V loop, which revisits
        // 128 rows, would thrash a handful of L1 sets; so the block is packed. K rows are
        // visited 8 at a time, which L1 holds unless the stride is a multiple of 4 KiB
        // (all 8 in the same sets; measured ~10% slower at 8 heads x 128 than packing).
        v_direct: spec.heads_kv == 1 && v.as_f32().is_some() && dv == dv_pad,
        k_direct: k.as_f32().is_some()
            && (spec.heads_kv == 1 || !(spec.heads_kv * spec.head_dim * 4).is_multiple_of(4096)),
        br,
        bc,
        ld: odd_lines(br),
        vld: if dv_pad > 64 {
            odd_lines(dv_pad)
        } else {
            dv_pad
        },
    };
    pool.run(problem.tasks.len(), &|| run_worker(isa, &problem));
    Ok(Output {
        out: out_t,
        lse: spec.return_lse.then_some(lse_v),
    })
}

/// `FLASHATTN_CPU_BLOCKS=br,bc` overrides the block sizes, for tuning on a new machine
/// (br a multiple of 48). Read once.
fn tuning() -> Option<(usize, usize)> {
    static T: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        let v = std::env::var("FLASHATTN_CPU_BLOCKS").ok()?;
        let (br, bc) = v.split_once(',')?;
        let (br, bc) = (
            br.trim().parse::<usize>().ok()?,
            bc.trim().parse::<usize>().ok()?,
        );
        (br > 0 && br % BR_STEP == 0 && bc > 0).then_some((br, bc))
    })
}

/// The query block: as large as BR_MAX (BR_MAX_MASKED under a mask), but no larger than the longest sequence needs, and
/// small enough to give every thread a few tasks.
fn block_rows(spec: &AttentionSpec, threads: usize) -> usize {
    let max_q = (0..spec.batch)
        .map(|b| spec.seq(b).q_len)
        .max()
        .unwrap_or(0);
    let max_br = if spec.mask().is_masked() {
        BR_MAX_MASKED
    } else {
        BR_MAX
    };
    let cap = max_q.div_ceil(BR_STEP).clamp(1, max_br / BR_STEP) * BR_STEP;
    let count = |br: usize| -> usize {
        let blocks: usize = (0..spec.batch)
            .map(|b| spec.seq(b).q_len.div_ceil(br))
            .sum();
        blocks * spec.heads_q
    };
    let mut br = cap;
    while br > BR_STEP && count(br) < 2 * threads {
        br -= BR_STEP;
    }
    br
}

/// All (batch, head, query block) tasks, heaviest first when a mask makes them uneven
/// (so the dynamic queue ends with short tasks and the threads finish together).
fn tasks(spec: &AttentionSpec, br: usize) -> Vec<Task> {
    let mut tasks = Vec::new();
    for b in 0..spec.batch {
        let s = spec.seq(b);
        for h in 0..spec.heads_q {
            for q0 in (0..s.q_len).step_by(br) {
                tasks.push(Task { b, h, q0 });
            }
        }
    }
    let mask = spec.mask();
    if mask.is_masked() || spec.is_varlen() {
        let work = |t: &Task| {
            let s = spec.seq(t.b);
            let last = (t.q0 + br).min(s.q_len) - 1;
            let keys = mask.keys_of_rows(t.q0..last + 1, s.q_len, s.k_len);
            keys.len() * (last + 1 - t.q0)
        };
        tasks.sort_by_key(|t| std::cmp::Reverse(work(t)));
    }
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

/// Pulls tasks off the shared queue until it is empty.
#[inline(always)]
unsafe fn worker<S: Simd>(p: &Problem, sc: &mut Scratch) {
    loop {
        let t = p.next.fetch_add(1, Ordering::Relaxed);
        let Some(&task) = p.tasks.get(t) else { break };
        run_task::<S>(p, sc, task);
    }
}

#[inline(always)]
unsafe fn run_task<S: Simd>(p: &Problem, sc: &mut Scratch, t: Task) {
    let spec = p.spec;
    let s = spec.seq(t.b);
    let (br, bc, ld) = (p.br, p.bc, p.ld);
    let rows = br.min(s.q_len - t.q0);
    // Rows actually computed: the valid ones rounded up to the vector width (a short last
    // block or a decode step does not pay for a whole block).
    let rows_l = rows.div_ceil(S::LANES) * S::LANES;
    let (d, dv, hq, hkv) = (spec.head_dim, spec.head_dim_v, spec.heads_q, spec.heads_kv);
    let kh = spec.kv_head(t.h);
    let dv_pad = p.dv_pad;

    // Visible key range of each row; the task walks the union.
    let (mut klo, mut khi) = (usize::MAX, 0);
    for i in 0..br {
        let (lo, hi) = if i < rows {
            let r = p.mask.keys(t.q0 + i, s.q_len, s.k_len);
            (r.start, r.end)
        } else {
            (0, 0)
        };
        sc.lo[i] = lo;
        sc.hi[i] = hi;
        if lo < hi {
            klo = klo.min(lo);
            khi = khi.max(hi);
        }
    }
    if klo >= khi {
        // Every row is masked: out stays 0, LSE stays -inf.
        return;
    }

    // Qt[x][i] = q[i][x] * q_mul; padding rows are zero.
    let qt = sc.qt.as_mut_slice();
    for i in 0..rows_l {
        if i < rows {
            let off = ((s.q_start + t.q0 + i) * hq + t.h) * d;
            p.q.read_row(off, &mut sc.row[..d]);
            for (x, &val) in sc.row[..d].iter().enumerate() {
                qt[x * ld + i] = val * p.q_mul;
            }
        } else {
            for x in 0..d {
                qt[x * ld + i] = 0.0;
            }
        }
    }
    sc.o.as_mut_slice()[..rows_l * dv_pad].fill(0.0);
    sc.m.as_mut_slice().fill(f32::NEG_INFINITY);
    sc.l.as_mut_slice().fill(0.0);

    let slope = spec.alibi_slope(t.b, t.h) * LOG2_E;
    let diag_shift = s.k_len as i64 - s.q_len as i64;
    let mut j0 = klo;
    while j0 < khi {
        let nk = bc.min(khi - j0);

        // K rows: in place for f32, else widened into kp.
        let (kptr, krs) = match p.k.as_f32() {
            Some(k) if p.k_direct => (k.as_ptr().add(((s.k_start + j0) * hkv + kh) * d), hkv * d),
            _ => {
                let kp = sc.kp.as_mut_slice();
                for j in 0..nk {
                    let off = ((s.k_start + j0 + j) * hkv + kh) * d;
                    if j + PACK_AHEAD < nk {
                        p.k.prefetch(off + PACK_AHEAD * hkv * d, d);
                    }
                    p.k.read_row(off, &mut kp[j * d..(j + 1) * d]);
                }
                (sc.kp.as_ptr(), d)
            }
        };

        // Rows that see any key of this block: a contiguous range, because lo and hi grow
        // with the row. Tiles of rows outside it are skipped (the causal / window diagonal
        // costs 48 x 128 granules, not whole blocks); the mask below gives those rows -inf,
        // so their P is 0 and alpha 1, exactly what skipping their P·V leaves.
        let seen = |i: &usize| sc.lo[*i] < j0 + nk && sc.hi[*i] > j0 && sc.lo[*i] < sc.hi[*i];
        let r0 = (0..rows).find(seen).unwrap_or(0);
        let r1 = (0..rows).rev().find(seen).map_or(0, |i| i + 1);
        let r1_l = r1.div_ceil(S::LANES) * S::LANES;

        // S^T[j][i] = k_j · qt_i (keys x queries).
        let sp = sc.s.as_mut_ptr();
        let qtp = sc.qt.as_ptr();
        // Query groups outer: one group's Qt slice (d x 48 floats) stays in L1 while the
        // block's K rows stream past it.
        let qw = S::NV_QK * S::LANES;
        for ig in (r0 / qw * qw..r1_l).step_by(qw) {
            let nv = S::NV_QK.min((r1_l - ig) / S::LANES);
            let mut jt = 0;
            while jt < nk {
                let mr = S::MR_QK.min(nk - jt);
                S::qk_tile(
                    mr,
                    nv,
                    Tile {
                        k: d,
                        a: kptr.add(jt * krs),
                        a_rs: krs,
                        a_cs: 1,
                        b: qtp.add(ig),
                        ldb: ld,
                        c: sp.add(jt * ld + ig),
                        ldc: ld,
                        alpha: std::ptr::null(),
                    },
                );
                jt += mr;
            }
        }

        let sm = sc.s.as_mut_slice();
        if p.post {
            // Softcap and ALiBi, then into the log2 domain.
            let cap = spec.softcap;
            for j in 0..nk {
                let kj = (j0 + j) as i64;
                for i in 0..rows {
                    let x = &mut sm[j * ld + i];
                    let mut val = *x;
                    if cap > 0.0 {
                        val = cap * (val / cap).tanh() * LOG2_E;
                    }
                    let dist = ((t.q0 + i) as i64 + diag_shift - kj).unsigned_abs();
                    *x = val - slope * dist as f32;
                }
            }
        }
        let full = (0..rows).all(|i| sc.lo[i] <= j0 && sc.hi[i] >= j0 + nk);
        if !full {
            // Per row, the hidden keys of this block are the two runs outside [lo, hi).
            for i in 0..rows_l {
                let lo = sc.lo[i].clamp(j0, j0 + nk);
                let hi = sc.hi[i].clamp(lo, j0 + nk);
                for j in (j0..lo).chain(hi..j0 + nk) {
                    sm[(j - j0) * ld + i] = f32::NEG_INFINITY;
                }
            }
        }

        // Online softmax, vectorised across queries.
        let mb = sc.m_blk.as_mut_ptr();
        for ig in (0..rows_l).step_by(S::LANES) {
            let mut mx = S::splat(f32::NEG_INFINITY);
            for j in 0..nk {
                mx = S::max(mx, S::load(sp.add(j * ld + ig)));
            }
            S::store(mb.add(ig), mx);
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
                    alpha[i] = (m[i] - m_new).exp2();
                    m_use[i] = m_new;
                }
                m[i] = m_new;
            }
        }
        let (lp, ap, up) = (sc.l.as_mut_ptr(), sc.alpha.as_ptr(), sc.m_use.as_ptr());
        for ig in (0..rows_l).step_by(S::LANES) {
            let mu = S::load(up.add(ig));
            let mut sum = S::zero();
            for j in 0..nk {
                let e = S::exp2(S::sub(S::load(sp.add(j * ld + ig)), mu));
                S::store(sp.add(j * ld + ig), e);
                sum = S::add(sum, e);
            }
            let l = S::fma(S::load(lp.add(ig)), S::load(ap.add(ig)), sum);
            S::store(lp.add(ig), l);
        }

        // V rows: in place for f32 with a vector-multiple dv, else widened and padded.
        let (vptr, vrs) = match (p.v_direct, p.v.as_f32()) {
            (true, Some(v)) => (v.as_ptr().add(((s.k_start + j0) * hkv + kh) * dv), hkv * dv),
            _ => {
                let vp = sc.vp.as_mut_slice();
                for j in 0..nk {
                    let off = ((s.k_start + j0 + j) * hkv + kh) * dv;
                    if j + PACK_AHEAD < nk {
                        p.v.prefetch(off + PACK_AHEAD * hkv * dv, dv);
                    }
                    p.v.read_row(off, &mut vp[j * p.vld..j * p.vld + dv]);
                }
                (sc.vp.as_ptr(), p.vld)
            }
        };

        // O = O * alpha + P · V. Value-dimension chunks outer: one chunk of the V block
        // (BC x 64 floats) stays in L1 while the query groups pass over it.
        let op = sc.o.as_mut_ptr();
        let mut n0 = 0;
        while n0 < dv_pad {
            let nv = S::NV_PV.min((dv_pad - n0) / S::LANES);
            for ig in (r0 / S::MR_PV * S::MR_PV..r1_l).step_by(S::MR_PV) {
                S::pv_tile(
                    S::MR_PV.min(r1_l - ig),
                    nv,
                    Tile {
                        k: nk,
                        a: sp.add(ig),
                        a_rs: 1,
                        a_cs: ld,
                        b: vptr.add(n0),
                        ldb: vrs,
                        c: op.add(ig * dv_pad + n0),
                        ldc: dv_pad,
                        alpha: ap.add(ig),
                    },
                );
            }
            n0 += nv * S::LANES;
        }
        j0 += nk;
    }

    // Normalise once, write out and LSE.
    let o = sc.o.as_mut_slice();
    let (m, l) = (sc.m.as_slice(), sc.l.as_slice());
    for i in 0..rows {
        if l[i] <= 0.0 || m[i] == f32::NEG_INFINITY {
            continue; // fully masked row: out 0, LSE -inf (already there)
        }
        let inv = 1.0 / l[i];
        let orow = &mut o[i * dv_pad..i * dv_pad + dv];
        for x in orow.iter_mut() {
            *x *= inv;
        }
        p.out
            .write_row(((s.q_start + t.q0 + i) * hq + t.h) * dv, orow);
        if let Some(lse) = &p.lse {
            lse.write(
                spec.lse_index(t.b, t.h, t.q0 + i),
                (m[i] + l[i].log2()) * LN_2,
            );
        }
    }
}
