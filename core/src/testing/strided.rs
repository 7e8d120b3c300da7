//! Strided copies of contiguous test inputs: the same values laid out through [`Strides`]
//! inside a larger buffer whose other elements are NaN, so that a backend reading any
//! element outside the view makes its output NaN.

use crate::{AttentionSpec, InputStrides, Strides, Tensor};

/// The layouts tests give inputs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// candle's transposed `[batch, heads, seqlen, dim]` (varlen: `[heads, total, dim]`).
    Transposed,
    /// Each token's heads padded by `pad` unused elements per row (`[b, s, heads * dim + pad]`,
    /// as one part of a packed qkv buffer sees it).
    Padded(usize),
}

/// `t` (contiguous `batch x seqlen x heads x dim`; varlen: batch 1, seqlen = total) copied
/// into a buffer laid out as `layout`, with NaN elsewhere, and the strides that read it.
pub fn strided_copy(
    t: &Tensor,
    (batch, seqlen, heads, dim): (usize, usize, usize, usize),
    layout: Layout,
) -> (Tensor, Strides) {
    let st = match layout {
        Layout::Transposed => Strides::new(heads * seqlen * dim, dim, seqlen * dim),
        Layout::Padded(pad) => {
            let row = heads * dim + pad;
            Strides::new(seqlen * row, row, dim)
        }
    };
    let len = st
        .extent(batch, seqlen, heads, dim)
        .expect("test sizes fit");
    let values = t.to_f32_vec();
    let mut buf = vec![f32::NAN; len];
    for b in 0..batch {
        for s in 0..seqlen {
            for h in 0..heads {
                let src = ((b * seqlen + s) * heads + h) * dim;
                let dst = b * st.batch + s * st.seq + h * st.head;
                buf[dst..dst + dim].copy_from_slice(&values[src..src + dim]);
            }
        }
    }
    // The values are already rounded to the dtype: converting back is exact.
    (Tensor::from_f32(t.dtype(), &buf), st)
}

/// Strided copies of q, k, v (and, given, out and dout) of `spec` in `layout`, with `spec`'s
/// strides set to read them.
pub struct StridedInputs {
    pub spec: AttentionSpec,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub out: Option<Tensor>,
    pub dout: Option<Tensor>,
}

/// q, k, v (and out, dout when given) of a validated, contiguous `spec`, each copied into
/// `layout`.
pub fn strided_inputs(
    spec: &AttentionSpec,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out_dout: Option<(&Tensor, &Tensor)>,
    layout: Layout,
) -> StridedInputs {
    let (b, sq, sk) = if spec.is_varlen() {
        (1, spec.seqlen_q, spec.seqlen_k)
    } else {
        (spec.batch, spec.seqlen_q, spec.seqlen_k)
    };
    let (hq, hkv, d, dv) = (spec.heads_q, spec.heads_kv, spec.head_dim, spec.head_dim_v);
    let (q, qs) = strided_copy(q, (b, sq, hq, d), layout);
    let (k, ks) = strided_copy(k, (b, sk, hkv, d), layout);
    let (v, vs) = strided_copy(v, (b, sk, hkv, dv), layout);
    let mut strides = InputStrides {
        q: Some(qs),
        k: Some(ks),
        v: Some(vs),
        ..Default::default()
    };
    let (mut out, mut dout) = (None, None);
    if let Some((o, g)) = out_dout {
        let (o, os) = strided_copy(o, (b, sq, hq, dv), layout);
        let (g, gs) = strided_copy(g, (b, sq, hq, dv), layout);
        (strides.out, strides.dout) = (Some(os), Some(gs));
        (out, dout) = (Some(o), Some(g));
    }
    StridedInputs {
        spec: spec.clone().strides(strides),
        q,
        k,
        v,
        out,
        dout,
    }
}
