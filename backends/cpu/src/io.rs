//! Reading input rows as f32 and writing output rows in the output dtype.

use flashattn_core::{CheckedSpec, DType, Error, Result, Strides, Tensor, TensorRef};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// An input tensor of a dtype the CPU computes with (fp8 is rejected before this).
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> Src<'a> {
    pub fn new(t: TensorRef<'a>) -> Result<Self> {
        match t {
            TensorRef::F32(s) => Ok(Src::F32(s)),
            TensorRef::F16(s) => Ok(Src::F16(s)),
            TensorRef::Bf16(s) => Ok(Src::Bf16(s)),
            TensorRef::Fp8E4m3(_) => Err(crate::fp8_unsupported()),
        }
    }

    /// The f32 data when the tensor is f32 (the kernels then read it in place).
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match self {
            Src::F32(s) => Some(s),
            _ => None,
        }
    }

    /// The raw bits of an f16 or bf16 tensor (the low-precision tiles read them as they are).
    pub fn bits(&self) -> Option<&'a [u16]> {
        match self {
            Src::F32(_) => None,
            Src::F16(s) => Some(s.reinterpret_cast()),
            Src::Bf16(s) => Some(s.reinterpret_cast()),
        }
    }

    /// Asks for the `len` elements at `offset` to be brought into cache (a hint; no-op off
    /// x86_64 or out of range). Block packing reads rows a page apart, which the hardware
    /// prefetcher does not follow, so it requests a few rows ahead itself.
    #[inline]
    pub fn prefetch(&self, offset: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let (base, size, total) = match self {
                Src::F32(s) => (s.as_ptr() as *const u8, 4, s.len()),
                Src::F16(s) => (s.as_ptr() as *const u8, 2, s.len()),
                Src::Bf16(s) => (s.as_ptr() as *const u8, 2, s.len()),
            };
            if offset + len > total {
                return;
            }
            let mut b = offset * size;
            while b < (offset + len) * size {
                // SAFETY: the address lies inside the slice; prefetch never faults anyway.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        base.add(b) as *const i8,
                    )
                };
                b += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (offset, len);
    }

    /// Widens `dst.len()` elements starting at `offset` into `dst`. The caller keeps the
    /// range inside the validated tensor.
    #[inline]
    pub fn read_row(&self, offset: usize, dst: &mut [f32]) {
        let end = offset + dst.len();
        match self {
            Src::F32(s) => dst.copy_from_slice(&s[offset..end]),
            Src::F16(s) => s[offset..end].convert_to_f32_slice(dst),
            Src::Bf16(s) => s[offset..end].convert_to_f32_slice(dst),
        }
    }
}

/// Where the (token, head) rows of an input lie in its buffer: the spec's strides, or the
/// contiguous layout. Rows of one sequence are `token` elements apart, so a block of rows
/// is read as (first row's offset, `token`) like a contiguous one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowLayout {
    /// Stride between consecutive tokens of a sequence.
    pub token: usize,
    head: usize,
    batch: usize,
    /// Tokens per batch entry of a dense strided view; `usize::MAX` when the tokens form one
    /// run (contiguous or varlen), so that `at` never divides on that path.
    seqlen: usize,
}

impl RowLayout {
    /// q's rows (`[tokens, heads_q, head_dim]`).
    pub fn q(spec: &CheckedSpec<'_>) -> Self {
        let (h, d) = (spec.heads_q, spec.head_dim);
        Self::new(spec, spec.strides.q, spec.seqlen_q, h, d)
    }
    pub fn k(spec: &CheckedSpec<'_>) -> Self {
        let (h, d) = (spec.heads_kv, spec.head_dim);
        Self::new(spec, spec.strides.k, spec.seqlen_k, h, d)
    }
    pub fn v(spec: &CheckedSpec<'_>) -> Self {
        let (h, d) = (spec.heads_kv, spec.head_dim_v);
        Self::new(spec, spec.strides.v, spec.seqlen_k, h, d)
    }
    /// The backward's out or dout (`[tokens, heads_q, head_dim_v]`).
    pub fn out(spec: &CheckedSpec<'_>, strides: Option<Strides>) -> Self {
        let (h, d) = (spec.heads_q, spec.head_dim_v);
        Self::new(spec, strides, spec.seqlen_q, h, d)
    }

    fn new(
        spec: &CheckedSpec<'_>,
        strides: Option<Strides>,
        seqlen: usize,
        heads: usize,
        dim: usize,
    ) -> Self {
        match strides {
            None => RowLayout {
                token: heads * dim,
                head: dim,
                batch: 0,
                seqlen: usize::MAX,
            },
            Some(st) => RowLayout {
                token: st.seq,
                head: st.head,
                batch: st.batch,
                seqlen: if spec.is_varlen() {
                    usize::MAX
                } else {
                    seqlen.max(1)
                },
            },
        }
    }

    /// Element offset of row (`token`, `head`); `token` counts as in the spec's contiguous
    /// layout (`b * seqlen + i` dense, the varlen token index).
    #[inline]
    pub fn at(&self, token: usize, head: usize) -> usize {
        if token < self.seqlen {
            return token * self.token + head * self.head;
        }
        let (b, i) = (token / self.seqlen, token % self.seqlen);
        b * self.batch + i * self.token + head * self.head
    }
}

/// The output buffer, written row by row from many threads through a raw pointer.
pub(crate) struct OutBuf {
    ptr: OutPtr,
    len: usize,
}

#[derive(Clone, Copy)]
enum OutPtr {
    F32(*mut f32),
    F16(*mut f16),
    Bf16(*mut bf16),
}

// SAFETY: threads only write disjoint rows (each (token, head) row belongs to one task).
unsafe impl Send for OutBuf {}
unsafe impl Sync for OutBuf {}

impl OutBuf {
    /// A zeroed output tensor of `dtype` with `len` elements and a writer into it. The writer
    /// stays valid while the tensor is alive and not resized (moving the `Tensor` is fine).
    pub fn zeroed(dtype: DType, len: usize) -> Result<(Tensor, OutBuf)> {
        let mut t = match dtype {
            DType::F32 => Tensor::F32(vec![0.0; len]),
            DType::F16 => Tensor::F16(vec![f16::ZERO; len]),
            DType::Bf16 => Tensor::Bf16(vec![bf16::ZERO; len]),
            DType::Fp8E4m3 => return Err(crate::fp8_unsupported()),
        };
        let ptr = match &mut t {
            Tensor::F32(v) => OutPtr::F32(v.as_mut_ptr()),
            Tensor::F16(v) => OutPtr::F16(v.as_mut_ptr()),
            Tensor::Bf16(v) => OutPtr::Bf16(v.as_mut_ptr()),
            Tensor::Fp8E4m3(_) => return Err(Error::backend("cpu", "fp8 output buffer")),
        };
        Ok((t, OutBuf { ptr, len }))
    }

    /// Writes `vals` at `offset`, rounding to the output dtype.
    ///
    /// # Safety
    /// No other thread writes this range concurrently and the tensor is alive.
    // Inlined so that the bf16 loop is vectorised with the worker's target features
    // (`half`'s slice conversion of bf16 is a scalar loop: 3.6% of a bf16 forward at d 64).
    #[inline(always)]
    pub unsafe fn write_row(&self, offset: usize, vals: &[f32]) {
        assert!(offset + vals.len() <= self.len, "output row out of bounds");
        match self.ptr {
            OutPtr::F32(p) => {
                std::slice::from_raw_parts_mut(p.add(offset), vals.len()).copy_from_slice(vals)
            }
            OutPtr::F16(p) => std::slice::from_raw_parts_mut(p.add(offset), vals.len())
                .convert_from_f32_slice(vals),
            OutPtr::Bf16(p) => {
                let dst = std::slice::from_raw_parts_mut(p.add(offset) as *mut u16, vals.len());
                for (d, &x) in dst.iter_mut().zip(vals) {
                    *d = bf16_bits(x);
                }
            }
        }
    }
}

/// `x` rounded to nearest even bf16 (a NaN stays a quiet NaN): `half::bf16::from_f32`
/// without branches, so that a loop of it vectorises.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        (b >> 16) as u16 | 0x40
    } else {
        rounded
    }
}

/// The LSE buffer, written per row from many threads.
pub(crate) struct LseBuf {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: as for `OutBuf`, every LSE entry belongs to exactly one task.
unsafe impl Send for LseBuf {}
unsafe impl Sync for LseBuf {}

impl LseBuf {
    pub fn new(v: &mut [f32]) -> Self {
        LseBuf {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    /// # Safety
    /// No other thread writes entry `i` concurrently and the vector is alive.
    #[inline]
    pub unsafe fn write(&self, i: usize, value: f32) {
        assert!(i < self.len, "lse index out of bounds");
        *self.ptr.add(i) = value;
    }
}

/// A 64-byte aligned f32 buffer (whole cache lines for the tiles' vector loads).
pub(crate) struct AlignedBuf {
    blocks: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf {
            blocks: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }
    pub fn as_ptr(&self) -> *const f32 {
        self.blocks.as_ptr() as *const f32
    }
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.blocks.as_mut_ptr() as *mut f32
    }
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: `Line` is 16 f32 with no padding; `len <= 16 * blocks.len()`.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
    /// The buffer as `2 * len` u16 (the low-precision tiles' operands).
    pub fn as_u16(&self) -> *const u16 {
        self.as_ptr() as *const u16
    }
    pub fn as_mut_u16(&mut self) -> &mut [u16] {
        // SAFETY: the same bytes as `as_mut_slice`, as twice as many u16.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr() as *mut u16, 2 * self.len) }
    }
}

/// An f32 buffer whose disjoint row ranges tasks read and write from many threads (the
/// backward's dq accumulator and its per-row delta).
pub(crate) struct SharedRows {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: callers only touch ranges no other thread touches at the same time (see `rows`).
unsafe impl Send for SharedRows {}
unsafe impl Sync for SharedRows {}

impl SharedRows {
    pub fn new(v: &mut [f32]) -> Self {
        SharedRows {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    /// The `len` elements at `offset`.
    ///
    /// # Safety
    /// No other thread accesses this range while the slice lives, and the buffer is alive.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn rows(&self, offset: usize, len: usize) -> &mut [f32] {
        assert!(offset + len <= self.len, "rows out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(offset), len)
    }
}

/// A zeroed f32 buffer of `rows x cols` elements; an error naming `what` (never an abort or
/// a wrapped size) when the size overflows or the memory cannot be had.
pub(crate) fn try_zeroed(rows: usize, cols: usize, what: &str) -> Result<Vec<f32>> {
    let fail = || {
        Error::backend(
            "cpu",
            format!("cannot allocate {what} ({rows} x {cols} f32)"),
        )
    };
    let n = rows
        .checked_mul(cols)
        .filter(|n| n.checked_mul(4).is_some())
        .ok_or_else(fail)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| fail())?;
    v.resize(n, 0.0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::bf16_bits;
    use half::bf16;

    /// Against `half` on every sign / exponent and a spread of mantissas (ties, values next
    /// to ties, overflow to inf, subnormals, NaN payloads).
    #[test]
    fn bf16_bits_matches_half() {
        let mantissas = [
            0, 1, 0x7fff, 0x8000, 0x8001, 0x1_7fff, 0x1_8000, 0x7f_ffff, 0x40_0001,
        ];
        for top in 0..=0x1ffu32 {
            for m in mantissas {
                let x = f32::from_bits(top << 23 | m);
                let want = bf16::from_f32(x).to_bits();
                assert_eq!(bf16_bits(x), want, "{x:e} ({:#010x})", x.to_bits());
            }
        }
    }
}
