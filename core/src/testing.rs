//! Shared test support: every backend's tests run the same cases against the f64 reference
//! (forward, backward, decode), skip a missing backend with a printed reason (or fail where
//! `FLASHATTN_REQUIRE_BACKENDS` names it), and draw random specs from one proptest strategy
//! (feature `proptest`).

pub mod decode;
pub mod nan;
#[cfg(feature = "proptest")]
pub mod strategy;
pub mod strided;

use crate::{
    lse_max_error, random_inputs, random_tensor, reference_attention, reference_backward,
    rel_l2_error, AttentionSpec, Backend, BackwardInputs, DType, ForwardInputs, Result as FaResult,
    Tensor,
};
use rand::SeedableRng;

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
        .forward(spec, ForwardInputs::of(&q, &k, &v))
        .map_err(|e| format!("{} failed on {spec}: {e}", backend.name()))?;
    compare_output(
        backend.name(),
        spec,
        seed,
        &got,
        &reference.out,
        &reference.lse,
    )
}

/// Compares a backend's out (dtype, relative L2) and LSE (max abs) with the reference's.
fn compare_output(
    name: &str,
    spec: &AttentionSpec,
    seed: u64,
    got: &crate::Output,
    out: &[f64],
    lse: &[f64],
) -> Result<CheckReport, String> {
    if got.out.dtype() != spec.dtype.output() {
        return Err(format!(
            "{name}: output dtype {} on {spec}, expected {}",
            got.out.dtype(),
            spec.dtype.output()
        ));
    }
    let rel_l2 = rel_l2_error(&got.out.to_f32_vec(), out);
    let tol = spec.dtype.tolerance();
    if rel_l2.is_nan() || rel_l2 > tol {
        return Err(format!(
            "{name}: relative L2 error {rel_l2:.3e} > {tol:.0e} on {spec} (seed {seed})"
        ));
    }
    let lse_max_abs = match (&got.lse, spec.return_lse) {
        (Some(got_lse), true) => {
            let err = lse_max_error(got_lse, lse);
            let bound = spec.dtype.lse_tolerance();
            if err.is_nan() || err > bound {
                return Err(format!(
                    "{name}: LSE max abs error {err:.3e} > {bound:.0e} on {spec} (seed {seed})"
                ));
            }
            Some(err)
        }
        (None, true) => return Err(format!("{name}: LSE missing on {spec}")),
        (_, false) => None,
    };
    Ok(CheckReport {
        rel_l2,
        lse_max_abs,
    })
}

/// Runs every named case (seeds `seed`, `seed + 1`, ...) and returns one line per failure.
pub fn check_cases<S: AsRef<str>>(
    backend: &dyn Backend,
    cases: &[(S, AttentionSpec)],
    seed: u64,
    check: fn(&dyn Backend, &AttentionSpec, u64) -> Result<CheckReport, String>,
) -> Vec<String> {
    cases
        .iter()
        .enumerate()
        .filter_map(|(i, (name, spec))| {
            check(backend, spec, seed + i as u64)
                .err()
                .map(|e| format!("{}: {e}", name.as_ref()))
        })
        .collect()
}

/// Relative L2 bound of the backward's gradients: the forward's, doubled (dq and dk sum over
/// every key / query of a block, in f32).
pub fn backward_tolerance(dtype: DType) -> f64 {
    2.0 * dtype.tolerance()
}

/// Runs the forward (for out and LSE) and the backward of `spec` on `backend` with fresh
/// random q, k, v, dout (`seed`) and compares dq, dk, dv with the f64 reference backward.
/// The report's `rel_l2` is the worst of the three.
pub fn check_backward(
    backend: &dyn Backend,
    spec: &AttentionSpec,
    seed: u64,
) -> Result<CheckReport, String> {
    let spec = &spec.clone().return_lse(true);
    let name = backend.name();
    let case = BackwardCase::new(backend, spec, seed)?;
    let inputs = case.inputs();
    let got = backend
        .backward(spec, inputs)
        .map_err(|e| format!("{name} backward failed on {spec}: {e}"))?;
    let (q, k, v, dout) = (
        case.q.as_ref(),
        case.k.as_ref(),
        case.v.as_ref(),
        case.dout.as_ref(),
    );
    let want = reference_backward(spec, q, k, v, dout)
        .map_err(|e| format!("reference backward failed on {spec}: {e}"))?;
    let tol = backward_tolerance(spec.dtype);
    let mut worst = 0.0f64;
    for (which, g, w) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        if g.dtype() != spec.dtype {
            return Err(format!(
                "{name}: {which} is {} on {spec}, expected {}",
                g.dtype(),
                spec.dtype
            ));
        }
        let err = grad_error(&g.to_f32_vec(), w);
        if err.is_nan() || err > tol {
            return Err(format!(
                "{name}: {which} relative L2 error {err:.3e} > {tol:.0e} on {spec} (seed {seed})"
            ));
        }
        worst = worst.max(err);
    }
    Ok(CheckReport {
        rel_l2: worst,
        lse_max_abs: None,
    })
}

/// A gradient's error against the reference: relative L2, or the per-element RMS where the
/// reference is all zero. That happens when every row sees one key (dS = 0, so dq = dk = 0),
/// and there is no scale to be relative to: the low-precision tiles leave rounding noise of
/// |dP| * eps there (~1e-4 per element for f16 at d 64), while an absolute L2 norm would
/// grow with the element count alone. A wrong gradient of O(1) inputs still fails either way.
fn grad_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() == want.len() && !want.is_empty() && want.iter().all(|&w| w == 0.0) {
        let sum: f64 = got.iter().map(|&g| (g as f64).powi(2)).sum();
        (sum / got.len() as f64).sqrt()
    } else {
        rel_l2_error(got, want)
    }
}

/// A backward problem: random q, k, v and dout of `spec` (`seed`), and `backend`'s forward out
/// and LSE of them (the forward runs with `return_lse`).
pub struct BackwardCase {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub out: Tensor,
    pub lse: Vec<f32>,
    pub dout: Tensor,
}

impl BackwardCase {
    pub fn new(backend: &dyn Backend, spec: &AttentionSpec, seed: u64) -> Result<Self, String> {
        let name = backend.name();
        let spec = &spec.clone().return_lse(true);
        let (q, k, v) = random_inputs(spec, seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        let dout = random_tensor(&mut rng, spec.dtype.output(), spec.out_elems().unwrap_or(0));
        let fwd = backend
            .forward(spec, ForwardInputs::of(&q, &k, &v))
            .map_err(|e| format!("{name} forward failed on {spec}: {e}"))?;
        let lse = fwd
            .lse
            .ok_or_else(|| format!("{name}: forward gave no LSE on {spec}"))?;
        Ok(BackwardCase {
            q,
            k,
            v,
            out: fwd.out,
            lse,
            dout,
        })
    }

    pub fn inputs(&self) -> BackwardInputs<'_> {
        BackwardInputs::of(
            (&self.q, &self.k, &self.v),
            &self.out,
            &self.lse,
            &self.dout,
        )
    }
}

/// Runs one decode step of `spec` (which has a KV cache) on `backend` with random q, caches
/// and new rows (`seed`) and compares out, LSE and both caches after the append with the f64
/// reference. Rows the call must not write are compared exactly.
pub fn check_decode(
    backend: &dyn Backend,
    spec: &AttentionSpec,
    seed: u64,
) -> Result<CheckReport, String> {
    let name = backend.name();
    let data = decode::DecodeData::random(spec, seed);
    let want = data
        .reference(spec)
        .map_err(|e| format!("reference decode failed on {spec}: {e}"))?;
    let (mut kc, mut vc) = (data.k_cache.clone(), data.v_cache.clone());
    let got = backend
        .decode(spec, data.inputs((&mut kc, &mut vc)))
        .map_err(|e| format!("{name} decode failed on {spec}: {e}"))?;
    for (which, after, before, expected) in [
        ("k cache", &kc, &data.k_cache, &want.k_cache),
        ("v cache", &vc, &data.v_cache, &want.v_cache),
    ] {
        cache_matches(after, before, expected, spec.dtype).map_err(|e| {
            format!("{name}: {which} after the append: {e} on {spec} (seed {seed})")
        })?;
    }
    compare_output(name, spec, seed, &got, &want.out, &want.lse)
}

/// Each cache element after the append: exactly as before where the reference left it
/// unchanged, else within the dtype's rounding of the expected value.
fn cache_matches(
    after: &Tensor,
    before: &Tensor,
    expected: &[f64],
    dtype: DType,
) -> Result<(), String> {
    let (a, b) = (after.to_f32_vec(), before.to_f32_vec());
    for (i, ((&x, &old), &e)) in a.iter().zip(&b).zip(expected).enumerate() {
        let unchanged = old as f64 == e;
        let ok = if unchanged {
            x.to_bits() == old.to_bits()
        } else {
            (x as f64 - e).abs() <= dtype.tolerance() * e.abs().max(1.0)
        };
        if !ok {
            return Err(format!("element {i} is {x}, expected {e}"));
        }
    }
    Ok(())
}

/// A backend from `open`, or `None` after printing why it is skipped; a failure instead when
/// `FLASHATTN_REQUIRE_BACKENDS` names `name`.
pub fn backend_or_skip<B>(name: &str, open: impl FnOnce() -> FaResult<B>) -> Option<B> {
    match open() {
        Ok(b) => Some(b),
        Err(e) if backend_required(name) => {
            panic!("backend {name} is required (FLASHATTN_REQUIRE_BACKENDS) but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP {name}: {e}");
            None
        }
    }
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
