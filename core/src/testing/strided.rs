//! Strided copies of contiguous test inputs: the same values laid out through [`Strides`]
//! inside a larger buffer whose other elements are NaN, so that a backend reading any
//! element outside the view makes its output NaN; and the checks every backend's strided
//! tests run on them (the same results, bit for bit, as on the contiguous inputs).

use super::backward_tolerance;
use crate::{
    random_inputs, random_tensor, reference_attention, reference_backward, rel_l2_error,
    AttentionSpec, Backend, BackwardInputs, DType, ForwardInputs, InputStrides, Output, Strides,
    Tensor,
};
use rand::SeedableRng;

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

/// Odd sizes, GQA, causal and windowed masks, softcap, head dims 40 and 72, varlen, one query
/// row: the strided cases every backend's tests run.
pub fn cases() -> Vec<AttentionSpec> {
    vec![
        AttentionSpec::new(2, 4, 17, 129, 40)
            .heads_kv(2)
            .causal(true),
        AttentionSpec::new(3, 2, 129, 129, 72).causal(true),
        AttentionSpec::new(2, 3, 1, 17, 72)
            .head_dim_v(40)
            .softcap(20.0),
        AttentionSpec::new(1, 6, 129, 17, 40)
            .heads_kv(3)
            .window(8, 0),
        AttentionSpec::new(3, 4, 147, 147, 40)
            .heads_kv(1)
            .varlen(vec![0, 1, 18, 147], vec![0, 17, 146, 147])
            .causal(true),
    ]
}

/// `spec` in `dtype`, returning its LSE (which the strided runs compare too).
pub fn with_dtype(spec: &AttentionSpec, dtype: DType) -> AttentionSpec {
    spec.clone().dtype(dtype).return_lse(true)
}

/// The forward on strided copies (each of `layouts`) of fresh random inputs equals the
/// forward on the contiguous inputs bit for bit; that one matches the f64 reference. Returns
/// the inputs and the contiguous output, for further layouts a test checks itself.
pub fn check_forward(
    backend: &dyn Backend,
    spec: &AttentionSpec,
    layouts: &[Layout],
    seed: u64,
) -> ((Tensor, Tensor, Tensor), Output) {
    let (q, k, v) = random_inputs(spec, seed);
    let plain = backend
        .forward(spec, ForwardInputs::of(&q, &k, &v))
        .unwrap_or_else(|e| panic!("{spec}: {e}"));
    let want = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let err = rel_l2_error(&plain.out.to_f32_vec(), &want.out);
    assert!(err <= spec.dtype.tolerance(), "{spec}: rel L2 {err:.2e}");
    for &layout in layouts {
        let s = strided_inputs(spec, (&q, &k, &v), None, layout);
        let got = backend
            .forward(&s.spec, ForwardInputs::of(&s.q, &s.k, &s.v))
            .unwrap_or_else(|e| panic!("{spec} {layout:?}: {e}"));
        assert!(got == plain, "{spec} {layout:?}: strided output differs");
    }
    ((q, k, v), plain)
}

/// The backward on strided copies (each of `layouts`) of fresh random q, k, v, out and dout
/// equals the backward on the contiguous ones bit for bit; that one matches the reference.
pub fn check_backward(backend: &dyn Backend, spec: &AttentionSpec, layouts: &[Layout], seed: u64) {
    let (q, k, v) = random_inputs(spec, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xd0);
    let dout = random_tensor(&mut rng, spec.dtype.output(), spec.out_elems().unwrap());
    let fwd = backend
        .forward(spec, ForwardInputs::of(&q, &k, &v))
        .unwrap_or_else(|e| panic!("{spec}: {e}"));
    let lse = fwd.lse.clone().unwrap();
    let plain = backend
        .backward(
            spec,
            BackwardInputs::of((&q, &k, &v), &fwd.out, &lse, &dout),
        )
        .unwrap_or_else(|e| panic!("{spec}: {e}"));
    let want = reference_backward(spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    let tol = backward_tolerance(spec.dtype);
    for (name, g, w) in [
        ("dq", &plain.dq, &want.dq),
        ("dk", &plain.dk, &want.dk),
        ("dv", &plain.dv, &want.dv),
    ] {
        let err = rel_l2_error(&g.to_f32_vec(), w);
        assert!(err <= tol, "{spec}: {name} rel L2 {err:.2e}");
    }
    for &layout in layouts {
        let s = strided_inputs(spec, (&q, &k, &v), Some((&fwd.out, &dout)), layout);
        let (out, d_out) = (s.out.as_ref().unwrap(), s.dout.as_ref().unwrap());
        let inputs = BackwardInputs::of((&s.q, &s.k, &s.v), out, &lse, d_out);
        let got = backend
            .backward(&s.spec, inputs)
            .unwrap_or_else(|e| panic!("{spec} {layout:?}: {e}"));
        assert!(got == plain, "{spec} {layout:?}: strided gradients differ");
    }
}

/// q, k and v of a spec (`seqlen_q == seqlen_k`, `head_dim == head_dim_v`) packed in one
/// buffer per token, `[tokens, heads_q + 2 heads_kv, d]` and `pad` NaN elements, each read
/// through strides from its offset in it (as `&qkv[offset..]`).
pub struct Packed {
    /// The spec with the strides that read the buffer.
    pub spec: AttentionSpec,
    pub buf: Tensor,
    /// Where q, k and v start in `buf`, in elements.
    pub at: [usize; 3],
}

impl Packed {
    pub fn new(spec: &AttentionSpec, (q, k, v): (&Tensor, &Tensor, &Tensor), pad: usize) -> Self {
        assert_eq!(spec.seqlen_q, spec.seqlen_k);
        assert_eq!(spec.head_dim, spec.head_dim_v);
        let (hq, hkv, d) = (spec.heads_q, spec.heads_kv, spec.head_dim);
        let tokens = if spec.is_varlen() {
            spec.seqlen_q
        } else {
            spec.batch * spec.seqlen_q
        };
        let row = (hq + 2 * hkv) * d + pad;
        let at = [0, hq * d, (hq + hkv) * d];
        let mut buf = vec![f32::NAN; tokens * row];
        for (t, heads, off) in [(q, hq, at[0]), (k, hkv, at[1]), (v, hkv, at[2])] {
            let x = t.to_f32_vec();
            for tok in 0..tokens {
                let src = &x[tok * heads * d..][..heads * d];
                buf[tok * row + off..][..heads * d].copy_from_slice(src);
            }
        }
        // Dense: batch b starts seqlen rows on (seqlen_q = seqlen_k); varlen: by token.
        let st = Some(Strides::new(spec.seqlen_q * row, row, d));
        let strides = InputStrides {
            q: st,
            k: st,
            v: st,
            ..Default::default()
        };
        Packed {
            spec: spec.clone().strides(strides),
            buf: Tensor::from_f32(spec.dtype, &buf),
            at,
        }
    }

    /// The views of q, k and v into the buffer.
    pub fn inputs(&self) -> ForwardInputs<'_> {
        let t = self.buf.as_ref();
        let [q, k, v] = self
            .at
            .map(|a| t.tail(a).expect("offsets inside the buffer"));
        ForwardInputs { q, k, v }
    }
}
