//! What the page reports about one run: the check against the f64 reference, speed and memory.

use flashattn_core::{
    lse_max_error, reference_attention, rel_l2_error, AttentionSpec, CheckedSpec, Output, TensorRef,
};
use serde::Serialize;

/// Above this many FLOPs the f64 reference (single-threaded wasm, a few hundred MFLOP/s)
/// would keep the page busy for seconds, so `CheckMode::Auto` skips it.
pub const REFERENCE_MAX_FLOPS: f64 = 3.0e8;

/// The comparison of the kernel's output and LSE with the f64 reference on the same inputs.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CheckResult {
    /// Why the check did not run; `None` when it ran.
    pub skipped: Option<String>,
    pub rel_l2: Option<f64>,
    pub lse_max_abs: Option<f64>,
    /// Bound on `rel_l2` for this dtype.
    pub tolerance: f64,
    /// Bound on `lse_max_abs` (as `core::testing::check_backend` uses).
    pub lse_bound: f64,
    /// `Some(true)` when both errors are within bounds (NaN never passes).
    pub passed: Option<bool>,
    /// How long the reference took in the page.
    pub reference_ms: Option<f64>,
}

impl CheckResult {
    pub fn skipped(spec: &AttentionSpec, reason: impl Into<String>) -> Self {
        CheckResult {
            skipped: Some(reason.into()),
            tolerance: spec.dtype.tolerance(),
            lse_bound: lse_bound(spec),
            ..Default::default()
        }
    }
}

fn lse_bound(spec: &AttentionSpec) -> f64 {
    spec.dtype.lse_tolerance()
}

/// Compares `got` with the f64 reference on q, k, v. `now_ms` is the page's clock.
pub fn check_against_reference(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
    got: &Output,
    now_ms: &dyn Fn() -> f64,
) -> CheckResult {
    let start = now_ms();
    let reference = match reference_attention(spec, q, k, v) {
        Ok(r) => r,
        Err(e) => return CheckResult::skipped(spec, format!("the reference failed: {e}")),
    };
    let reference_ms = now_ms() - start;
    let rel_l2 = if got.out.dtype() == spec.dtype.output() {
        rel_l2_error(&got.out.to_f32_vec(), &reference.out)
    } else {
        f64::INFINITY // wrong output dtype never passes
    };
    let lse_max_abs = match &got.lse {
        Some(lse) => lse_max_error(lse, &reference.lse),
        None => f64::INFINITY,
    };
    let (tolerance, bound) = (spec.dtype.tolerance(), lse_bound(spec));
    CheckResult {
        skipped: None,
        rel_l2: Some(rel_l2),
        lse_max_abs: Some(lse_max_abs),
        tolerance,
        lse_bound: bound,
        passed: Some(rel_l2 <= tolerance && lse_max_abs <= bound),
        reference_ms: Some(reference_ms),
    }
}

/// Bytes of the problem's buffers, and what naive attention would add.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MemoryReport {
    /// q + k + v.
    pub inputs_bytes: u64,
    /// out + lse.
    pub outputs_bytes: u64,
    /// The f32 score matrix S (batch x heads x seqlen_q x seqlen_k) that naive attention
    /// materialises and FlashAttention never does: exact arithmetic on the shape.
    pub score_matrix_bytes: u64,
    /// Device memory beyond inputs and outputs, as the backend measured it (None: not measured).
    pub flash_extra_bytes: Option<u64>,
    pub naive_extra_bytes: Option<u64>,
}

impl MemoryReport {
    pub fn new(c: &CheckedSpec<'_>) -> Self {
        let size = c.dtype.size_bytes() as u64;
        let out_size = c.dtype.output().size_bytes() as u64;
        let s = &c.sizes;
        let spec = c.spec;
        MemoryReport {
            inputs_bytes: (s.q + s.k + s.v) as u64 * size,
            outputs_bytes: s.out as u64 * out_size + s.lse as u64 * 4,
            score_matrix_bytes: (spec.batch * spec.heads_q) as u64
                * spec.seqlen_q as u64
                * spec.seqlen_k as u64
                * 4,
            flash_extra_bytes: None,
            naive_extra_bytes: None,
        }
    }
}

/// Median of run times in ms; `None` for no runs or a NaN.
pub fn median_ms(times: &[f64]) -> Option<f64> {
    if times.is_empty() || times.iter().any(|t| t.is_nan()) {
        return None;
    }
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let m = t.len() / 2;
    Some(if t.len() % 2 == 1 {
        t[m]
    } else {
        (t[m - 1] + t[m]) / 2.0
    })
}

/// TFLOP/s of `spec` (visible pairs only, so causal and window count what they compute) in `ms`.
pub fn tflops(spec: &AttentionSpec, ms: f64) -> f64 {
    if ms > 0.0 {
        spec.flops() / (ms * 1e-3) / 1e12
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn_core::{random_inputs, DType, Tensor};

    fn exact_output(spec: &AttentionSpec, seed: u64) -> (Tensor, Tensor, Tensor, Output) {
        let (q, k, v) = random_inputs(spec, seed);
        let r = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
        let out: Vec<f32> = r.out.iter().map(|&x| x as f32).collect();
        let lse = r.lse.iter().map(|&x| x as f32).collect();
        let got = Output {
            out: Tensor::from_f32(spec.dtype.output(), &out),
            lse: Some(lse),
        };
        (q, k, v, got)
    }

    #[test]
    fn the_reference_itself_passes_and_a_perturbation_fails() {
        let spec = AttentionSpec::new(1, 2, 20, 30, 16)
            .causal(true)
            .return_lse(true);
        let (q, k, v, mut got) = exact_output(&spec, 3);
        let clock = || 0.0;
        let ok = check_against_reference(&spec, q.as_ref(), k.as_ref(), v.as_ref(), &got, &clock);
        assert_eq!(ok.passed, Some(true), "{ok:?}");
        assert!(ok.rel_l2.unwrap() < 1e-6);

        if let Tensor::F32(o) = &mut got.out {
            o[5] += 0.5;
        }
        let bad = check_against_reference(&spec, q.as_ref(), k.as_ref(), v.as_ref(), &got, &clock);
        assert_eq!(bad.passed, Some(false), "{bad:?}");

        let (_, _, _, mut nan) = exact_output(&spec, 3);
        nan.lse.as_mut().unwrap()[0] = f32::NAN;
        let bad = check_against_reference(&spec, q.as_ref(), k.as_ref(), v.as_ref(), &nan, &clock);
        assert_eq!(bad.passed, Some(false));
        nan.lse = None;
        let bad = check_against_reference(&spec, q.as_ref(), k.as_ref(), v.as_ref(), &nan, &clock);
        assert_eq!(bad.passed, Some(false));
    }

    #[test]
    fn wrong_output_dtype_fails() {
        let spec = AttentionSpec::new(1, 1, 4, 4, 8)
            .dtype(DType::F16)
            .return_lse(true);
        let (q, k, v, mut got) = exact_output(&spec, 1);
        got.out = Tensor::from_f32(DType::F32, &got.out.to_f32_vec());
        let r = check_against_reference(&spec, q.as_ref(), k.as_ref(), v.as_ref(), &got, &|| 0.0);
        assert_eq!(r.passed, Some(false));
    }

    #[test]
    fn memory_and_speed_arithmetic() {
        let spec = AttentionSpec::new(1, 4, 256, 256, 64)
            .dtype(DType::F16)
            .return_lse(true);
        let m = MemoryReport::new(&spec.validate().unwrap());
        assert_eq!(m.inputs_bytes, 3 * 256 * 4 * 64 * 2);
        assert_eq!(m.outputs_bytes, 256 * 4 * 64 * 2 + 4 * 256 * 4);
        assert_eq!(m.score_matrix_bytes, 4 * 256 * 256 * 4);
        // 4 heads * 256^2 pairs * 2 * (64 + 64) flops in 1 ms
        assert!((tflops(&spec, 1.0) - 4.0 * 65536.0 * 256.0 / 1e9).abs() < 1e-9);
        assert_eq!(tflops(&spec, 0.0), 0.0);
        assert_eq!(median_ms(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median_ms(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median_ms(&[]), None);
        assert_eq!(median_ms(&[1.0, f64::NAN]), None);
    }
}
