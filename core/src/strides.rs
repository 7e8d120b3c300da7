//! Strided input views: q, k, v (and the backward's out, dout) given as element strides over a
//! larger buffer, so a transposed `[batch, heads, seqlen, dim]` tensor or a packed
//! `[batch, seqlen, 3, heads, dim]` qkv buffer is read in place, without a copy.
//!
//! Only inputs take strides; outputs and gradients are always contiguous in the spec's layout.
//! The head dimension is always contiguous (stride 1). An offset into a buffer is given by
//! slicing it (`&qkv[heads * dim..]` is k of a packed qkv).

use crate::{AttentionSpec, Error, Result, TensorRef};

/// Element strides of one input tensor (head_dim contiguous).
///
/// Dense `[batch, seqlen, heads, dim]`: element `(b, s, h, x)` lies at
/// `b * batch + s * seq + h * head + x`. Varlen `[total, heads, dim]`: token `t` lies at
/// `t * seq + h * head + x`, and `batch` is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Strides {
    pub batch: usize,
    pub seq: usize,
    pub head: usize,
}

impl Strides {
    pub fn new(batch: usize, seq: usize, head: usize) -> Strides {
        Strides { batch, seq, head }
    }

    /// The contiguous layout of `[batch, seqlen, heads, dim]` (or varlen `[total, heads, dim]`).
    pub fn contiguous(seqlen: usize, heads: usize, dim: usize) -> Strides {
        let seq = heads.saturating_mul(dim);
        Strides::new(seqlen.saturating_mul(seq), seq, dim)
    }

    /// Elements a buffer needs to hold every row of a `batch x seqlen x heads x dim` view
    /// (`None` on overflow; 0 when the view is empty).
    pub fn extent(&self, batch: usize, seqlen: usize, heads: usize, dim: usize) -> Option<usize> {
        if batch == 0 || seqlen == 0 || heads == 0 || dim == 0 {
            return Some(0);
        }
        let last = (batch - 1)
            .checked_mul(self.batch)?
            .checked_add((seqlen - 1).checked_mul(self.seq)?)?
            .checked_add((heads - 1).checked_mul(self.head)?)?;
        last.checked_add(dim)
    }
}

/// The strides of each input of a spec; `None` is the contiguous layout (the default).
/// `out` and `dout` are the backward pass's inputs (the forward ignores them); a decode step
/// takes strides for `q` only (its caches have their own layout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InputStrides {
    pub q: Option<Strides>,
    pub k: Option<Strides>,
    pub v: Option<Strides>,
    pub out: Option<Strides>,
    pub dout: Option<Strides>,
}

impl InputStrides {
    /// Every input contiguous.
    pub fn is_contiguous(&self) -> bool {
        *self == InputStrides::default()
    }

    /// `Error::Unsupported` naming `backend` when any input is strided: for backends that
    /// read contiguous buffers only.
    pub fn require_contiguous(&self, backend: &'static str) -> Result<()> {
        if self.is_contiguous() {
            return Ok(());
        }
        Err(Error::unsupported(
            backend,
            format!(
                "strided inputs ({self:?}) are not read by this backend (the cpu and wgpu \
                 backends and the cuda backend's non-Hopper kernels read them); pass contiguous \
                 buffers"
            ),
        ))
    }
}

impl AttentionSpec {
    /// Reads the inputs through `strides` (see [`InputStrides`]).
    pub fn strides(mut self, strides: InputStrides) -> Self {
        self.strides = strides;
        self
    }

    /// The same problem with contiguous inputs (the reference and the benchmarks' layout).
    pub fn contiguous(&self) -> AttentionSpec {
        let mut s = self.clone();
        s.strides = InputStrides::default();
        s
    }
}

/// Checks that a view of `tokens` rows (`batch` sequences of `seqlen` each, dense, or one
/// run of `seqlen` tokens, varlen) stays inside a buffer of `len` elements.
pub(crate) fn check_view(
    name: &'static str,
    strides: &Strides,
    (batch, seqlen, heads, dim): (usize, usize, usize, usize),
    len: usize,
) -> Result<()> {
    let bad = |reason: String| Error::argument(name, format!("{strides:?}"), reason);
    let shape = format!("{batch} x {seqlen} x {heads} x {dim}");
    match strides.extent(batch, seqlen, heads, dim) {
        None => Err(bad(format!(
            "the last element of the {shape} view overflows"
        ))),
        Some(end) if end > len => Err(bad(format!(
            "the {shape} view reaches element {end}, past the buffer's {len} elements"
        ))),
        Some(_) => Ok(()),
    }
}

impl<'a> TensorRef<'a> {
    /// The elements from `offset` on (a view's start inside a larger buffer, e.g. k inside a
    /// packed qkv buffer); `None` past the end.
    pub fn tail(&self, offset: usize) -> Option<TensorRef<'a>> {
        Some(match *self {
            TensorRef::F32(s) => TensorRef::F32(s.get(offset..)?),
            TensorRef::F16(s) => TensorRef::F16(s.get(offset..)?),
            TensorRef::Bf16(s) => TensorRef::Bf16(s.get(offset..)?),
            TensorRef::Fp8E4m3(s) => TensorRef::Fp8E4m3(s.get(offset..)?),
        })
    }
}
