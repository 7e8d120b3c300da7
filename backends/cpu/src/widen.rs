//! What the decode kernels need beyond `simd::Simd`: f16 / bf16 loads widened to f32 in
//! registers (a cache is read in its own dtype, never converted into a temporary copy), a
//! horizontal sum, and each instruction set's register-tile shapes for decode.

#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::simd::{Portable, Simd};
use half::{bf16, f16};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

pub(crate) trait Widen: Simd {
    /// Query rows x keys (2 or 4) of accumulators in one dot-product tile.
    const DOT_ROWS: usize;
    const DOT_KEYS: usize;
    /// P·V tile: rows x vectors of accumulators.
    const PV_ROWS: usize;
    const PV_NV: usize;

    /// `LANES` f16 values at `p` as f32.
    unsafe fn load_f16(p: *const f16) -> Self::V;
    /// `LANES` bf16 values at `p` as f32.
    unsafe fn load_bf16(p: *const bf16) -> Self::V;
    /// The sum of the lanes.
    unsafe fn hsum(v: Self::V) -> f32;
    /// `LANES` sums at once: lane `i` of the result is the sum of the lanes of `v[i]`
    /// (`v.len() == LANES`). A transposing tree: a fraction of `LANES` separate sums' work.
    unsafe fn hsum_lanes(v: &[Self::V]) -> Self::V;
}

/// A cache element type: f32, f16 or bf16.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// `S::LANES` elements at `p`, widened.
    unsafe fn load<S: Widen>(p: *const Self) -> S::V;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load<S: Widen>(p: *const f32) -> S::V {
        S::load(p)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    unsafe fn load<S: Widen>(p: *const f16) -> S::V {
        S::load_f16(p)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self)
    }
    #[inline(always)]
    unsafe fn load<S: Widen>(p: *const bf16) -> S::V {
        S::load_bf16(p)
    }
}

/// bf16 is the top half of an f32: widening is a shift (exact, as `half`'s conversion).
#[inline(always)]
fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

impl Widen for Portable {
    const DOT_ROWS: usize = 2;
    const DOT_KEYS: usize = 4;
    const PV_ROWS: usize = 2;
    const PV_NV: usize = 2;

    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self::V {
        std::array::from_fn(|i| (*p.add(i)).to_f32())
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> Self::V {
        std::array::from_fn(|i| bf16_to_f32(*p.add(i)))
    }
    #[inline(always)]
    unsafe fn hsum(v: Self::V) -> f32 {
        let h: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
        (h[0] + h[2]) + (h[1] + h[3])
    }
    #[inline(always)]
    unsafe fn hsum_lanes(v: &[Self::V]) -> Self::V {
        std::array::from_fn(|i| Self::hsum(v[i]))
    }
}

#[cfg(target_arch = "x86_64")]
impl Widen for Avx2 {
    // 8 accumulators + 2 key vectors + q of 16 ymm registers.
    const DOT_ROWS: usize = 4;
    const DOT_KEYS: usize = 2;
    const PV_ROWS: usize = 4;
    const PV_NV: usize = 2;

    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self::V {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> Self::V {
        let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
    }
    #[inline(always)]
    unsafe fn hsum(v: Self::V) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
    #[inline(always)]
    unsafe fn hsum_lanes(v: &[Self::V]) -> Self::V {
        // Per 128-bit half: [v0, v1, v2, v3] partial sums, then the halves added. (No
        // closures here: they would not inherit the caller's target features.)
        let lo4 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        let hi4 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(lo4, hi4),
            _mm256_permute2f128_ps::<0x31>(lo4, hi4),
        )
    }
}

#[cfg(target_arch = "x86_64")]
impl Widen for Avx512 {
    const DOT_ROWS: usize = 4;
    const DOT_KEYS: usize = 4;
    const PV_ROWS: usize = 4;
    const PV_NV: usize = 4;

    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self::V {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> Self::V {
        let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
    }
    #[inline(always)]
    unsafe fn hsum(v: Self::V) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline(always)]
    unsafe fn hsum_lanes(v: &[Self::V]) -> Self::V {
        // 16 -> 8: halves of v[2i] and v[2i+1] added, side by side.
        let mut a = [_mm512_setzero_ps(); 8];
        for (i, x) in a.iter_mut().enumerate() {
            let (p, q) = (v[2 * i], v[2 * i + 1]);
            *x = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(p, q),
                _mm512_shuffle_f32x4::<0xee>(p, q),
            );
        }
        // 8 -> 4: each 128-bit unit holds 4 partial sums of one input.
        let mut b = [_mm512_setzero_ps(); 4];
        for (i, x) in b.iter_mut().enumerate() {
            let (p, q) = (a[2 * i], a[2 * i + 1]);
            *x = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(p, q),
                _mm512_shuffle_f32x4::<0xdd>(p, q),
            );
        }
        // 4 -> 2 -> 1 within the units: unit u, position k holds the sum of v[4k + u].
        let c0 = _mm512_add_ps(
            _mm512_unpacklo_ps(b[0], b[1]),
            _mm512_unpackhi_ps(b[0], b[1]),
        );
        let c1 = _mm512_add_ps(
            _mm512_unpacklo_ps(b[2], b[3]),
            _mm512_unpackhi_ps(b[2], b[3]),
        );
        let (c0, c1) = (_mm512_castps_pd(c0), _mm512_castps_pd(c1));
        let d = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(c0, c1)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(c0, c1)),
        );
        // Transpose the 4 x 4 back: lane i = sum of v[i].
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(idx, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Widened loads and sums of `S` on 64 values of each dtype, against `half`.
    #[inline(always)]
    unsafe fn check<S: Widen>() {
        let xs: Vec<f32> = (0..64).map(|i| (i as f32 - 31.3) * 0.37).collect();
        let h: Vec<f16> = xs.iter().map(|&x| f16::from_f32(x)).collect();
        let b: Vec<bf16> = xs.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut got = vec![0.0f32; S::LANES];
        for at in (0..64).step_by(S::LANES) {
            S::store(got.as_mut_ptr(), f16::load::<S>(h[at..].as_ptr()));
            for (i, g) in got.iter().enumerate() {
                assert_eq!(*g, h[at + i].to_f32());
            }
            S::store(got.as_mut_ptr(), bf16::load::<S>(b[at..].as_ptr()));
            for (i, g) in got.iter().enumerate() {
                assert_eq!(*g, b[at + i].to_f32());
            }
            let sum = S::hsum(f32::load::<S>(xs[at..].as_ptr()));
            let want: f32 = xs[at..at + S::LANES].iter().sum();
            assert!((sum - want).abs() < 1e-4, "{sum} vs {want}");
        }
        // LANES vectors of distinct values, summed lane-wise at once.
        let vals: Vec<f32> = (0..S::LANES * S::LANES)
            .map(|i| (i * i % 97) as f32)
            .collect();
        // (A loop, not a closure: closures do not inherit the caller's target features.)
        let mut vs = Vec::new();
        for c in vals.chunks(S::LANES) {
            vs.push(S::load(c.as_ptr()));
        }
        S::store(got.as_mut_ptr(), S::hsum_lanes(&vs));
        for (i, g) in got.iter().enumerate() {
            let want: f32 = vals[i * S::LANES..(i + 1) * S::LANES].iter().sum();
            assert_eq!(*g, want, "hsum_lanes lane {i} of {}", S::LANES);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn check_avx512() {
        check::<Avx512>()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn check_avx2() {
        check::<Avx2>()
    }

    #[test]
    fn widened_loads_match_half_on_every_isa() {
        unsafe { check::<Portable>() };
        #[cfg(target_arch = "x86_64")]
        {
            if crate::Isa::Avx512.available() {
                unsafe { check_avx512() };
            }
            if crate::Isa::Avx2.available() {
                unsafe { check_avx2() };
            }
        }
    }
}
