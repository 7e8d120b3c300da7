//! Packing f16 / bf16 rows and f32 probabilities into the low-precision tiles' operands
//! (`lowp.rs`), and the power-of-two block scale of the f16 format.
//!
//! The f16 format scales each packed block by 2^e so that its largest finite |x| lies in
//! [4, 8): bf16 values keep their 8 significant bits (f16 has 11) whatever their exponent,
//! and no sum of a tile (at most 256 products of two such values, or 2048 probabilities times
//! one) can overflow. Only values below 2^-20 of the block's largest lose bits (f16
//! subnormals). Infinities and NaN are kept as they are and do not enter the scale.

use crate::io::Src;
use crate::lowp::{Format, Lowp};
use half::{bf16, f16};
use std::ops::Range;

/// Rows the packing loops prefetch ahead of the row they convert.
const PACK_AHEAD: usize = 8;

/// Where a packed block's rows come from: row `r` at `off + r * stride`, `len` elements.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
    pub off: usize,
    pub stride: usize,
    pub n: usize,
    pub len: usize,
}

/// The factor a block of `src` rows is packed with: 2^e bringing its largest finite |x|
/// into [4, 8) for the f16 format; 1 for bf16 (f32's range) or a block without finite
/// non-zero values.
///
/// # Safety
/// This CPU has `L`'s instructions.
// Inlined into the target-feature worker: on its own it would call each intrinsic.
#[inline(always)]
pub(crate) unsafe fn block_scale<L: Lowp>(src: &Src, rows: Rows) -> f32 {
    let (Some(bits), Format::F16) = (src.bits(), L::FORMAT) else {
        return 1.0;
    };
    // |x| orders as its bits without the sign; exponent all ones is inf / NaN.
    let (inf, to_f32): (u16, fn(u16) -> f32) = match src {
        Src::F16(_) => (0x7c00, |b| f16::from_bits(b).to_f32()),
        _ => (0x7f80, |b| bf16::from_bits(b).to_f32()),
    };
    let last = rows.off + rows.n.saturating_sub(1) * rows.stride + rows.len;
    assert!(
        rows.n == 0 || last <= bits.len(),
        "block rows past the input"
    );
    let mx = L::max_magnitude(bits.as_ptr(), rows, inf, PACK_AHEAD);
    pow2_scale(to_f32(mx))
}

/// Whether `block_scale` reads (and prefetches) the rows: then packing them needs no
/// prefetch of its own.
#[inline(always)]
fn scanned<L: Lowp>(src: &Src) -> bool {
    L::FORMAT == Format::F16 && src.bits().is_some()
}

/// 2^e with `max * 2^e` in [4, 8) (e within f32 normal exponents), or 1 for a zero `max`.
pub(crate) fn pow2_scale(max: f32) -> f32 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let biased = ((max.to_bits() >> 23) & 0xff) as i32;
    let e = (129 - biased).clamp(-126, 127);
    f32::from_bits(((e + 127) as u32) << 23)
}

/// One element in the format, rounded to nearest even.
#[inline(always)]
pub(crate) fn to_format(x: f32, format: Format) -> u16 {
    match format {
        Format::F16 => f16::from_f32(x).to_bits(),
        Format::Bf16 => bf16::from_f32(x).to_bits(),
    }
}

/// `dst[x] = format(src[off + x] * scale)` for `x < dst.len()`. bf16 into bf16 (scale 1)
/// and f16 into f16 at scale 1 copy the bits.
#[inline(always)]
pub(crate) unsafe fn convert_row<L: Lowp>(src: &Src, off: usize, scale: f32, dst: &mut [u16]) {
    let len = dst.len();
    let same = matches!(
        (src, L::FORMAT),
        (Src::F16(_), Format::F16) | (Src::Bf16(_), Format::Bf16)
    );
    if let (true, true, Some(bits)) = (same, scale == 1.0, src.bits()) {
        dst.copy_from_slice(&bits[off..off + len]);
        return;
    }
    let (from, bits) = match src {
        Src::F16(_) => (Format::F16, src.bits()),
        _ => (Format::Bf16, src.bits()),
    };
    match bits {
        Some(bits) => L::convert(
            bits[off..off + len].as_ptr(),
            from,
            len,
            scale,
            dst.as_mut_ptr(),
        ),
        None => {
            // f32 input: never on the low-precision path, kept correct anyway.
            let mut row = vec![0.0f32; len];
            src.read_row(off, &mut row);
            for (d, &x) in dst.iter_mut().zip(&row) {
                *d = to_format(x * scale, L::FORMAT);
            }
        }
    }
}

/// Rows converted into `dst[((r / KW) * ld + x) * KW + r % KW]`, x < `rows.len` (the
/// layout of a B operand whose reduction runs over the rows: V for P·V); with KW = 2 an odd
/// last row is paired with zeros. `tmp` holds one row.
#[inline(always)]
pub(crate) unsafe fn pack_rows<L: Lowp>(
    src: &Src,
    rows: Rows,
    scale: f32,
    tmp: &mut [u16],
    dst: &mut [u16],
    ld: usize,
) {
    let len = rows.len;
    for r in 0..rows.n.next_multiple_of(L::KW) {
        let at = rows.off + r * rows.stride;
        if r + PACK_AHEAD < rows.n && !scanned::<L>(src) {
            src.prefetch(at + PACK_AHEAD * rows.stride, len);
        }
        if L::KW == 1 {
            convert_row::<L>(src, at, scale, &mut dst[r * ld..r * ld + len]);
            continue;
        }
        if r < rows.n {
            convert_row::<L>(src, at, scale, &mut tmp[..len]);
        } else {
            tmp[..len].fill(0);
        }
        let base = (r / L::KW) * ld * L::KW + r % L::KW;
        for (x, &v) in tmp[..len].iter().enumerate() {
            dst[base + x * L::KW] = v;
        }
    }
}

/// Rows converted and transposed into `dst[((x / KW) * ld + r) * KW + x % KW]` (the layout
/// of a B operand whose reduction runs along the rows: Q^T for Q·K^T); rows `rows.n..n_pad`
/// are zero, and so is the element past an odd `rows.len` with KW = 2.
#[inline(always)]
pub(crate) unsafe fn pack_transposed<L: Lowp>(
    src: &Src,
    rows: Rows,
    n_pad: usize,
    scale: f32,
    tmp: &mut [u16],
    dst: &mut [u16],
    ld: usize,
) {
    let len_k = rows.len.next_multiple_of(L::KW);
    for r in 0..n_pad {
        tmp[..len_k].fill(0);
        if r < rows.n {
            convert_row::<L>(src, rows.off + r * rows.stride, scale, &mut tmp[..rows.len]);
        }
        for (x, &v) in tmp[..len_k].iter().enumerate() {
            dst[((x / L::KW) * ld + r) * L::KW + x % L::KW] = v;
        }
    }
}

/// Key rows as an A operand: `dst[r * ld..][..len]` converted, zero up to `ld` (an even
/// row length for KW = 2).
#[inline(always)]
pub(crate) unsafe fn pack_keys<L: Lowp>(
    src: &Src,
    rows: Rows,
    scale: f32,
    dst: &mut [u16],
    ld: usize,
) {
    for r in 0..rows.n {
        let at = rows.off + r * rows.stride;
        if r + PACK_AHEAD < rows.n && !scanned::<L>(src) {
            src.prefetch(at + PACK_AHEAD * rows.stride, rows.len);
        }
        convert_row::<L>(src, at, scale, &mut dst[r * ld..r * ld + rows.len]);
    }
}

/// Probabilities `pt[j * src_ld + i]` (keys x queries, f32) times `scale` as the A operand
/// of P·V: `dst[((j / KW) * ld + i) * KW + j % KW]` for the keys `0..nk` (a zero key after
/// an odd `nk` with KW = 2) and the queries `cols` (16-aligned start and end). (The
/// backward's dS takes the same path with its block's power of two.)
#[inline(always)]
pub(crate) unsafe fn convert_probs<L: Lowp>(
    pt: *const f32,
    src_ld: usize,
    nk: usize,
    cols: Range<usize>,
    dst: *mut u16,
    ld: usize,
    scale: f32,
) {
    let sc = L::splat(scale);
    for j in (0..nk.next_multiple_of(L::KW)).step_by(L::KW) {
        for i in cols.clone().step_by(16) {
            let lo = L::from_f32(L::mul(L::load(pt.add(j * src_ld + i)), sc));
            if L::KW == 1 {
                (dst.add(j * ld + i) as *mut [u16; 16]).write_unaligned(lo);
                continue;
            }
            let hi = if j + 1 < nk {
                L::from_f32(L::mul(L::load(pt.add((j + 1) * src_ld + i)), sc))
            } else {
                [0; 16]
            };
            let mut pairs = [0u32; 16];
            for (p, (&l, &h)) in pairs.iter_mut().zip(lo.iter().zip(&hi)) {
                *p = l as u32 | (h as u32) << 16;
            }
            (dst.add(((j / 2) * ld + i) * 2) as *mut [u32; 16]).write_unaligned(pairs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_brings_the_largest_value_into_4_to_8() {
        for max in [1e-30f32, 3e-5, 0.7, 1.0, 4.0, 7.99, 8.0, 1000.0, 3e38] {
            let s = pow2_scale(max);
            let scaled = max as f64 * s as f64;
            assert!((4.0..8.0).contains(&scaled), "{max} * {s} = {scaled}");
            assert_eq!(s.to_bits() & 0x7fffff, 0, "{s} is not a power of two");
        }
        for max in [0.0, f32::INFINITY, f32::NAN] {
            assert_eq!(pow2_scale(max), 1.0);
        }
        // Far outside f16: clamped, never an infinite or zero factor.
        assert!(pow2_scale(1e-38) > 0.0 && pow2_scale(1e-38).is_finite());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn block_scale_ignores_infinities_and_nan() {
        use crate::device::Isa;
        use crate::lowp::{Avx512Bf16, Avx512Fp16};
        let v: Vec<bf16> = [1e6, f32::INFINITY, -3e6, f32::NAN, 2.0]
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        let rows = Rows {
            off: 0,
            stride: 5,
            n: 1,
            len: 5,
        };
        if Isa::Avx512Fp16.available() {
            // SAFETY: checked just above.
            let s = unsafe { block_scale::<Avx512Fp16>(&Src::Bf16(&v), rows) };
            let scaled = bf16::from_f32(-3e6).to_f32() * s;
            assert!((4.0..8.0).contains(&scaled.abs()), "{scaled}");
        }
        // The bf16 format keeps f32's range: no scale (and no instruction runs).
        // SAFETY: with the bf16 format it returns before any instruction of the level.
        assert_eq!(
            unsafe { block_scale::<Avx512Bf16>(&Src::Bf16(&v), rows) },
            1.0
        );
    }
}
