//! The forward's probabilities on the f16 tiles, in f16 arithmetic: `P = 2^(S - m)` for 32
//! query lanes per instruction where the f32 pass does 16, written straight into the P·V
//! operand (which is f16 anyway). `S - m` is taken in f32 and then rounded to f16, so the
//! probabilities that weigh most (`S - m` near 0) keep f16's full precision; measured on
//! random `S - m` in [-16, 0]: relative L2 error of P 2.6e-4 against 1.9e-4 for the f32
//! exp2 rounded to f16. Row sums run in f16 for `SUM_CHUNK` keys, then in f32. x86_64 only
//! (`lib.rs`).

use std::arch::x86_64::*;

/// 2^f for f in [-0.5, 0.5]: a degree-3 least-squares fit (a 4th term gains nothing once x
/// is in f16).
const EXP2_P: [f32; 3] = [0.693_368_7, 0.242_218_4, 0.054_592_83];
/// 2^x rounds to 0 in f16 below 2^-25; clamping there keeps `x - round(x)` finite for -inf.
const CUT: f32 = -30.0;
/// Keys summed in f16 (each P <= 1, so a sum <= 16 at f16's 2^-11) before the f32 add.
const SUM_CHUNK: usize = 16;

/// One AVX512-FP16 instruction `op dst, a, b` on 32 f16 lanes (these intrinsics are not
/// stable in Rust 1.95, as in `lowp.rs`).
macro_rules! ph {
    ($op:literal, $a:expr, $b:expr) => {{
        let d: __m512i;
        std::arch::asm!(
            concat!($op, " {d}, {a}, {b}"),
            d = lateout(zmm_reg) d,
            a = in(zmm_reg) $a,
            b = in(zmm_reg) $b,
            options(pure, nomem, nostack, preserves_flags)
        );
        d
    }};
}

/// `a * b + c` on 32 f16 lanes, rounded once.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fma_ph(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    let mut a = a;
    std::arch::asm!(
        "vfmadd213ph {a}, {b}, {c}",
        a = inout(zmm_reg) a,
        b = in(zmm_reg) b,
        c = in(zmm_reg) c,
        options(pure, nomem, nostack, preserves_flags)
    );
    a
}

/// 32 f16 lanes of `x`.
#[inline(always)]
unsafe fn splat_ph(x: f32) -> __m512i {
    _mm512_set1_epi16(half::f16::from_f32(x).to_bits() as i16)
}

/// 2^x on 32 f16 lanes: NaN stays NaN, -inf and x below `CUT` give 0.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp2_ph(x: __m512i, c: &[__m512i; 5]) -> __m512i {
    // vmaxph returns its second operand when either is NaN: NaN lanes pass the clamp.
    let xc = ph!("vmaxph", c[4], x);
    let n: __m512i;
    std::arch::asm!(
        "vrndscaleph {n}, {x}, 8",
        n = lateout(zmm_reg) n,
        x = in(zmm_reg) xc,
        options(pure, nomem, nostack, preserves_flags)
    );
    let f = ph!("vsubph", xc, n);
    let mut p = fma_ph(c[2], f, c[1]);
    p = fma_ph(p, f, c[0]);
    p = fma_ph(p, f, c[3]);
    ph!("vscalefph", p, n)
}

/// `a + b` on 32 f16 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn add_ph(a: __m512i, b: __m512i) -> __m512i {
    ph!("vaddph", a, b)
}

/// The operands of the probabilities of one key block (all pointers at query column 0).
pub(crate) struct Probs {
    /// S^T, keys x queries, row stride `ld` (f32).
    pub s: *const f32,
    pub ld: usize,
    pub nk: usize,
    /// Each query's max to subtract, its O / l rescale factor, and its running sum l.
    pub mu: *const f32,
    pub alpha: *const f32,
    pub l: *mut f32,
    /// The P·V operand, keys x queries, row stride `qld` (f16 bits).
    pub p: *mut u16,
    pub qld: usize,
}

/// `P[j][i..i + 32] = 2^(S^T[j][i..i + 32] - mu[i..i + 32])` for the block's keys, and
/// `l = l * alpha + rowsum(P)` for those 32 queries.
#[inline(always)]
pub(crate) unsafe fn probs_f16(t: &Probs, i: usize) {
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let c = [
        splat_ph(EXP2_P[0]),
        splat_ph(EXP2_P[1]),
        splat_ph(EXP2_P[2]),
        splat_ph(1.0),
        splat_ph(CUT),
    ];
    let (m0, m1) = (
        _mm512_loadu_ps(t.mu.add(i)),
        _mm512_loadu_ps(t.mu.add(i + 16)),
    );
    let mut sums = [_mm512_setzero_ps(); 2];
    let mut j0 = 0;
    while j0 < t.nk {
        let end = (j0 + SUM_CHUNK).min(t.nk);
        let mut acc = _mm512_setzero_si512();
        for j in j0..end {
            let row = t.s.add(j * t.ld + i);
            let lo = _mm512_cvtps_ph::<NEAREST>(_mm512_sub_ps(_mm512_loadu_ps(row), m0));
            let hi = _mm512_cvtps_ph::<NEAREST>(_mm512_sub_ps(_mm512_loadu_ps(row.add(16)), m1));
            let e = exp2_ph(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi), &c);
            _mm512_storeu_si512(t.p.add(j * t.qld + i) as *mut _, e);
            acc = add_ph(acc, e);
        }
        let lo = _mm512_cvtph_ps(_mm512_castsi512_si256(acc));
        let hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(acc));
        sums = [_mm512_add_ps(sums[0], lo), _mm512_add_ps(sums[1], hi)];
        j0 = end;
    }
    for (h, sum) in sums.into_iter().enumerate() {
        let q = i + 16 * h;
        let l = _mm512_fmadd_ps(
            _mm512_loadu_ps(t.l.add(q)),
            _mm512_loadu_ps(t.alpha.add(q)),
            sum,
        );
        _mm512_storeu_ps(t.l.add(q), l);
    }
}

#[cfg(test)]
mod tests {
    use super::{probs_f16, Probs};
    use half::f16;
    use rand::{Rng, SeedableRng};

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn run(t: &Probs, queries: usize) {
        for i in (0..queries).step_by(32) {
            probs_f16(t, i);
        }
    }

    /// Against f64 `exp2` on fresh random scores (a sharp and a flat spread, 37 keys so the
    /// f16 row sums flush mid-block), with -inf, NaN and very negative scores planted.
    #[test]
    fn probs_match_exp2_and_keep_nan() {
        if !std::arch::is_x86_feature_detected!("avx512fp16") {
            eprintln!("SKIP probs_match_exp2_and_keep_nan: this CPU has no AVX512-FP16");
            return;
        }
        let (nk, q, ld, qld) = (37, 64, 80, 72);
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let mut s: Vec<f32> = (0..nk * ld)
            .map(|x| rng.random_range(-1.0..1.0) * if x % 2 == 0 { 30.0 } else { 3.0 })
            .collect();
        s[3 * ld + 5] = f32::NEG_INFINITY;
        s[4 * ld + 6] = f32::NAN;
        s[5 * ld + 7] = -1e30;
        let mu: Vec<f32> = (0..q)
            .map(|i| (0..nk).map(|j| s[j * ld + i]).fold(f32::MIN, f32::max))
            .collect();
        let alpha: Vec<f32> = (0..q).map(|_| rng.random_range(0.0..1.0)).collect();
        let l0: Vec<f32> = (0..q).map(|_| rng.random_range(0.0..10.0)).collect();
        let (mut l, mut p) = (l0.clone(), vec![0u16; nk * qld]);
        let t = Probs {
            s: s.as_ptr(),
            ld,
            nk,
            mu: mu.as_ptr(),
            alpha: alpha.as_ptr(),
            l: l.as_mut_ptr(),
            p: p.as_mut_ptr(),
            qld,
        };
        unsafe { run(&t, q) };
        for i in 0..q {
            let mut sum = 0.0f64;
            for j in 0..nk {
                let want = (s[j * ld + i] as f64 - mu[i] as f64).exp2();
                let got = f16::from_bits(p[j * qld + i]).to_f64();
                sum += want;
                let at = format!("key {j}, query {i}: got {got}, want {want}");
                if want.is_nan() {
                    assert!(got.is_nan(), "{at}");
                } else {
                    // f16 keeps ~11 bits of `S - m`: the error grows with |S - m| where P is small.
                    let tol = 1.5e-3 * want + 2e-5;
                    assert!((got - want).abs() <= tol, "{at}");
                }
            }
            let want_l = l0[i] as f64 * alpha[i] as f64 + sum;
            if sum.is_nan() {
                assert!(l[i].is_nan(), "query {i}: l {} should be NaN", l[i]);
            } else {
                let err = (l[i] as f64 - want_l).abs() / want_l;
                assert!(err < 2e-3, "query {i}: l {} want {want_l}", l[i]);
            }
        }
    }
}
