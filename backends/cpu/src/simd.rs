//! The vector primitives each instruction set provides, and the register-blocked FMA tile
//! that both block products (S^T = K·Q^T and O += P·V) are made of.
//!
//! Everything here is `#[inline(always)]`: the generic kernel is instantiated inside one
//! `#[target_feature]` entry point per instruction set (see `forward.rs`), so the intrinsics
//! are compiled with that feature set enabled.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// One C tile of `C[MR][NV * LANES] (=|+=) A · B`, `A(i, k) = a[i * a_rs + k * a_cs]`
/// (broadcast), `B` rows of contiguous vectors at `b + k * ldb`, `C` rows at `c + i * ldc`.
/// With a null `alpha` the tile starts from zero (overwriting C); else from `C * alpha[i]`.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub k: usize,
    pub a: *const f32,
    pub a_rs: usize,
    pub a_cs: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub alpha: *const f32,
}

/// Vector primitives of one instruction set, plus its tile shapes.
pub(crate) trait Simd {
    type V: Copy;
    const LANES: usize;
    /// Q·K tile: MR_QK keys (rows, broadcast) x NV_QK vectors of queries.
    const MR_QK: usize;
    const NV_QK: usize;
    /// P·V tile: MR_PV queries (rows, broadcast) x NV_PV vectors of the value dimension.
    const MR_PV: usize;
    const NV_PV: usize;

    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// 2^x for x <= 0 (~2e-7 relative), exactly 0 for -inf, NaN for NaN.
    unsafe fn exp2(x: Self::V) -> Self::V;

    /// Q·K tile with `mr` (1..=MR_QK) rows and `nv` (1..=NV_QK) vectors.
    unsafe fn qk_tile(mr: usize, nv: usize, t: Tile);
    /// P·V tile with `mr` (1..=MR_PV) rows and `nv` (1..=NV_PV) vectors.
    unsafe fn pv_tile(mr: usize, nv: usize, t: Tile);
}

/// The generic register tile. MR x NV accumulators stay in registers for the whole k loop.
#[inline(always)]
pub(crate) unsafe fn tile<S: Simd, const MR: usize, const NV: usize>(t: Tile) {
    let mut acc = [[S::zero(); NV]; MR];
    if !t.alpha.is_null() {
        for (i, row) in acc.iter_mut().enumerate() {
            let al = S::splat(*t.alpha.add(i));
            for (v, x) in row.iter_mut().enumerate() {
                *x = S::mul(S::load(t.c.add(i * t.ldc + v * S::LANES)), al);
            }
        }
    }
    let mut a = t.a;
    let mut b = t.b;
    for _ in 0..t.k {
        let mut bv = [S::zero(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = S::load(b.add(v * S::LANES));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = S::splat(*a.add(i * t.a_rs));
            for (x, bx) in row.iter_mut().zip(bv.iter()) {
                *x = S::fma(av, *bx, *x);
            }
        }
        a = a.add(t.a_cs);
        b = b.add(t.ldb);
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            S::store(t.c.add(i * t.ldc + v * S::LANES), *x);
        }
    }
}

/// Dispatches runtime (rows, vectors) counts to the const-generic tile.
macro_rules! dispatch {
    ($S:ty, $rows:expr, $nv:expr, $t:expr; rows [$($mr:literal)+]; nv $nvs:tt) => {
        match $rows {
            $($mr => dispatch!(@nv $S, $mr, $nv, $t, $nvs),)+
            _ => debug_assert!(false, "bad tile rows"),
        }
    };
    (@nv $S:ty, $mr:literal, $nv:expr, $t:expr, [$($v:literal)+]) => {
        match $nv {
            $($v => tile::<$S, $mr, $v>($t),)+
            _ => debug_assert!(false, "bad tile width"),
        }
    };
}

/// exp2 returns exactly 0 below this: results under 2^-125 are negligible next to the row
/// maximum (1) and would otherwise be denormals, which cost a microcode assist per vector
/// (measured: 17% of a causal run before this cut-off).
pub(crate) const EXP2_MIN: f32 = -125.0;

// Cephes exp2f minimax polynomial on [-0.5, 0.5]: 2^f ~= 1 + f * P(f).
pub(crate) const EXP2_P: [f32; 6] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_438e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// Portable 2^x for one lane, written so that lane loops auto-vectorise
/// (no libm calls: rounding by the 1.5 * 2^23 trick, 2^n by building the exponent bits).
/// NaN gives NaN (a NaN score must reach the output, not vanish as p = 0).
#[inline(always)]
pub(crate) fn exp2_scalar(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let xc = x.clamp(EXP2_MIN, 127.0);
    let n = (xc + ROUND) - ROUND;
    let f = xc - n;
    let mut p = EXP2_P[0];
    for c in &EXP2_P[1..] {
        p = p * f + c;
    }
    p = p * f + 1.0;
    let pow2n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < EXP2_MIN {
        0.0
    } else {
        p * pow2n
    }
}

/// Portable fallback: 8-lane arrays that LLVM vectorises for whatever the target has
/// (SSE2 on x86_64, NEON on aarch64).
#[derive(Clone, Copy)]
pub(crate) struct Portable;

const PL: usize = 8;

impl Simd for Portable {
    type V = [f32; PL];
    const LANES: usize = PL;
    const MR_QK: usize = 4;
    const NV_QK: usize = 3;
    const MR_PV: usize = 4;
    const NV_PV: usize = 2;

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; PL]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; PL]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const [f32; PL])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut [f32; PL], v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // aarch64 always has a fused multiply-add (NEON fmla); elsewhere `mul_add` may be a
        // libm call, so stay with a separate multiply and add.
        if cfg!(target_arch = "aarch64") {
            std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
        } else {
            std::array::from_fn(|i| a[i] * b[i] + c[i])
        }
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    unsafe fn exp2(x: Self::V) -> Self::V {
        std::array::from_fn(|i| exp2_scalar(x[i]))
    }
    #[inline(always)]
    unsafe fn qk_tile(mr: usize, nv: usize, t: Tile) {
        dispatch!(Portable, mr, nv, t; rows [4 3 2 1]; nv [3 2 1])
    }
    #[inline(always)]
    unsafe fn pv_tile(mr: usize, nv: usize, t: Tile) {
        dispatch!(Portable, mr, nv, t; rows [4 3 2 1]; nv [2 1])
    }
}

/// AVX2 + FMA (+ F16C, checked together): 16 ymm registers, 12 accumulators per tile.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    const MR_QK: usize = 4;
    const NV_QK: usize = 3;
    const MR_PV: usize = 6;
    const NV_PV: usize = 2;

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp2(x: Self::V) -> Self::V {
        // Lanes below the cut-off become 0; NaN lanes are kept (unordered compare) and the
        // clamp passes NaN through (max/min return their second operand when one is NaN).
        let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(EXP2_MIN));
        let xc = _mm256_min_ps(
            _mm256_set1_ps(127.0),
            _mm256_max_ps(_mm256_set1_ps(EXP2_MIN), x),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
        let f = _mm256_sub_ps(xc, n);
        let mut p = _mm256_set1_ps(EXP2_P[0]);
        for c in &EXP2_P[1..] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
        }
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep)
    }
    #[inline(always)]
    unsafe fn qk_tile(mr: usize, nv: usize, t: Tile) {
        dispatch!(Avx2, mr, nv, t; rows [4 3 2 1]; nv [3 2 1])
    }
    #[inline(always)]
    unsafe fn pv_tile(mr: usize, nv: usize, t: Tile) {
        dispatch!(Avx2, mr, nv, t; rows [6 5 4 3 2 1]; nv [2 1])
    }
}

/// AVX-512F: 32 zmm registers, 24 accumulators per tile.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    type V = __m512;
    const LANES: usize = 16;
    const MR_QK: usize = 8;
    const NV_QK: usize = 3;
    const MR_PV: usize = 6;
    const NV_PV: usize = 4;

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp2(x: Self::V) -> Self::V {
        // As for AVX2: NaN lanes are kept and pass through the clamp.
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(EXP2_MIN));
        let xc = _mm512_min_ps(
            _mm512_set1_ps(127.0),
            _mm512_max_ps(_mm512_set1_ps(EXP2_MIN), x),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
        let f = _mm512_sub_ps(xc, n);
        let mut p = _mm512_set1_ps(EXP2_P[0]);
        for c in &EXP2_P[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
        }
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
        _mm512_maskz_scalef_ps(keep, p, n)
    }
    #[inline(always)]
    unsafe fn qk_tile(mr: usize, nv: usize, t: Tile) {
        dispatch!(Avx512, mr, nv, t; rows [8 7 6 5 4 3 2 1]; nv [3 2 1])
    }
    #[inline(always)]
    unsafe fn pv_tile(mr: usize, nv: usize, t: Tile) {
        dispatch!(Avx512, mr, nv, t; rows [6 5 4 3 2 1]; nv [4 3 2 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2^x over `xs` (length a multiple of 16) with `S`'s vector exp2.
    #[inline(always)]
    unsafe fn exp2_all<S: Simd>(xs: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; xs.len()];
        for (x, o) in xs
            .chunks_exact(S::LANES)
            .zip(out.chunks_exact_mut(S::LANES))
        {
            S::store(o.as_mut_ptr(), S::exp2(S::load(x.as_ptr())));
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp2_avx512(xs: &[f32]) -> Vec<f32> {
        exp2_all::<Avx512>(xs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp2_avx2(xs: &[f32]) -> Vec<f32> {
        exp2_all::<Avx2>(xs)
    }

    /// Inputs over the softmax's whole range (x = s - max <= 0), plus the edges.
    fn inputs() -> Vec<f32> {
        let n = 1 << 20;
        let mut xs: Vec<f32> = (0..n).map(|i| -130.0 * i as f32 / n as f32).collect();
        xs.extend([
            0.0,
            -0.5,
            0.5 - 1.0,
            -1e-8,
            -124.99,
            -125.0,
            -125.01,
            -126.0,
            -200.0,
        ]);
        xs.push(-1e30);
        xs.extend([f32::NEG_INFINITY; 8]);
        xs.extend([f32::NAN, -f32::NAN, f32::NAN]);
        xs.resize(xs.len().div_ceil(16) * 16, f32::NEG_INFINITY);
        xs
    }

    fn check(name: &str, xs: &[f32], ys: &[f32]) {
        let mut worst = 0.0f64;
        for (&x, &y) in xs.iter().zip(ys) {
            if x.is_nan() {
                assert!(y.is_nan(), "{name}: exp2(NaN) = {y}, expected NaN");
                continue;
            }
            let exact = (x as f64).exp2();
            if x >= EXP2_MIN {
                // Normal results: relative error.
                let rel = ((y as f64 - exact) / exact).abs();
                assert!(
                    rel < 5e-7,
                    "{name}: exp2({x}) = {y}, exact {exact}, rel {rel:.2e}"
                );
                worst = worst.max(rel);
            } else {
                // Below the cut-off the result is exactly 0 (never a denormal).
                assert!(y == 0.0, "{name}: exp2({x}) = {y}, expected ~0");
            }
            if x == f32::NEG_INFINITY {
                assert_eq!(y, 0.0, "{name}: exp2(-inf) must be exactly 0");
            }
        }
        assert!(worst > 0.0, "{name}: suspiciously exact");
        eprintln!("{name}: max relative error {worst:.2e}");
    }

    #[test]
    fn fast_exp2_is_accurate_on_every_isa() {
        let xs = inputs();
        let ys: Vec<f32> = xs.iter().map(|&x| exp2_scalar(x)).collect();
        check("portable scalar", &xs, &ys);
        check("portable vector", &xs, &unsafe {
            exp2_all::<Portable>(&xs)
        });
        #[cfg(target_arch = "x86_64")]
        {
            if crate::Isa::Avx512.available() {
                check("avx512", &xs, &unsafe { exp2_avx512(&xs) });
            }
            if crate::Isa::Avx2.available() {
                check("avx2", &xs, &unsafe { exp2_avx2(&xs) });
            }
        }
    }
}
