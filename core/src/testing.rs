//! Shared test support: every backend's tests run the same cases against the f64 reference.

use crate::{
    lse_max_error, random_inputs, reference_attention, rel_l2_error, AttentionSpec, Backend, DType,
};

/// What one check against the reference found.
#[derive(Clone, Debug)]
pub struct CheckReport {
    pub rel_l2: f64,
    pub lse_max_abs: Option<f64>,
}

/// Runs `spec` on `backend` with fresh random inputs (`seed`) and compares out and LSE with
/// the f64 reference on the same (rounded) inputs. Errors describe the failure.
pub fn check_backend(
    backend: &dyn Backend,
    spec: &AttentionSpec,
    seed: u64,
) -> Result<CheckReport, String> {
    let (q, k, v) = random_inputs(spec, seed);
    let reference = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref())
        .map_err(|e| format!("reference failed on {spec}: {e}"))?;
    let got = backend
        .forward(spec, q.as_ref(), k.as_ref(), v.as_ref())
        .map_err(|e| format!("{} failed on {spec}: {e}", backend.name()))?;
    if got.out.dtype() != spec.dtype.output() {
        return Err(format!(
            "{}: output dtype {} on {spec}, expected {}",
            backend.name(),
            got.out.dtype(),
            spec.dtype.output()
        ));
    }
    let rel_l2 = rel_l2_error(&got.out.to_f32_vec(), &reference.out);
    let tol = spec.dtype.tolerance();
    if rel_l2.is_nan() || rel_l2 > tol {
        return Err(format!(
            "{}: relative L2 error {rel_l2:.3e} > {tol:.0e} on {spec} (seed {seed})",
            backend.name()
        ));
    }
    let lse_max_abs = match (&got.lse, spec.return_lse) {
        (Some(lse), true) => {
            let err = lse_max_error(lse, &reference.lse);
            let bound = spec.dtype.lse_tolerance();
            if err.is_nan() || err > bound {
                return Err(format!(
                    "{}: LSE max abs error {err:.3e} > {bound:.0e} on {spec} (seed {seed})",
                    backend.name()
                ));
            }
            Some(err)
        }
        (None, true) => return Err(format!("{}: LSE missing on {spec}", backend.name())),
        (_, false) => None,
    };
    Ok(CheckReport {
        rel_l2,
        lse_max_abs,
    })
}

/// Whether `FLASHATTN_REQUIRE_BACKENDS` (comma-separated) names `backend`: then a missing
/// backend is a test failure instead of a skip.
pub fn backend_required(backend: &str) -> bool {
    std::env::var("FLASHATTN_REQUIRE_BACKENDS")
        .map(|v| v.split(',').any(|b| b.trim().eq_ignore_ascii_case(backend)))
        .unwrap_or(false)
}

/// The named feature cases every backend must pass, at odd sizes, for `dtype`.
pub fn feature_cases(dtype: DType) -> Vec<(&'static str, AttentionSpec)> {
    let base = |b, h, sq, sk, d| {
        AttentionSpec::new(b, h, sq, sk, d)
            .dtype(dtype)
            .return_lse(true)
    };
    vec![
        ("single row", base(1, 1, 1, 1, 64)),
        ("odd sizes", base(2, 3, 17, 129, 40)),
        ("head_dim 72", base(1, 2, 33, 65, 72)),
        ("head_dim 200", base(1, 1, 19, 47, 200)),
        ("head_dim 256", base(1, 2, 64, 64, 256)),
        ("long keys", base(1, 2, 5, 513, 64)),
        ("causal square", base(2, 2, 129, 129, 64).causal(true)),
        (
            "causal sq>sk (masked rows)",
            base(1, 2, 40, 17, 64).causal(true),
        ),
        ("causal sq<sk", base(1, 2, 17, 200, 128).causal(true)),
        ("window", base(1, 2, 100, 130, 64).window(16, 8)),
        ("window left only", base(1, 1, 65, 65, 32).window(10, -1)),
        (
            "window + causal",
            base(1, 2, 70, 70, 64).window(20, -1).causal(true),
        ),
        ("softcap", base(1, 2, 33, 77, 64).softcap(5.0)),
        (
            "alibi",
            base(2, 4, 31, 31, 64).alibi(vec![0.5, 0.25, 0.125, 0.0625], false),
        ),
        (
            "alibi per batch + causal",
            base(2, 2, 31, 45, 64)
                .causal(true)
                .alibi(vec![0.3, 0.1, 0.2, 0.05], true),
        ),
        ("gqa", base(1, 8, 37, 37, 64).heads_kv(2)),
        (
            "mqa causal",
            base(2, 4, 21, 50, 64).heads_kv(1).causal(true),
        ),
        (
            "head_dim_v differs",
            base(1, 2, 23, 41, 192).head_dim_v(128),
        ),
        ("custom scale", base(1, 1, 9, 9, 16).scale(0.3)),
        (
            "varlen",
            base(1, 4, 45, 70, 64)
                .heads_kv(2)
                .varlen(vec![0, 1, 18, 45], vec![0, 30, 30, 70])
                .causal(true),
        ),
        (
            "varlen window",
            base(1, 2, 60, 60, 64)
                .varlen(vec![0, 25, 60], vec![0, 25, 60])
                .window(5, 5),
        ),
    ]
}
