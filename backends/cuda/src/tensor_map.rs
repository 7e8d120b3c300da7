//! TMA tensor maps for the Hopper kernel, encoded on the host with cuTensorMapEncodeTiled.
//!
//! q, k and v are viewed as 3-D tensors `[tokens, heads, dim]` (dim innermost). One box is
//! 64 elements of one head for `rows` tokens: 64 x 2 bytes = 128 bytes, the span of the
//! 128-byte swizzle that the kernel's wgmma descriptors expect.

use crate::compile::BACKEND;
use crate::device::drv_err;
use cudarc::driver::sys;
use flashattn_core::{Error, Result};

/// Elements per box row (one 128-byte swizzle span of 16-bit values).
pub const BOX_COLS: u32 = 64;

/// The arguments of cuTensorMapEncodeTiled, checked against TMA's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapParams {
    /// Sizes, innermost first: dim, heads, tokens.
    pub dims: [u64; 3],
    /// Byte strides of dims 1 and 2 (dim 0 is contiguous).
    pub strides: [u64; 2],
    /// Box: 64 columns, 1 head, `rows` tokens.
    pub box_dims: [u32; 3],
}

impl TensorMapParams {
    /// A `[tokens, heads, dim]` tensor of 16-bit elements loaded in boxes of `rows` tokens.
    pub fn new(tokens: usize, heads: usize, dim: usize, rows: usize) -> Result<Self> {
        let elem = 2u64;
        let p = TensorMapParams {
            dims: [dim as u64, heads as u64, tokens as u64],
            strides: [dim as u64 * elem, (heads * dim) as u64 * elem],
            box_dims: [BOX_COLS, 1, rows as u32],
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
        if self.box_dims[0] as u64 * 2 > 128 {
            return bad(format!(
                "inner box of {} bytes exceeds the 128-byte swizzle",
                self.box_dims[0] * 2
            ));
        }
        if self.dims[0] % BOX_COLS as u64 != 0 {
            return bad(format!(
                "dim {} is not a multiple of {BOX_COLS}",
                self.dims[0]
            ));
        }
        Ok(())
    }

    #[cfg_attr(not(test), allow(dead_code))]
    /// Bytes one box moves (what the kernel's mbarrier expects per load).
    pub fn box_bytes(&self) -> u64 {
        self.box_dims.iter().map(|&b| b as u64).product::<u64>() * 2
    }

    /// Encodes the map for data at device address `ptr` (16-byte aligned).
    #[allow(clippy::manual_is_multiple_of)] // minimum Rust 1.85
    pub fn encode(&self, ptr: sys::CUdeviceptr, bf16: bool) -> Result<sys::CUtensorMap> {
        if ptr % 16 != 0 {
            return Err(Error::backend(
                BACKEND,
                format!("TMA: address {ptr:#x} is not 16-byte aligned"),
            ));
        }
        let dtype = if bf16 {
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
        } else {
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
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
        let p = TensorMapParams::new(2 * 8192, 16, 128, 128).unwrap();
        assert_eq!(p.dims, [128, 16, 16384]);
        assert_eq!(p.strides, [256, 16 * 128 * 2]);
        assert_eq!(p.box_dims, [64, 1, 128]);
        assert_eq!(p.box_bytes(), 64 * 128 * 2);
    }

    #[test]
    fn rejects_what_tma_cannot_do() {
        // head_dim 40: not a whole number of 64-column boxes.
        assert!(TensorMapParams::new(10, 2, 40, 128).is_err());
        // 300-row boxes exceed TMA's 256.
        assert!(TensorMapParams::new(10, 2, 64, 300).is_err());
        // Zero tokens.
        assert!(TensorMapParams::new(0, 2, 64, 128).is_err());
        let mut p = TensorMapParams::new(10, 2, 64, 80).unwrap();
        p.strides[0] = 24;
        assert!(p.check().is_err());
    }
}
