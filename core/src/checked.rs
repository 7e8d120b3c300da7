//! `CheckedSpec`: a spec that passed validation, with its sizes as plain numbers. Made once by
//! [`AttentionSpec::validate`] and passed down, so backends neither re-validate nor fall back
//! on made-up sizes.

use crate::{AttentionSpec, Error, Mask, Result};
use std::ops::Deref;

/// Element counts of every buffer of a validated spec (they fit in `usize`, and in bytes too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Rows of q and out (batch * seqlen_q, or total_q for varlen).
    pub q_tokens: usize,
    /// Rows of k and v (batch * seqlen_k, total_k for varlen, the cache's rows with a KV cache).
    pub k_tokens: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub out: usize,
    pub lse: usize,
    /// New k / v rows' elements of a decode call (0 without).
    pub k_new: usize,
    pub v_new: usize,
    /// Longest sequence of the batch, in queries and in keys.
    pub max_q_len: usize,
    pub max_k_len: usize,
}

/// A validated spec. Derefs to the spec itself.
#[derive(Clone, Copy, Debug)]
pub struct CheckedSpec<'a> {
    pub spec: &'a AttentionSpec,
    pub sizes: Sizes,
    pub mask: Mask,
    /// The softmax scale in use.
    pub scale: f32,
}

impl Deref for CheckedSpec<'_> {
    type Target = AttentionSpec;
    fn deref(&self) -> &AttentionSpec {
        self.spec
    }
}

impl<'a> CheckedSpec<'a> {
    /// Computes the sizes of a spec whose fields are valid; an overflow is an error naming the buffer.
    pub(crate) fn new(spec: &'a AttentionSpec) -> Result<CheckedSpec<'a>> {
        let overflow = |name: &str| {
            Error::invalid(
                "shape",
                spec.shape_string(),
                format!("the element count of {name} overflows"),
            )
        };
        let check = |name: &str, n: Option<usize>, elem_bytes: usize| -> Result<usize> {
            // Byte sizes must fit too (a device buffer is sized in bytes).
            n.filter(|n| n.checked_mul(elem_bytes).is_some())
                .ok_or_else(|| overflow(name))
        };
        let es = spec
            .dtype
            .size_bytes()
            .max(spec.dtype.output().size_bytes());
        let sizes = Sizes {
            q_tokens: check("q", spec.q_tokens(), 1)?,
            k_tokens: check("k", spec.k_tokens(), 1)?,
            q: check("q", spec.q_elems(), es)?,
            k: check("k", spec.k_elems(), es)?,
            v: check("v", spec.v_elems(), es)?,
            out: check("out", spec.out_elems(), es)?,
            lse: check("lse", spec.lse_elems(), 4)?,
            k_new: check("k_new", spec.k_new_elems(), es)?,
            v_new: check("v_new", spec.v_new_elems(), es)?,
            max_q_len: spec.max_lens().0,
            max_k_len: spec.max_lens().1,
        };
        Ok(CheckedSpec {
            spec,
            sizes,
            mask: spec.mask(),
            scale: spec.scale_value(),
        })
    }
}
