//! The attention of one block of keys for one KV head of a decode task: scores of the
//! packed query rows (GQA group x seqlen_q) against the block's K rows, mask and score
//! modifiers, the online-softmax update of the chunk's partial (log2 domain), and
//! O += P·V, all with register tiles that widen f16 / bf16 rows as they load them.

use crate::kv_prefetch::Paced;
use crate::split_kv::Attend;
use crate::widen::{Elem, Widen};
use std::f32::consts::LOG2_E;

/// Keys per block: the scores of one block and head stay in L1.
pub(crate) const BC: usize = 64;

/// Per-worker scratch: a block's scores and row state, O(rows x BC).
pub(crate) struct Scratch<E> {
    /// Scores, then probabilities, `[rows][BC]`.
    pub s: Vec<f32>,
    pub alpha: Vec<f32>,
    /// Visible keys `[lo, hi)` and log2-domain ALiBi slope of each row.
    pub lo: Vec<usize>,
    pub hi: Vec<usize>,
    pub slope: Vec<f32>,
    /// Cache rows of the block's keys (and the next block's), and this head's K / V row
    /// pointers.
    pub crow: Vec<usize>,
    pub crow_next: Vec<usize>,
    pub kp: Vec<*const E>,
    pub vp: Vec<*const E>,
    /// The next block's lines, requested a few per key group of the score tiles.
    pub paced: Paced,
}

/// One slot's pointers.
#[derive(Clone, Copy)]
pub(crate) struct Slot {
    pub o: *mut f32,
    pub m: *mut f32,
    pub l: *mut f32,
}

impl<E> Scratch<E> {
    pub fn new(rows: usize) -> Self {
        Scratch {
            s: vec![0.0; rows * BC],
            alpha: vec![0.0; rows],
            lo: vec![0; rows],
            hi: vec![0; rows],
            slope: vec![0.0; rows],
            crow: vec![0; BC],
            crow_next: vec![0; BC],
            kp: vec![std::ptr::null(); BC],
            vp: vec![std::ptr::null(); BC],
            paced: Paced::default(),
        }
    }
}

/// One block of keys `j0..j0 + nk` for KV head `kh` of batch entry `b` (its K / V row
/// pointers in `sc.kp` / `sc.vp`): scores, online softmax, O += P·V into `slot`.
#[inline(always)]
pub(crate) unsafe fn block<S: Widen, E: Elem>(
    p: &Attend<'_, E>,
    sc: &mut Scratch<E>,
    slot: Slot,
    b: usize,
    kh: usize,
    j0: usize,
    nk: usize,
) {
    let spec = p.spec;
    let q =
        p.q.as_ptr()
            .add((b * spec.heads_kv + kh) * p.rows * p.d_pad);
    let groups = p.rows.div_ceil(S::DOT_ROWS) * nk.div_ceil(S::DOT_KEYS);
    sc.paced.pace(groups);
    let mut r0 = 0;
    while r0 < p.rows {
        let mr = S::DOT_ROWS.min(p.rows - r0);
        let (qr, sr, d) = (
            q.add(r0 * p.d_pad),
            sc.s.as_mut_ptr().add(r0 * BC),
            spec.head_dim,
        );
        let (ks, pf) = (&sc.kp[..nk], &mut sc.paced);
        match mr {
            4 => dots::<S, E, 4>(qr, p.d_pad, d, ks, sr, pf),
            3 => dots::<S, E, 3>(qr, p.d_pad, d, ks, sr, pf),
            2 => dots::<S, E, 2>(qr, p.d_pad, d, ks, sr, pf),
            _ => dots::<S, E, 1>(qr, p.d_pad, d, ks, sr, pf),
        }
        r0 += mr;
    }
    sc.paced.finish();
    let seq = spec.seq(b);
    softmax::<S, E>(p, sc, slot, seq.k_len as i64 - seq.q_len as i64, j0, nk);
    accumulate::<S, E>(sc, slot, p.rows, spec.head_dim_v, j0, nk);
}

/// Per row: mask, softcap / ALiBi (`diag` = k_len - q_len), then the online-softmax update
/// of the slot's m and l (log2 domain); the scores become probabilities, `sc.alpha` the
/// factor the row's O must be rescaled by.
#[inline(always)]
unsafe fn softmax<S: Widen, E>(
    p: &Attend<'_, E>,
    sc: &mut Scratch<E>,
    slot: Slot,
    diag: i64,
    j0: usize,
    nk: usize,
) {
    let (cap, group) = (p.spec.softcap, p.spec.group_size());
    for r in 0..p.rows {
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
        let (mx, bad) = max_and_bad(row);
        let m_old = *slot.m.add(r);
        let m_new = m_old.max(mx);
        let (alpha, mu) = if m_new == f32::NEG_INFINITY {
            (1.0, 0.0) // nothing visible yet: O and l stay 0, p = 2^-inf = 0
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
}

/// O = O * alpha + P·V. Keys that every row of a row group sees go through the register
/// tile; the few at a mask's edges are added row by row where visible (so a hidden key's
/// V, NaN or not, never touches a row).
#[inline(always)]
unsafe fn accumulate<S: Widen, E: Elem>(
    sc: &Scratch<E>,
    slot: Slot,
    rows: usize,
    dv: usize,
    j0: usize,
    nk: usize,
) {
    let dvv = dv / S::LANES * S::LANES;
    let sp = sc.s.as_ptr();
    let visible = |r: usize| sc.lo[r].clamp(j0, j0 + nk) - j0..sc.hi[r].clamp(j0, j0 + nk) - j0;
    let mut r0 = 0;
    while r0 < rows {
        let mr = S::PV_ROWS.min(rows - r0);
        let rr = r0..r0 + mr;
        let cs = rr.clone().map(|r| visible(r).start).max().unwrap_or(0);
        let ce = rr.clone().map(|r| visible(r).end).min().unwrap_or(0);
        let (cs, ce) = if cs < ce { (cs, ce) } else { (0, 0) };
        let (pr, o, al) = (
            sp.add(r0 * BC + cs),
            slot.o.add(r0 * dv),
            sc.alpha.as_ptr().add(r0),
        );
        let vals = &sc.vp[cs..ce];
        let mut n0 = 0;
        while n0 < dvv {
            let nv = S::PV_NV.min((dvv - n0) / S::LANES);
            pv_dispatch::<S, E>(mr, nv, pr, vals, n0, o, dv, al);
            n0 += nv * S::LANES;
        }
        for r in rr {
            let (orow, prow) = (slot.o.add(r * dv), sp.add(r * BC));
            for x in dvv..dv {
                let mut acc = *orow.add(x) * sc.alpha[r];
                for (jj, &vp) in vals.iter().enumerate() {
                    acc += *prow.add(cs + jj) * (*vp.add(x)).to_f32();
                }
                *orow.add(x) = acc;
            }
            // The row's visible keys outside the common run (all of them when it is empty).
            let vis = visible(r);
            let (head, tail) = if cs < ce {
                (vis.start..cs, ce..vis.end)
            } else {
                (vis, 0..0)
            };
            for jj in head.chain(tail) {
                axpy::<S, E>(*prow.add(jj), sc.vp[jj], orow, dv);
            }
        }
        r0 += mr;
    }
}

/// The largest score of a masked row (NaN-ignoring) and whether any is NaN or +inf (hidden
/// keys are -inf by now). Sixteen independent lanes, so the compiler vectorises it.
#[inline(always)]
fn max_and_bad(row: &[f32]) -> (f32, bool) {
    let (mut mx, mut bad) = ([f32::NEG_INFINITY; 16], [false; 16]);
    for c in row.chunks_exact(16) {
        for i in 0..16 {
            mx[i] = mx[i].max(c[i]);
            bad[i] |= c[i].is_nan() | (c[i] == f32::INFINITY);
        }
    }
    let m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    (m, bad.iter().any(|&b| b))
}

/// `out[r * BC + jj] = q_r · k_jj` for MR query rows (stride `ldq`) and every key,
/// `DOT_KEYS` keys at a time (MR x DOT_KEYS independent accumulator chains).
#[inline(always)]
unsafe fn dots<S: Widen, E: Elem, const MR: usize>(
    q: *const f32,
    ldq: usize,
    d: usize,
    keys: &[*const E],
    out: *mut f32,
    paced: &mut Paced,
) {
    let kj = S::DOT_KEYS;
    let whole = keys.len() / kj * kj;
    for jj in (0..whole).step_by(kj) {
        paced.step();
        // A constant branch: each instruction set keeps one of the two.
        if kj == 4 {
            dots_kj::<S, E, MR, 4>(q, ldq, d, &keys[jj..jj + 4], out.add(jj));
        } else {
            dots_kj::<S, E, MR, 2>(q, ldq, d, &keys[jj..jj + 2], out.add(jj));
        }
    }
    for jj in whole..keys.len() {
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
        // Loops, not `array::from_fn`: closures do not inherit the target features.
        let mut kv = [S::zero(); KJ];
        for (k, p) in kv.iter_mut().zip(&kp) {
            *k = E::load::<S>(p.add(x));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let qv = S::load(q.add(r * ldq + x));
            for (a, k) in row.iter_mut().zip(&kv) {
                *a = S::fma(qv, *k, *a);
            }
        }
    }
    let mut sums = [0.0f32; 16];
    if MR * KJ == S::LANES {
        // All the tile's sums in one transposing tree (acc is [MR][KJ] vectors in a row).
        let flat = std::slice::from_raw_parts(acc.as_ptr() as *const S::V, MR * KJ);
        S::store(sums.as_mut_ptr(), S::hsum_lanes(flat));
    } else {
        for (r, row) in acc.iter().enumerate() {
            for (t, a) in row.iter().enumerate() {
                sums[r * KJ + t] = S::hsum(*a);
            }
        }
    }
    for r in 0..MR {
        for (t, kp) in kp.iter().enumerate() {
            let mut s = sums[r * KJ + t];
            for x in dvec..d {
                s += *q.add(r * ldq + x) * (*kp.add(x)).to_f32();
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
        let mut vv = [S::zero(); NV];
        for (v, x) in vv.iter_mut().enumerate() {
            *x = E::load::<S>(vp.add(n0 + v * S::LANES));
        }
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
