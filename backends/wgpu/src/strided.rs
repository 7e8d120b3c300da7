//! Strided inputs on the device: how the kernels address each input (`Params`' `*_sb`,
//! `*_ss`, `*_sh`, `*_at`; see shaders/params.wgsl) and how it is bound.
//!
//! A contiguous input is bound in token ranges like every other tensor. A strided one is
//! bound whole (from its slice's start through the last element its view reaches): its rows
//! need not be in token order (a transposed `[batch, heads, seqlen, dim]` view spreads every
//! token over the whole buffer), so a token range is no byte range of it. One that does not
//! fit in a storage binding is refused (`Error::Unsupported`, naming it).

use crate::bindings::BufferSlice;
use crate::device::unsupported;
use flashattn_core::{CheckedSpec, Result, Strides};

/// The inputs that take strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    Q,
    K,
    V,
    Out,
    Dout,
}

impl Input {
    pub const ALL: [Input; 5] = [Input::Q, Input::K, Input::V, Input::Out, Input::Dout];

    pub fn name(self) -> &'static str {
        match self {
            Input::Q => "q",
            Input::K => "k",
            Input::V => "v",
            Input::Out => "out",
            Input::Dout => "dout",
        }
    }

    /// The `FLAG_WHOLE_*` bit of the input: bound whole, not from its dispatch's first token.
    pub fn whole_flag(self) -> u32 {
        use crate::params::*;
        match self {
            Input::Q => FLAG_WHOLE_Q,
            Input::K => FLAG_WHOLE_K,
            Input::V => FLAG_WHOLE_V,
            Input::Out => FLAG_WHOLE_OUT,
            Input::Dout => FLAG_WHOLE_DOUT,
        }
    }

    /// Whether the input is bound by query tokens (else by key tokens).
    pub fn q_side(self) -> bool {
        matches!(self, Input::Q | Input::Out | Input::Dout)
    }
}

/// How the kernels address one input: element `x` of head `h` of token `tok` (counted over
/// the whole tensor) of sequence `b` lies at `b * sb + tok * ss + h * sh + x - at` of its
/// binding, in wrapping u32 arithmetic (exact: the true index is below 2^32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct View {
    pub sb: u32,
    pub ss: u32,
    pub sh: u32,
    /// Elements per token of the contiguous layout (the token ranges' offsets).
    row_elems: u64,
    elem_bytes: u64,
    /// Strided: bound whole, this many bytes from the slice's start.
    whole: Option<u64>,
}

impl View {
    /// The view of `input` in `c`. Strides that describe the contiguous layout count as
    /// contiguous (bound in token ranges).
    pub fn of(c: &CheckedSpec<'_>, input: Input) -> View {
        let (heads, dim) = match input {
            Input::Q => (c.heads_q, c.head_dim),
            Input::K => (c.heads_kv, c.head_dim),
            Input::V => (c.heads_kv, c.head_dim_v),
            Input::Out | Input::Dout => (c.heads_q, c.head_dim_v),
        };
        let strides = match input {
            Input::Q => c.strides.q,
            Input::K => c.strides.k,
            Input::V => c.strides.v,
            Input::Out => c.strides.out,
            Input::Dout => c.strides.dout,
        };
        let varlen = c.is_varlen();
        let (batch, seqlen) = match (varlen, input.q_side()) {
            (true, true) => (1, c.sizes.q_tokens),
            (true, false) => (1, c.sizes.k_tokens),
            (false, true) => (c.batch, c.seqlen_q),
            (false, false) => (c.batch, c.seqlen_k),
        };
        let row = (heads * dim) as u64;
        let elem_bytes = c.dtype.size_bytes() as u64;
        let contiguous = View {
            sb: 0,
            ss: row as u32,
            sh: dim as u32,
            row_elems: row,
            elem_bytes,
            whole: None,
        };
        let Some(st) = strides.filter(|st| !is_contiguous(st, batch, seqlen, heads, dim)) else {
            return contiguous;
        };
        // Tokens are counted over the tensor (tok = b * seqlen + i when dense), so the batch
        // stride the kernels take is what is left of it after seqlen token strides.
        let sb = if varlen {
            0
        } else {
            (st.batch as u64).wrapping_sub((seqlen as u64).wrapping_mul(st.seq as u64))
        };
        let extent = st.extent(batch, seqlen, heads, dim).unwrap_or(usize::MAX) as u64;
        View {
            sb: sb as u32,
            ss: st.seq as u32,
            sh: st.head as u32,
            whole: Some(extent.saturating_mul(elem_bytes)),
            ..contiguous
        }
    }

    pub fn is_strided(&self) -> bool {
        self.whole.is_some()
    }

    /// Bytes of the input a slice must hold: the contiguous size, or the strided view's reach.
    pub fn bytes(&self, contiguous: u64) -> u64 {
        self.whole.unwrap_or(contiguous)
    }

    /// Its binding for a dispatch over tokens `range` of `base`.
    pub fn bind<'a>(&self, base: BufferSlice<'a>, range: (u64, u64)) -> Result<BufferSlice<'a>> {
        match self.whole {
            Some(bytes) => BufferSlice::words(base, 0, bytes),
            None => BufferSlice::tokens(base, range, self.row_elems * self.elem_bytes),
        }
    }

    /// `Error::Unsupported` when a strided input cannot be bound whole under `limit` bytes.
    pub fn check_binding(&self, input: Input, limit: u64) -> Result<()> {
        match self.whole {
            Some(bytes) if bytes.next_multiple_of(4) > limit => Err(unsupported(format!(
                "strided {} reaches {bytes} bytes, more than the storage binding limit of {limit} bytes: a strided input is bound whole (its rows are not in token order, so it is not cut into token chunks); pass it contiguous",
                input.name()
            ))),
            _ => Ok(()),
        }
    }
}

/// Whether `st` is the contiguous layout of the view (a batch stride of one sequence, or a
/// token stride of one token, is never used).
fn is_contiguous(st: &Strides, batch: usize, seqlen: usize, heads: usize, dim: usize) -> bool {
    let row = heads * dim;
    (st.head == dim || heads == 1)
        && (st.seq == row || seqlen == 1)
        && (st.batch == seqlen * row || batch == 1)
}

/// The views of every input of `c`, in `Input::ALL` order.
pub(crate) fn views(c: &CheckedSpec<'_>) -> [View; 5] {
    Input::ALL.map(|i| View::of(c, i))
}
