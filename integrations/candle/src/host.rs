//! Moving data between candle's CPU storage and flashattn's host tensors.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use flashattn_core::{DType as FaDType, Strides, Tensor as FaTensor, TensorRef};
use half::{bf16, f16};
use std::borrow::Cow;

/// The element types flashattn's CPU backend takes, with their flashattn names.
pub(crate) trait Elem: WithDType {
    const FA: FaDType;
    fn tensor_ref(s: &[Self]) -> TensorRef<'_>;
    /// The values of an owned flashattn tensor of this type.
    fn from_fa(t: FaTensor) -> Result<Vec<Self>>;
}

macro_rules! elem {
    ($t:ty, $fa:ident, $variant:ident) => {
        impl Elem for $t {
            const FA: FaDType = FaDType::$fa;
            fn tensor_ref(s: &[Self]) -> TensorRef<'_> {
                TensorRef::$variant(s)
            }
            fn from_fa(t: FaTensor) -> Result<Vec<Self>> {
                match t {
                    FaTensor::$variant(v) => Ok(v),
                    other => candle_core::bail!(
                        "flashattn returned {} where {} was expected",
                        other.dtype(),
                        Self::FA
                    ),
                }
            }
        }
    };
}
elem!(f32, F32, F32);
elem!(f16, F16, F16);
elem!(bf16, Bf16, Bf16);

/// An input as flashattn reads it: elements from the view's start and, for a non-contiguous
/// view, its strides.
pub(crate) struct View<'a, T: Clone> {
    pub data: Cow<'a, [T]>,
    pub strides: Option<Strides>,
}

/// A candle view of `[batch, seqlen, heads, dim]` (or varlen `[total, heads, dim]`) as
/// flashattn reads it, without a copy: contiguous as the slice it covers, otherwise as
/// strides from its start (transposed `[b, h, s, d]` tensors, narrowed ones, packed
/// buffers). Only a view whose last dimension is not contiguous is gathered into a copy.
pub(crate) fn view<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<View<'a, T>> {
    let data = storage.as_slice::<T>()?;
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Ok(View {
            data: Cow::Borrowed(&data[start..end]),
            strides: None,
        });
    }
    let (dims, st) = (layout.dims(), layout.stride());
    let strides = match (dims.len(), st) {
        (4, &[b, s, h, x]) if x == 1 || dims[3] == 1 => Some(Strides::new(b, s, h)),
        (3, &[t, h, x]) if x == 1 || dims[2] == 1 => Some(Strides::new(0, t, h)),
        _ => None,
    };
    match (strides, data.get(layout.start_offset()..)) {
        (Some(strides), Some(tail)) => Ok(View {
            data: Cow::Borrowed(tail),
            strides: Some(strides),
        }),
        _ => Ok(View {
            data: contiguous(storage, layout)?,
            strides: None,
        }),
    }
}

/// The elements of a strided view in row-major order: borrowed when the view is contiguous,
/// gathered into a copy otherwise.
pub(crate) fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<Cow<'a, [T]>> {
    let data = storage.as_slice::<T>()?;
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Ok(Cow::Borrowed(&data[start..end]));
    }
    let (dims, stride) = (layout.dims(), layout.stride());
    let count = layout.shape().elem_count();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; dims.len()];
    let mut offset = layout.start_offset();
    for _ in 0..count {
        out.push(data[offset]);
        // Odometer step over the multi-index, last dimension fastest.
        for d in (0..dims.len()).rev() {
            index[d] += 1;
            offset += stride[d];
            if index[d] < dims[d] {
                break;
            }
            offset -= stride[d] * dims[d];
            index[d] = 0;
        }
    }
    Ok(Cow::Owned(out))
}

/// A flashattn error as a candle error, with its message (which names the bad value).
pub(crate) fn fa_err(e: flashattn_core::Error) -> candle_core::Error {
    candle_core::Error::msg(format!("flashattn: {e}"))
}
