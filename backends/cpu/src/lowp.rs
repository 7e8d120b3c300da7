//! Low-precision block products: the register tiles of the two low-precision instruction
//! sets, for f16 / bf16 inputs (f32 inputs never come here).
//!
//! - `Avx512Fp16`: operands in f16, `vfmadd231ph` on 32 lanes: each product is rounded to
//!   f16 together with its addition, the accumulators are f16 for one tile's reduction (a
//!   head dim of Q·K^T, a key block of P·V) and are then converted exactly to f32 and added
//!   into the f32 result. Operands are first brought into [4, 8) by a power of two per block
//!   (`lowp_pack.rs`), so no sum can overflow f16 (|sum| <= 64 * 256) and bf16's range is
//!   kept. Twice the multiply-adds per instruction of f32 FMA.
//! - `Avx512Bf16`: operands in bf16, `vdpbf16ps`: pairs of exact bf16 products added into
//!   f32 accumulators (the GPU kernels' numerics). Its operands interleave pairs along the
//!   reduction dimension.
//!
//! Operand layouts, in elements (u16): the broadcast operand A holds the `KW` elements of
//! (row i, reduction step s) at `a + i * a_rs + s * a_cs`; the vector operand B holds step
//! s's columns at `b + s * ldb`, `KW` elements per column. The result C is f32.

use crate::block::{alpha_at, TileKernel};
use crate::lowp_pack::Rows;
#[cfg(target_arch = "x86_64")]
use crate::simd::Avx512;
use crate::simd::Simd;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::marker::PhantomData;

/// What a low-precision level stores its tiles' operands as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    F16,
    Bf16,
}

/// One C tile: `C[i][cols] = C[i] * alpha[i] + scale * sum_s A(i, s) · B[s][cols]` (with a
/// null `alpha`, `C = scale * sum`).
#[derive(Clone, Copy)]
pub(crate) struct LowTile {
    /// Reduction steps (`KW` elements each).
    pub k: usize,
    pub a: *const u16,
    pub a_rs: usize,
    pub a_cs: usize,
    pub b: *const u16,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub alpha: *const f32,
    pub scale: f32,
    /// Reduction steps an f16 accumulator runs before it is added into the f32 result
    /// (the f16 format only: each chunk's sum is rounded at f16's relative precision).
    pub chunk: usize,
    /// Where the f16 tiles fold each C column's max over the tile's rows (`max[c] =
    /// max(max[c], C[i][c])`, NaN as `vmaxps` orders it), so the forward needs no separate
    /// max pass over S^T; null for none (and on the bf16 tiles).
    pub max: *mut f32,
}

/// A low-precision level: the f32 primitives of AVX-512 (`Simd`) plus its tile format.
pub(crate) trait Lowp: Simd {
    const FORMAT: Format;
    /// Reduction elements per step: 1 (an f16 FMA) or 2 (a `vdpbf16ps` pair).
    const KW: usize;
    /// Output columns per accumulator register.
    const COLS: usize;
    /// Tile shape: MR broadcast rows x NV accumulator registers.
    const MR: usize;
    const NV: usize;

    /// C tile with `mr` (1..=MR) rows and `nv` (1..=NV) accumulators.
    unsafe fn tile(mr: usize, nv: usize, t: LowTile);
    /// 16 f32 values rounded to nearest (even) in the format.
    unsafe fn from_f32(x: Self::V) -> [u16; 16];
    /// `dst[x] = format(value(src[x]) * scale)` for `x < n`, `src` holding f16 or bf16
    /// bits (`from`).
    unsafe fn convert(src: *const u16, from: Format, n: usize, scale: f32, dst: *mut u16);
    /// The largest `bits & 0x7fff` below `inf` (the finite magnitudes) of the rows `rows`
    /// (`rows.off` from `src`), prefetching the row `ahead` rows on.
    unsafe fn max_magnitude(src: *const u16, rows: Rows, inf: u16, ahead: usize) -> u16;
    /// The largest finite |x| of `n` f32 rows at `src` (`ld` apart), columns `0..cols` (a
    /// multiple of 16); 0 if there is none (infinities and NaN are skipped).
    unsafe fn max_finite_f32(src: *const f32, ld: usize, n: usize, cols: usize) -> f32;
}

/// Forwards `Simd` to `Avx512`: the low-precision levels compute everything outside their
/// block products (softmax, exp2, masks) with the AVX-512 f32 code.
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_simd {
    ($t:ty) => {
        impl Simd for $t {
            type V = __m512;
            const LANES: usize = Avx512::LANES;
            const MR_QK: usize = Avx512::MR_QK;
            const NV_QK: usize = Avx512::NV_QK;
            const MR_PV: usize = Avx512::MR_PV;
            const NV_PV: usize = Avx512::NV_PV;
            #[inline(always)]
            unsafe fn zero() -> __m512 {
                Avx512::zero()
            }
            #[inline(always)]
            unsafe fn splat(x: f32) -> __m512 {
                Avx512::splat(x)
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> __m512 {
                Avx512::load(p)
            }
            #[inline(always)]
            unsafe fn store(p: *mut f32, v: __m512) {
                Avx512::store(p, v)
            }
            #[inline(always)]
            unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
                Avx512::fma(a, b, c)
            }
            #[inline(always)]
            unsafe fn mul(a: __m512, b: __m512) -> __m512 {
                Avx512::mul(a, b)
            }
            #[inline(always)]
            unsafe fn add(a: __m512, b: __m512) -> __m512 {
                Avx512::add(a, b)
            }
            #[inline(always)]
            unsafe fn sub(a: __m512, b: __m512) -> __m512 {
                Avx512::sub(a, b)
            }
            #[inline(always)]
            unsafe fn max(a: __m512, b: __m512) -> __m512 {
                Avx512::max(a, b)
            }
            #[inline(always)]
            unsafe fn exp2(x: __m512) -> __m512 {
                Avx512::exp2(x)
            }
            #[inline(always)]
            unsafe fn qk_tile(mr: usize, nv: usize, t: crate::simd::Tile) {
                Avx512::qk_tile(mr, nv, t)
            }
            #[inline(always)]
            unsafe fn pv_tile(mr: usize, nv: usize, t: crate::simd::Tile) {
                Avx512::pv_tile(mr, nv, t)
            }
        }
    };
}

/// AVX512-FP16 level: f16 tiles, 8 rows x 2 registers of 32 f16 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx512Fp16;

/// AVX512-BF16 level: bf16 pair tiles, 8 rows x 3 registers of 16 f32 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx512Bf16;

#[cfg(target_arch = "x86_64")]
avx512_simd!(Avx512Fp16);
#[cfg(target_arch = "x86_64")]
avx512_simd!(Avx512Bf16);

/// `acc += b * broadcast(*a)` on 32 f16 lanes, rounded once to f16 (`vfmadd231ph` with an
/// embedded broadcast). The AVX512-FP16 arithmetic intrinsics are not stable in Rust 1.95,
/// so this one instruction is inline assembly. One `asm!` per instruction lets LLVM allocate
/// registers; tiles of more than 16 accumulators spilled (measured), hence the 8 x 2 tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fma_ph(acc: __m512i, b: __m512i, a: *const u16) -> __m512i {
    let mut acc = acc;
    // SAFETY: reads 2 bytes at `a` (the caller's operand); AVX512-FP16 is checked by `Isa`.
    std::arch::asm!(
        "vfmadd231ph {acc}, {b}, word ptr [{a}]{{1to32}}",
        acc = inout(zmm_reg) acc,
        b = in(zmm_reg) b,
        a = in(reg) a,
        options(pure, readonly, nostack, preserves_flags)
    );
    acc
}

/// Dispatches runtime (rows, registers) counts to the const-generic tile.
#[cfg(target_arch = "x86_64")]
macro_rules! low_dispatch {
    ($tile:ident, $rows:expr, $nv:expr, $t:expr; rows [$($mr:literal)+]; nv $nvs:tt) => {
        match $rows {
            $($mr => low_dispatch!(@nv $tile, $mr, $nv, $t, $nvs),)+
            _ => debug_assert!(false, "bad tile rows"),
        }
    };
    (@nv $tile:ident, $mr:literal, $nv:expr, $t:expr, [$($v:literal)+]) => {
        match $nv {
            $($v => $tile::<$mr, $v>($t),)+
            _ => debug_assert!(false, "bad tile width"),
        }
    };
}

/// Writes one accumulator's f32 columns: `C = C * alpha + scale * x` (or `scale * x`),
/// and returns them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_cols(c: *mut f32, x: __m512, scale: __m512, alpha: Option<__m512>) -> __m512 {
    let v = match alpha {
        Some(al) => _mm512_fmadd_ps(x, scale, _mm512_mul_ps(_mm512_loadu_ps(c), al)),
        None => _mm512_mul_ps(x, scale),
    };
    _mm512_storeu_ps(c, v);
    v
}

/// Adds one accumulator's f32 columns: `C += scale * x`, and returns them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn add_cols(c: *mut f32, x: __m512, scale: __m512) -> __m512 {
    let v = _mm512_fmadd_ps(x, scale, _mm512_loadu_ps(c));
    _mm512_storeu_ps(c, v);
    v
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_fp16<const MR: usize, const NV: usize>(t: LowTile) {
    let scale = _mm512_set1_ps(t.scale);
    let (mut a, mut b) = (t.a, t.b);
    let mut s0 = 0;
    while s0 < t.k {
        let steps = t.chunk.min(t.k - s0);
        let mut acc = [[_mm512_setzero_si512(); NV]; MR];
        for _ in 0..steps {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(b.add(v * 32) as *const _);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                for (x, bx) in row.iter_mut().zip(&bv) {
                    *x = fma_ph(*x, *bx, a.add(i * t.a_rs));
                }
            }
            a = a.add(t.a_cs);
            b = b.add(t.ldb);
        }
        let fold = s0 + steps >= t.k && !t.max.is_null();
        let mut mx = [[_mm512_set1_ps(f32::NEG_INFINITY); 2]; NV];
        for (i, row) in acc.iter().enumerate() {
            // The first chunk starts C (from C * alpha, or from nothing); later ones add.
            let alpha = if s0 > 0 || t.alpha.is_null() {
                None
            } else {
                Some(_mm512_set1_ps(*t.alpha.add(i)))
            };
            for (v, x) in row.iter().enumerate() {
                let c = t.c.add(i * t.ldc + v * 32);
                let lo = _mm512_cvtph_ps(_mm512_castsi512_si256(*x));
                let hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(*x));
                let out = if s0 == 0 {
                    [
                        store_cols(c, lo, scale, alpha),
                        store_cols(c.add(16), hi, scale, alpha),
                    ]
                } else {
                    [add_cols(c, lo, scale), add_cols(c.add(16), hi, scale)]
                };
                if fold {
                    mx[v] = [
                        _mm512_max_ps(mx[v][0], out[0]),
                        _mm512_max_ps(mx[v][1], out[1]),
                    ];
                }
            }
        }
        if fold {
            for (v, halves) in mx.iter().enumerate() {
                for (h, m) in halves.iter().enumerate() {
                    let at = t.max.add(v * 32 + h * 16);
                    _mm512_storeu_ps(at, _mm512_max_ps(_mm512_loadu_ps(at), *m));
                }
            }
        }
        s0 += steps;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_bf16<const MR: usize, const NV: usize>(t: LowTile) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let (mut a, mut b) = (t.a, t.b);
    for _ in 0..t.k {
        let mut bv = [_mm512_setzero_si512(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(b.add(v * 32) as *const _);
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let pair = (a.add(i * t.a_rs) as *const i32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for (x, bx) in row.iter_mut().zip(&bv) {
                *x = _mm512_dpbf16_ps(*x, av, std::mem::transmute::<__m512i, __m512bh>(*bx));
            }
        }
        a = a.add(t.a_cs);
        b = b.add(t.ldb);
    }
    let scale = _mm512_set1_ps(t.scale);
    for (i, row) in acc.iter().enumerate() {
        // (No closure: it would not inherit the caller's target features.)
        let alpha = if t.alpha.is_null() {
            None
        } else {
            Some(_mm512_set1_ps(*t.alpha.add(i)))
        };
        for (v, x) in row.iter().enumerate() {
            store_cols(t.c.add(i * t.ldc + v * 16), *x, scale, alpha);
        }
    }
}

/// A low-precision level on AVX-512: its format, reduction width, tile shape (8 rows x
/// `nv` accumulators of `cols` columns), tile kernel and f32 rounding; the conversions of
/// both levels are the same AVX-512 code.
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_lowp {
    ($t:ty, $format:ident, kw $kw:literal, cols $cols:literal, nv [$nv:literal $($nvs:literal)*],
     $tile:ident, |$x:ident| $from_f32:expr) => {
        impl Lowp for $t {
            const FORMAT: Format = Format::$format;
            const KW: usize = $kw;
            const COLS: usize = $cols;
            const MR: usize = 8;
            const NV: usize = $nv;

            #[inline(always)]
            unsafe fn tile(mr: usize, nv: usize, t: LowTile) {
                low_dispatch!($tile, mr, nv, t; rows [8 7 6 5 4 3 2 1]; nv [$nv $($nvs)*])
            }
            #[inline(always)]
            unsafe fn from_f32($x: __m512) -> [u16; 16] {
                $from_f32
            }
            #[inline(always)]
            unsafe fn convert(src: *const u16, from: Format, n: usize, scale: f32, dst: *mut u16) {
                convert_bits::<Self>(src, from, n, scale, dst)
            }
            #[inline(always)]
            unsafe fn max_magnitude(src: *const u16, rows: Rows, inf: u16, ahead: usize) -> u16 {
                max_magnitude(src, rows, inf, ahead)
            }
            #[inline(always)]
            unsafe fn max_finite_f32(src: *const f32, ld: usize, n: usize, cols: usize) -> f32 {
                max_finite_f32(src, ld, n, cols)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
avx512_lowp!(Avx512Fp16, F16, kw 1, cols 32, nv [2 1], tile_fp16, |x| {
    let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    std::mem::transmute(h)
});

#[cfg(target_arch = "x86_64")]
avx512_lowp!(Avx512Bf16, Bf16, kw 2, cols 16, nv [3 2 1], tile_bf16, |x| {
    std::mem::transmute(_mm512_cvtneps_pbh(x))
});

/// 16 f16 / bf16 values (the first `n`, the rest 0) as f32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load16(src: *const u16, from: Format, n: usize) -> __m512 {
    let bits = if n >= 16 {
        _mm256_loadu_si256(src as *const __m256i)
    } else {
        _mm256_maskz_loadu_epi16((1u16 << n) - 1, src as *const i16)
    };
    match from {
        Format::F16 => _mm512_cvtph_ps(bits),
        Format::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits))),
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn convert_bits<L: Lowp<V = __m512>>(
    src: *const u16,
    from: Format,
    n: usize,
    scale: f32,
    dst: *mut u16,
) {
    let sc = _mm512_set1_ps(scale);
    let mut x = 0;
    while x < n {
        let m = (n - x).min(16);
        let v: __m256i =
            std::mem::transmute(L::from_f32(_mm512_mul_ps(load16(src.add(x), from, m), sc)));
        if m == 16 {
            _mm256_storeu_si256(dst.add(x) as *mut __m256i, v);
        } else {
            _mm256_mask_storeu_epi16(dst.add(x) as *mut i16, (1u16 << m) - 1, v);
        }
        x += m;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn max_magnitude(src: *const u16, rows: Rows, inf: u16, ahead: usize) -> u16 {
    let (abs, inf) = (_mm512_set1_epi16(0x7fff), _mm512_set1_epi16(inf as i16));
    let (stride, len) = (rows.stride, rows.len);
    // One running max over every row, folded once: a fold per row cost as much as the scan.
    let mut mx = _mm512_setzero_si512();
    for r in 0..rows.n {
        let row = src.add(rows.off + r * stride);
        // Prefetch never faults, so the row past the block needs no bound.
        let next = row.wrapping_add(ahead * stride) as *const i8;
        for line in (0..len * 2).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line));
        }
        let mut x = 0;
        while x < len {
            let k: __mmask32 = if len - x >= 32 {
                !0
            } else {
                (1u32 << (len - x)) - 1
            };
            let v = _mm512_and_si512(_mm512_maskz_loadu_epi16(k, row.add(x) as *const i16), abs);
            let finite = _mm512_cmplt_epu16_mask(v, inf);
            mx = _mm512_mask_max_epu16(mx, finite, mx, v);
            x += 32;
        }
    }
    let lanes: [u16; 32] = std::mem::transmute(mx);
    lanes.iter().fold(0, |a, &b| a.max(b))
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn max_finite_f32(src: *const f32, ld: usize, n: usize, cols: usize) -> f32 {
    debug_assert!(cols.is_multiple_of(16));
    let inf = _mm512_set1_ps(f32::INFINITY);
    let mut mx = _mm512_setzero_ps();
    for r in 0..n {
        for x in (0..cols).step_by(16) {
            let v = _mm512_abs_ps(_mm512_loadu_ps(src.add(r * ld + x)));
            // Ordered less-than: false for NaN and for infinities.
            let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, inf);
            mx = _mm512_mask_max_ps(mx, finite, mx, v);
        }
    }
    _mm512_reduce_max_ps(mx)
}

/// The tiles of a low-precision level, for [`qk_product`](crate::block::qk_product) (`C[r][cols] = scale *
/// sum_s A(r, s) B[s][cols]`, columns rounded out to whole tiles: the caller's B and C have
/// room and B zeros there) and [`pv_product`](crate::block::pv_product) (with `scale`).
pub(crate) struct LowTiles<L>(PhantomData<L>);

impl<L: Lowp> TileKernel for LowTiles<L> {
    type Tile = LowTile;
    const MR: usize = L::MR;
    const NV: usize = L::NV;
    const COLS: usize = L::COLS;
    #[inline(always)]
    fn vectors(cols: usize) -> usize {
        L::NV.min(cols.div_ceil(L::COLS))
    }
    #[inline(always)]
    unsafe fn at(t: &LowTile, r: usize, c: usize, alpha: bool) -> LowTile {
        LowTile {
            a: t.a.add(r * t.a_rs),
            b: t.b.add(c * L::KW),
            c: t.c.add(r * t.ldc + c),
            alpha: alpha_at(t.alpha, r, alpha),
            max: if t.max.is_null() { t.max } else { t.max.add(c) },
            ..*t
        }
    }
    #[inline(always)]
    unsafe fn run(mr: usize, nv: usize, t: LowTile) {
        L::tile(mr, nv, t)
    }
}
