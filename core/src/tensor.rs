//! Host tensors: borrowed inputs (`TensorRef`) and owned buffers (`Tensor`).

use crate::fp8::{e4m3_to_f32, f32_to_e4m3};
use crate::{DType, Error, Result};
use half::{bf16, f16};

/// A borrowed host tensor of any supported dtype, flat in the spec's layout.
#[derive(Clone, Copy, Debug)]
pub enum TensorRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    /// Raw e4m3 bytes.
    Fp8E4m3(&'a [u8]),
}

/// A mutable borrowed host tensor (a KV cache that a decode call appends to in place).
#[derive(Debug)]
pub enum TensorMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [bf16]),
    Fp8E4m3(&'a mut [u8]),
}

/// `dtype`, `len` and `is_empty` of an owning or mutable tensor, read through its `as_ref`.
macro_rules! through_as_ref {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn dtype(&self) -> DType {
                self.as_ref().dtype()
            }

            pub fn len(&self) -> usize {
                self.as_ref().len()
            }

            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }
        }
    )*};
}

through_as_ref!(TensorMut<'_>, Tensor);

impl TensorMut<'_> {
    /// A shared view of the same elements.
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            TensorMut::F32(s) => TensorRef::F32(s),
            TensorMut::F16(s) => TensorRef::F16(s),
            TensorMut::Bf16(s) => TensorRef::Bf16(s),
            TensorMut::Fp8E4m3(s) => TensorRef::Fp8E4m3(s),
        }
    }

    pub fn reborrow(&mut self) -> TensorMut<'_> {
        match self {
            TensorMut::F32(s) => TensorMut::F32(s),
            TensorMut::F16(s) => TensorMut::F16(s),
            TensorMut::Bf16(s) => TensorMut::Bf16(s),
            TensorMut::Fp8E4m3(s) => TensorMut::Fp8E4m3(s),
        }
    }

    /// Writes `values` (rounded to this tensor's dtype) at element offset `at`.
    pub fn write_f32(&mut self, at: usize, values: &[f32]) {
        match self {
            TensorMut::F32(s) => s[at..at + values.len()].copy_from_slice(values),
            TensorMut::F16(s) => {
                for (d, &x) in s[at..].iter_mut().zip(values) {
                    *d = f16::from_f32(x);
                }
            }
            TensorMut::Bf16(s) => {
                for (d, &x) in s[at..].iter_mut().zip(values) {
                    *d = bf16::from_f32(x);
                }
            }
            TensorMut::Fp8E4m3(s) => {
                for (d, &x) in s[at..].iter_mut().zip(values) {
                    *d = f32_to_e4m3(x);
                }
            }
        }
    }
}

/// An owned host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    Fp8E4m3(Vec<u8>),
}

impl TensorRef<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::F32(_) => DType::F32,
            TensorRef::F16(_) => DType::F16,
            TensorRef::Bf16(_) => DType::Bf16,
            TensorRef::Fp8E4m3(_) => DType::Fp8E4m3,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorRef::F32(s) => s.len(),
            TensorRef::F16(s) => s.len(),
            TensorRef::Bf16(s) => s.len(),
            TensorRef::Fp8E4m3(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f32.
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            TensorRef::F32(s) => s[i],
            TensorRef::F16(s) => s[i].to_f32(),
            TensorRef::Bf16(s) => s[i].to_f32(),
            TensorRef::Fp8E4m3(s) => e4m3_to_f32(s[i]),
        }
    }

    /// All elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            TensorRef::F32(s) => s.to_vec(),
            TensorRef::F16(s) => s.iter().map(|x| x.to_f32()).collect(),
            TensorRef::Bf16(s) => s.iter().map(|x| x.to_f32()).collect(),
            TensorRef::Fp8E4m3(s) => s.iter().map(|&x| e4m3_to_f32(x)).collect(),
        }
    }

    /// The raw bytes, for upload to a device.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            TensorRef::F32(s) => bytemuck::cast_slice(s),
            TensorRef::F16(s) => bytemuck::cast_slice(s),
            TensorRef::Bf16(s) => bytemuck::cast_slice(s),
            TensorRef::Fp8E4m3(s) => s,
        }
    }
}

impl Tensor {
    /// Rounds f32 values to `dtype`.
    pub fn from_f32(dtype: DType, values: &[f32]) -> Tensor {
        match dtype {
            DType::F32 => Tensor::F32(values.to_vec()),
            DType::F16 => Tensor::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Bf16 => Tensor::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::Fp8E4m3 => Tensor::Fp8E4m3(values.iter().map(|&x| f32_to_e4m3(x)).collect()),
        }
    }

    /// Reinterprets raw device bytes of `dtype` (little-endian, as GPUs store them). A length
    /// that is not a whole number of elements is an error, never padded.
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        if !bytes.len().is_multiple_of(dtype.size_bytes()) {
            return Err(Error::InvalidArgument {
                argument: "bytes",
                value: format!("{} bytes", bytes.len()),
                reason: format!("not a whole number of {dtype} elements"),
            });
        }
        Ok(match dtype {
            DType::F32 => Tensor::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => Tensor::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::Bf16 => Tensor::Bf16(bytemuck::pod_collect_to_vec(bytes)),
            DType::Fp8E4m3 => Tensor::Fp8E4m3(bytes.to_vec()),
        })
    }

    /// An all-zero tensor of `n` elements.
    pub fn zeros(dtype: DType, n: usize) -> Tensor {
        match dtype {
            DType::F32 => Tensor::F32(vec![0.0; n]),
            DType::F16 => Tensor::F16(vec![f16::ZERO; n]),
            DType::Bf16 => Tensor::Bf16(vec![bf16::ZERO; n]),
            DType::Fp8E4m3 => Tensor::Fp8E4m3(vec![0; n]),
        }
    }

    pub fn as_mut(&mut self) -> TensorMut<'_> {
        match self {
            Tensor::F32(v) => TensorMut::F32(v),
            Tensor::F16(v) => TensorMut::F16(v),
            Tensor::Bf16(v) => TensorMut::Bf16(v),
            Tensor::Fp8E4m3(v) => TensorMut::Fp8E4m3(v),
        }
    }

    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Tensor::F32(v) => TensorRef::F32(v),
            Tensor::F16(v) => TensorRef::F16(v),
            Tensor::Bf16(v) => TensorRef::Bf16(v),
            Tensor::Fp8E4m3(v) => TensorRef::Fp8E4m3(v),
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.as_ref().to_f32_vec()
    }
}

/// Gradients of a backward pass, in the input dtype: dq like q, dk like k, dv like v.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// The result of a forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// `[.., heads_q, head_dim_v]` in the output dtype of the spec.
    pub out: Tensor,
    /// Log-sum-exp of each row (natural log), when the spec asks for it; `-inf` for fully masked rows.
    pub lse: Option<Vec<f32>>,
}
