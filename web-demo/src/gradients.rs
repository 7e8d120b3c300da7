//! The page's "gradients" check: the backward pass's dq, dk, dv against the f64 reference
//! backward (`flashattn_core::reference_backward`, compiled to wasm) on the same inputs.

use crate::report::REFERENCE_MAX_FLOPS;
use flashattn_core::testing::backward_tolerance;
use flashattn_core::{
    random_tensor, reference_backward, rel_l2_error, AttentionSpec, CheckedSpec, Grads, Tensor,
    TensorRef,
};
use rand::SeedableRng;
use serde::Serialize;

/// Above this many backward FLOPs (2.5 x the forward's) `CheckMode::Auto` skips the check:
/// the reference backward costs the page about what 2.5 forward references do.
pub const REFERENCE_MAX_BACKWARD_FLOPS: f64 = 2.5 * REFERENCE_MAX_FLOPS;

/// The comparison of dq, dk, dv with the reference backward.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GradientCheck {
    /// Why the check did not run; `None` when it ran.
    pub skipped: Option<String>,
    pub dq_rel_l2: Option<f64>,
    pub dk_rel_l2: Option<f64>,
    pub dv_rel_l2: Option<f64>,
    /// Bound on each relative L2 error for this dtype.
    pub tolerance: f64,
    /// `Some(true)` when all three are within the bound (NaN never passes).
    pub passed: Option<bool>,
    pub reference_ms: Option<f64>,
    /// Upload, backward pass and readback on the host clock.
    pub backward_ms: Option<f64>,
}

impl GradientCheck {
    pub fn skipped(spec: &AttentionSpec, reason: impl Into<String>) -> Self {
        GradientCheck {
            skipped: Some(reason.into()),
            tolerance: backward_tolerance(spec.dtype),
            ..Default::default()
        }
    }
}

/// The loss gradient `dout` of the check: uniform in [-1, 1), seeded, in the output dtype.
pub fn random_dout(c: &CheckedSpec<'_>, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9a7d);
    random_tensor(&mut rng, c.dtype.output(), c.sizes.out)
}

/// Compares `got` with the reference backward of `sum(out * dout)` on q, k, v.
pub fn check_gradients(
    spec: &AttentionSpec,
    (q, k, v): (TensorRef<'_>, TensorRef<'_>, TensorRef<'_>),
    dout: TensorRef<'_>,
    got: &Grads,
    now_ms: &dyn Fn() -> f64,
) -> GradientCheck {
    let start = now_ms();
    let want = match reference_backward(spec, q, k, v, dout) {
        Ok(w) => w,
        Err(e) => return GradientCheck::skipped(spec, format!("the reference failed: {e}")),
    };
    let reference_ms = now_ms() - start;
    let err = |g: &Tensor, w: &[f64]| {
        if g.dtype() == spec.dtype {
            rel_l2_error(&g.to_f32_vec(), w)
        } else {
            f64::INFINITY // a wrong dtype never passes
        }
    };
    let errs = [
        err(&got.dq, &want.dq),
        err(&got.dk, &want.dk),
        err(&got.dv, &want.dv),
    ];
    let tolerance = backward_tolerance(spec.dtype);
    GradientCheck {
        skipped: None,
        dq_rel_l2: Some(errs[0]),
        dk_rel_l2: Some(errs[1]),
        dv_rel_l2: Some(errs[2]),
        tolerance,
        passed: Some(errs.iter().all(|&e| e <= tolerance)),
        reference_ms: Some(reference_ms),
        backward_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn_core::{random_inputs, DType};

    fn exact_grads(spec: &AttentionSpec, seed: u64) -> (Tensor, Tensor, Tensor, Tensor, Grads) {
        let (q, k, v) = random_inputs(spec, seed);
        let dout = random_dout(&spec.validate().unwrap(), seed);
        let r =
            reference_backward(spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
        let t = |x: &[f64]| {
            Tensor::from_f32(spec.dtype, &x.iter().map(|&y| y as f32).collect::<Vec<_>>())
        };
        let grads = Grads {
            dq: t(&r.dq),
            dk: t(&r.dk),
            dv: t(&r.dv),
        };
        (q, k, v, dout, grads)
    }

    #[test]
    fn the_reference_passes_and_a_perturbation_or_nan_fails() {
        let spec = AttentionSpec::new(1, 2, 20, 30, 16).causal(true);
        let (q, k, v, dout, mut got) = exact_grads(&spec, 5);
        let qkv = (q.as_ref(), k.as_ref(), v.as_ref());
        let clock = || 0.0;
        let ok = check_gradients(&spec, qkv, dout.as_ref(), &got, &clock);
        assert_eq!(ok.passed, Some(true), "{ok:?}");
        assert!(ok.dq_rel_l2.unwrap() < 1e-6 && ok.dv_rel_l2.unwrap() < 1e-6);
        if let Tensor::F32(x) = &mut got.dk {
            x[3] += 0.5;
        }
        let bad = check_gradients(&spec, qkv, dout.as_ref(), &got, &clock);
        assert_eq!(bad.passed, Some(false), "{bad:?}");
        let (_, _, _, _, mut nan) = exact_grads(&spec, 5);
        if let Tensor::F32(x) = &mut nan.dv {
            x[0] = f32::NAN;
        }
        let bad = check_gradients(&spec, qkv, dout.as_ref(), &nan, &clock);
        assert_eq!(bad.passed, Some(false));
    }

    #[test]
    fn bf16_gradients_use_the_bf16_bound() {
        let spec = AttentionSpec::new(1, 1, 9, 9, 8).dtype(DType::Bf16);
        let (q, k, v, dout, got) = exact_grads(&spec, 2);
        let r = check_gradients(
            &spec,
            (q.as_ref(), k.as_ref(), v.as_ref()),
            dout.as_ref(),
            &got,
            &|| 0.0,
        );
        assert_eq!(r.tolerance, backward_tolerance(DType::Bf16));
        assert_eq!(r.passed, Some(true), "{r:?}");
        assert!(GradientCheck::skipped(&spec, "off").passed.is_none());
    }
}
