//! TMA tensor maps for the Hopper kernel, encoded on the host with cuTensorMapEncodeTiled.
//!
//! q, k and v are viewed as 3-D tensors `[tokens, heads, dim]` (dim innermost). One box is
//! 64 elements of one head for `rows` tokens: 64 x 2 bytes = 128 bytes, the span of the
//! 128-byte swizzle that the kernel's wgmma descriptors expect (FP8: 128 x 1 byte). FP8's
//! transposed V, `[heads_kv, dim, keys]` (keys innermost), is loaded in boxes of 128 keys x dim.

use crate::compile::BACKEND;
use crate::device::drv_err;
use cudarc::driver::sys;
use flashattn_core::{DType, Error, Result};

/// Elements per box row (one 128-byte swizzle span of 16-bit values).
pub const BOX_COLS: u32 = 64;
/// Elements per box row of FP8 tensors (one 128-byte swizzle span of bytes).
pub const FP8_BOX_COLS: u32 = 128;

/// The arguments of cuTensorMapEncodeTiled, checked against TMA's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapParams {
    /// Sizes, innermost first: dim, heads, tokens.
    pub dims: [u64; 3],
    /// Byte strides of dims 1 and 2 (dim 0 is contiguous).
    pub strides: [u64; 2],
    /// Box: 64 columns, 1 head, `rows` tokens (Vt: 128 keys, dim rows, 1 head).
    pub box_dims: [u32; 3],
    /// Bytes per element: 2, or 1 for FP8.
    pub elem_bytes: u32,
}

impl TensorMapParams {
    /// A `[tokens, heads, dim]` tensor of `dtype` (16-bit or FP8) in boxes of `rows` tokens.
    pub fn of_dtype(
        dtype: DType,
        tokens: usize,
        heads: usize,
        dim: usize,
        rows: usize,
    ) -> Result<Self> {
        Self::tokens(tokens, heads, dim, rows, dtype.size_bytes() as u32)
    }

    fn tokens(tokens: usize, heads: usize, dim: usize, rows: usize, elem: u32) -> Result<Self> {
        let e = elem as u64;
        let p = TensorMapParams {
            dims: [dim as u64, heads as u64, tokens as u64],
            strides: [dim as u64 * e, (heads * dim) as u64 * e],
            box_dims: [
                if elem == 1 { FP8_BOX_COLS } else { BOX_COLS },
                1,
                rows as u32,
            ],
            elem_bytes: elem,
        };
        p.check()?;
        Ok(p)
    }

    /// FP8's transposed V, `[heads_kv, dim, keys]` bytes (kernels/fp8_vt.cu), in boxes of
    /// 128 keys x `dim` rows of one head.
    pub fn fp8_vt(keys: usize, heads_kv: usize, dim: usize) -> Result<Self> {
        let p = TensorMapParams {
            dims: [keys as u64, dim as u64, heads_kv as u64],
            strides: [keys as u64, (dim * keys) as u64],
            box_dims: [FP8_BOX_COLS, dim as u32, 1],
            elem_bytes: 1,
        };
        p.check()?;
        Ok(p)
    }

    /// TMA's constraints: strides multiples of 16 bytes and below 2^40, sizes in (0, 2^32],
    /// box sides in [1, 256], the inner box side within the 128-byte swizzle span.
    // `%` rather than `is_multiple_of`: the workspace's minimum Rust is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| {
            Err(Error::Unsupported {
                backend: BACKEND,
                reason: format!("TMA: {what}"),
            })
        };
        for (i, &d) in self.dims.iter().enumerate() {
            if d == 0 || d > (1u64 << 32) {
                return bad(format!("dimension {i} has size {d}, must be in 1..=2^32"));
            }
        }
        for (i, &s) in self.strides.iter().enumerate() {
            if s % 16 != 0 || s >= (1u64 << 40) {
                return bad(format!(
                    "stride {} is {s} bytes, must be a multiple of 16 below 2^40",
                    i + 1
                ));
            }
        }
        for (i, &b) in self.box_dims.iter().enumerate() {
            if b == 0 || b > 256 {
                return bad(format!("box side {i} is {b}, must be in 1..=256"));
            }
        }
        let inner = self.box_dims[0] * self.elem_bytes;
        if inner > 128 {
            return bad(format!(
                "inner box of {inner} bytes exceeds the 128-byte swizzle"
            ));
        }
        if self.dims[0] % self.box_dims[0] as u64 != 0 {
            return bad(format!(
                "dim {} is not a multiple of {}",
                self.dims[0], self.box_dims[0]
            ));
        }
        Ok(())
    }

    #[cfg_attr(not(test), allow(dead_code))]
    /// Bytes one box moves (what the kernel's mbarrier expects per load).
    pub fn box_bytes(&self) -> u64 {
        self.box_dims.iter().map(|&b| b as u64).product::<u64>() * self.elem_bytes as u64
    }

    /// Encodes the map for data at device address `ptr` (16-byte aligned) of `dtype` (FP8 as
    /// bytes).
    #[allow(clippy::manual_is_multiple_of)] // minimum Rust 1.85
    pub fn encode(&self, ptr: sys::CUdeviceptr, dtype: DType) -> Result<sys::CUtensorMap> {
        if ptr % 16 != 0 {
            return Err(Error::backend(
                BACKEND,
                format!("TMA: address {ptr:#x} is not 16-byte aligned"),
            ));
        }
        use sys::CUtensorMapDataType as T;
        let dtype = match dtype {
            DType::Bf16 => T::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            DType::F16 => T::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            DType::Fp8E4m3 => T::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            DType::F32 => return Err(Error::backend(BACKEND, "TMA maps of f32 tensors")),
        };
        let elem_strides = [1u32; 3];
        // SAFETY: CUtensorMap is plain data; every array has the rank's length.
        unsafe {
            let mut map: sys::CUtensorMap = std::mem::zeroed();
            sys::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                3,
                ptr as *mut std::ffi::c_void,
                self.dims.as_ptr(),
                self.strides.as_ptr(),
                self.box_dims.as_ptr(),
                elem_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                // Out-of-bounds rows read as zeros (the kernel masks them anyway).
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
            .map_err(drv_err("cuTensorMapEncodeTiled"))?;
            Ok(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_map_of_a_typical_problem() {
        let p = TensorMapParams::of_dtype(DType::Bf16, 2 * 8192, 16, 128, 128).unwrap();
        assert_eq!(p.dims, [128, 16, 16384]);
        assert_eq!(p.strides, [256, 16 * 128 * 2]);
        assert_eq!(p.box_dims, [64, 1, 128]);
        assert_eq!(p.box_bytes(), 64 * 128 * 2);
    }

    #[test]
    fn rejects_what_tma_cannot_do() {
        // head_dim 40: not a whole number of 64-column boxes.
        assert!(TensorMapParams::of_dtype(DType::Bf16, 10, 2, 40, 128).is_err());
        // 300-row boxes exceed TMA's 256.
        assert!(TensorMapParams::of_dtype(DType::Bf16, 10, 2, 64, 300).is_err());
        // Zero tokens.
        assert!(TensorMapParams::of_dtype(DType::Bf16, 0, 2, 64, 128).is_err());
        let mut p = TensorMapParams::of_dtype(DType::Bf16, 10, 2, 64, 80).unwrap();
        p.strides[0] = 24;
        assert!(p.check().is_err());
        // FP8 head_dim 64: rows of 64 bytes, half a swizzle span.
        assert!(TensorMapParams::of_dtype(DType::Fp8E4m3, 10, 2, 64, 128).is_err());
        // Vt: the padded key count is a whole number of boxes; 300 rows exceed a box side.
        assert!(TensorMapParams::fp8_vt(256 + 32, 2, 128).is_err());
        assert!(TensorMapParams::fp8_vt(256, 2, 300).is_err());
    }

    #[test]
    fn fp8_maps() {
        let p = TensorMapParams::of_dtype(DType::Fp8E4m3, 16384, 16, 256, 128).unwrap();
        assert_eq!(p.dims, [256, 16, 16384]);
        assert_eq!(p.strides, [256, 16 * 256]);
        assert_eq!(p.box_dims, [128, 1, 128]);
        assert_eq!(p.box_bytes(), 128 * 128);
        let vt = TensorMapParams::fp8_vt(2 * 8192, 4, 256).unwrap();
        assert_eq!(vt.dims, [16384, 256, 4]);
        assert_eq!(vt.strides, [16384, 256 * 16384]);
        assert_eq!(vt.box_dims, [128, 256, 1]);
        // One box fills one 128-key column block of a Vt stage: head_dim rows of 128 bytes.
        assert_eq!(vt.box_bytes(), 256 * 128);
    }
}
