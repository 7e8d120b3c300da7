//! Strided canaries. A backend may pick its kernel by the inputs' layout (the CUDA backend's
//! Hopper kernel reads contiguous inputs only, its mma.sync kernel strides that are multiples
//! of 8 elements), so the canary's small problem keeps the caller's layout class: each strided
//! input of the caller is strided in the twin too, rows padded so that its strides have the
//! same power-of-two alignment (up to 16 elements). [`Strided`] runs the backend on such
//! padded copies of contiguous inputs, so that the reference checks it on the same values.

use flashattn_core::testing::strided::{strided_copy, Layout};
use flashattn_core::{
    AttentionSpec, Backend, BackwardInputs, DecodeInputs, Error, ForwardInputs, Grads,
    InputStrides, Output, Result, Strides, Tensor, TensorRef,
};

/// The largest alignment kept, in elements (16 bf16 values are 32 bytes).
const MAX_ALIGN: u32 = 4;

/// The strides of the twin `small` of `spec`: contiguous where `spec`'s input is, else rows
/// padded by the alignment of `spec`'s strides for that input.
pub fn twin_strides(spec: &AttentionSpec, small: &AttentionSpec) -> InputStrides {
    let dims = Dims::of(small);
    let twin = |orig: Option<Strides>, (_, s, h, d): (usize, usize, usize, usize)| {
        orig.map(|o| {
            let pad = 1usize << (o.batch | o.seq | o.head).trailing_zeros().min(MAX_ALIGN);
            let row = h * d + pad;
            // strided_copy's Layout::Padded(pad).
            Strides::new(s * row, row, d)
        })
    };
    let st = &spec.strides;
    InputStrides {
        q: twin(st.q, dims.q),
        k: twin(st.k, dims.k),
        v: twin(st.v, dims.v),
        out: twin(st.out, dims.out),
        dout: twin(st.dout, dims.out),
    }
}

/// (batch, seqlen, heads, dim) of each input as the strides address it (varlen: one run).
struct Dims {
    q: (usize, usize, usize, usize),
    k: (usize, usize, usize, usize),
    v: (usize, usize, usize, usize),
    out: (usize, usize, usize, usize),
}

impl Dims {
    fn of(s: &AttentionSpec) -> Dims {
        let b = if s.is_varlen() { 1 } else { s.batch };
        let (hq, hkv, d, dv) = (s.heads_q, s.heads_kv, s.head_dim, s.head_dim_v);
        Dims {
            q: (b, s.seqlen_q, hq, d),
            k: (b, s.seqlen_k, hkv, d),
            v: (b, s.seqlen_k, hkv, dv),
            out: (b, s.seqlen_q, hq, dv),
        }
    }
}

/// `backend` reading every input through `strides` (from [`twin_strides`]): it takes
/// contiguous host inputs of a contiguous spec (what the reference checks) and hands the
/// backend padded copies, NaN between the rows, with the strides set.
pub struct Strided<'a> {
    pub inner: &'a dyn Backend,
    pub strides: InputStrides,
}

impl Strided<'_> {
    fn spec(&self, spec: &AttentionSpec) -> AttentionSpec {
        spec.clone().strides(self.strides)
    }

    /// q, k and v laid out through the twin's strides.
    fn lay_out_qkv(&self, spec: &AttentionSpec, i: ForwardInputs<'_>) -> Result<[Tensor; 3]> {
        let (d, st) = (Dims::of(spec), &self.strides);
        Ok([
            self.lay_out(i.q, d.q, st.q)?,
            self.lay_out(i.k, d.k, st.k)?,
            self.lay_out(i.v, d.v, st.v)?,
        ])
    }

    /// `t` laid out through `st` (unchanged when `st` is `None`).
    fn lay_out(
        &self,
        t: TensorRef<'_>,
        dims: (usize, usize, usize, usize),
        st: Option<Strides>,
    ) -> Result<Tensor> {
        let t = Tensor::from_bytes(t.dtype(), t.as_bytes())?;
        let Some(st) = st else {
            return Ok(t);
        };
        let pad = st.seq.saturating_sub(dims.2 * dims.3);
        let (copy, got) = strided_copy(&t, dims, Layout::Padded(pad));
        if got != st {
            return Err(Error::argument(
                "strides",
                format!("{st:?}"),
                "not a padded layout the canary builds",
            ));
        }
        Ok(copy)
    }
}

impl Backend for Strided<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn device(&self) -> String {
        self.inner.device()
    }

    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.inner.supports(&self.spec(spec))
    }

    fn forward(&self, spec: &AttentionSpec, i: ForwardInputs<'_>) -> Result<Output> {
        let [q, k, v] = self.lay_out_qkv(spec, i)?;
        self.inner
            .forward(&self.spec(spec), ForwardInputs::of(&q, &k, &v))
    }

    fn supports_backward(&self, spec: &AttentionSpec) -> Result<()> {
        self.inner.supports_backward(&self.spec(spec))
    }

    fn backward(&self, spec: &AttentionSpec, i: BackwardInputs<'_>) -> Result<Grads> {
        let (d, st) = (Dims::of(spec), &self.strides);
        let [q, k, v] = self.lay_out_qkv(
            spec,
            ForwardInputs {
                q: i.q,
                k: i.k,
                v: i.v,
            },
        )?;
        let out = self.lay_out(i.out, d.out, st.out)?;
        let dout = self.lay_out(i.dout, d.out, st.dout)?;
        let inputs = BackwardInputs::of((&q, &k, &v), &out, i.lse, &dout);
        self.inner.backward(&self.spec(spec), inputs)
    }

    fn supports_decode(&self, spec: &AttentionSpec) -> Result<()> {
        self.inner.supports_decode(&self.spec(spec))
    }

    fn decode(&self, spec: &AttentionSpec, i: DecodeInputs<'_>) -> Result<Output> {
        // A decode step takes strides for q only.
        let q = self.lay_out(i.q, Dims::of(spec).q, self.strides.q)?;
        let inputs = DecodeInputs { q: q.as_ref(), ..i };
        self.inner.decode(&self.spec(spec), inputs)
    }

    fn kernel_variant(&self, spec: &AttentionSpec, pass: flashattn_core::Pass) -> String {
        self.inner.kernel_variant(&self.spec(spec), pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::compare;
    use crate::canary_problem::small_problem;
    use flashattn_core::testing::decode::{contiguous, spec as decode_spec};
    use flashattn_core::{DType, Pass};

    /// A `[b, h, s, d]` view (candle's transposed layout) of every input of `spec`.
    fn transposed(spec: AttentionSpec) -> AttentionSpec {
        let d = spec.head_dim;
        let st = |s: usize, h: usize| Some(Strides::new(h * s * d, d, s * d));
        let (sq, sk, hq, hkv) = (spec.seqlen_q, spec.seqlen_k, spec.heads_q, spec.heads_kv);
        spec.strides(InputStrides {
            q: st(sq, hq),
            k: st(sk, hkv),
            v: st(sk, hkv),
            out: st(sq, hq),
            dout: st(sq, hq),
        })
    }

    /// q, k, v in rows of `heads * dim + pad` elements (a packed buffer's view).
    fn padded(spec: AttentionSpec, pad: usize) -> AttentionSpec {
        let st = |s: usize, h: usize| {
            let row = h * spec.head_dim + pad;
            Some(Strides::new(s * row, row, spec.head_dim))
        };
        let strides = InputStrides {
            q: st(spec.seqlen_q, spec.heads_q),
            k: st(spec.seqlen_k, spec.heads_kv),
            v: st(spec.seqlen_k, spec.heads_kv),
            ..Default::default()
        };
        spec.strides(strides)
    }

    /// The CUDA backend's forward kernel choice on an H100, without a GPU.
    #[cfg(feature = "cuda")]
    struct H100Model;

    #[cfg(feature = "cuda")]
    impl H100Model {
        fn variant(spec: &AttentionSpec) -> Result<flashattn_cuda::Variant> {
            let h100 = flashattn_cuda::DeviceInfo {
                name: "H100 (model)".into(),
                compute_capability: (9, 0),
                driver_version: 13000,
                sm_count: 132,
                smem_optin: 227 * 1024,
                total_mem: 80 << 30,
            };
            let tiles = flashattn_cuda::ForwardTiles::default();
            flashattn_cuda::forward_candidates(&spec.validate()?, &h100, &tiles)
                .map(|v| v[0])
                .map_err(|e| Error::unsupported("cuda", e))
        }
    }

    #[cfg(feature = "cuda")]
    impl Backend for H100Model {
        fn name(&self) -> &'static str {
            "cuda"
        }
        fn device(&self) -> String {
            "H100 (model)".into()
        }
        fn supports(&self, spec: &AttentionSpec) -> Result<()> {
            H100Model::variant(spec).map(|_| ())
        }
        fn forward(&self, _: &AttentionSpec, _: ForwardInputs<'_>) -> Result<Output> {
            Err(Error::unsupported("cuda", "a model of kernel selection"))
        }
        fn kernel_variant(&self, spec: &AttentionSpec, _: Pass) -> String {
            H100Model::variant(spec).map_or_else(|e| e.to_string(), |v| v.name())
        }
    }

    /// On an H100 a strided call runs mma.sync (strides of multiples of 8 elements) or the
    /// portable kernel (others), never Hopper's TMA kernel: the canary's twin must run the same.
    #[cfg(feature = "cuda")]
    #[test]
    fn the_twin_of_a_strided_call_runs_the_calls_cuda_kernel() {
        let base = |d| AttentionSpec::new(2, 8, 700, 700, d).dtype(DType::Bf16);
        let cases = [
            (base(128), "hopper"),
            (transposed(base(128)).causal(true), "mma"),
            (transposed(base(128).heads_kv(2)), "mma"),
            (padded(base(64), 8), "mma"),
            (padded(base(128), 1).window(30, 0), "generic"),
            (padded(base(40).dtype(DType::F16), 3), "generic"),
            (
                padded(base(128), 16).varlen(vec![0, 300, 700], vec![0, 200, 700]),
                "mma",
            ),
        ];
        for (spec, family) in cases {
            let want = H100Model.kernel_variant(&spec, Pass::Forward);
            assert!(want.starts_with(family), "{spec}: runs {want}");
            let small = small_problem(&H100Model, &spec, Pass::Forward)
                .unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(
                H100Model.kernel_variant(&small, Pass::Forward),
                want,
                "{small}"
            );
            assert_eq!(
                small.strides.is_contiguous(),
                spec.strides.is_contiguous(),
                "{small}"
            );
        }
    }

    /// A backend that reads strided inputs as if they were contiguous (the bug a strided
    /// kernel path can have): its canary on a strided call must fail. A contiguous twin would
    /// pass it, leaving the call's own path unchecked.
    struct StrideBlind(flashattn_cpu::CpuBackend);

    impl Backend for StrideBlind {
        fn name(&self) -> &'static str {
            "stride-blind"
        }
        fn device(&self) -> String {
            "test".into()
        }
        fn supports(&self, spec: &AttentionSpec) -> Result<()> {
            self.0.supports(spec)
        }
        fn forward(&self, spec: &AttentionSpec, i: ForwardInputs<'_>) -> Result<Output> {
            let plain = spec.contiguous();
            let head = |t: TensorRef<'_>, n: Option<usize>| {
                let n = n.unwrap_or(0).min(t.len());
                Tensor::from_f32(t.dtype(), &t.to_f32_vec()[..n])
            };
            let q = head(i.q, plain.q_elems());
            let k = head(i.k, plain.k_elems());
            let v = head(i.v, plain.v_elems());
            self.0.forward(&plain, ForwardInputs::of(&q, &k, &v))
        }
    }

    #[test]
    fn a_backend_that_misreads_strides_fails_the_canary_of_a_strided_call() {
        use crate::canary::{Canary, Verdict};
        let blind = StrideBlind(flashattn_cpu::CpuBackend::new());
        let spec = AttentionSpec::new(2, 4, 33, 33, 40).dtype(DType::Bf16);
        let canary = Canary::new(true, None);
        let plain = canary.check(&blind, &spec, Pass::Forward);
        assert_eq!(plain, Verdict::Passed, "contiguous calls are read right");
        for strided in [transposed(spec.clone()), padded(spec.clone(), 8)] {
            // A fresh canary: verdicts are kept per variant, and the variant is the same.
            let verdict = Canary::new(true, None).check(&blind, &strided, Pass::Forward);
            assert!(
                matches!(verdict, Verdict::Broken(_)),
                "{strided}: {verdict:?}"
            );
        }
    }

    /// The strided twin runs end to end against the reference (on the CPU backend, which
    /// reads strides): forward, backward and a decode step with a strided q.
    #[test]
    fn strided_twins_match_the_reference() {
        let cpu = flashattn_cpu::CpuBackend::new();
        let spec = AttentionSpec::new(1, 4, 33, 17, 40).heads_kv(2);
        let decode = decode_spec(4, 2, 3, 64, contiguous(&[5, 17], 2, 3));
        // q as [b, h, s, d] with 8 elements between the batch entries.
        let decode = decode.strides(InputStrides {
            q: Some(Strides::new(4 * 3 * 64 + 8, 64, 3 * 64)),
            ..Default::default()
        });
        let cases = [
            (transposed(spec.clone().causal(true)), Pass::Forward),
            (padded(spec.clone().dtype(DType::Bf16), 3), Pass::Forward),
            (
                padded(spec.clone(), 8).varlen(vec![0, 9, 33], vec![0, 5, 17]),
                Pass::Forward,
            ),
            (transposed(spec.clone().window(4, 2)), Pass::Backward),
            (decode, Pass::Decode),
        ];
        for (spec, pass) in cases {
            let small = small_problem(&cpu, &spec, pass).unwrap_or_else(|e| panic!("{e}"));
            assert!(!small.strides.is_contiguous(), "{small}");
            let report = compare(&cpu, &small, pass).unwrap_or_else(|e| panic!("{e}"));
            assert!(report.rel_l2 <= small.dtype.tolerance(), "{small}");
        }
    }
}
