//! Checks that host buffers match a spec, and makes random inputs for tests and benchmarks.

use crate::{AttentionSpec, DType, Error, Result, Tensor, TensorRef};
use rand::{Rng, SeedableRng};

/// Validates the spec and that q, k, v have its dtype and element counts.
pub fn validate_inputs(
    spec: &AttentionSpec,
    q: &TensorRef<'_>,
    k: &TensorRef<'_>,
    v: &TensorRef<'_>,
) -> Result<()> {
    spec.validate()?;
    let tokens_q = spec.q_tokens().unwrap_or(0);
    let tokens_k = spec.k_tokens().unwrap_or(0);
    let checks = [
        (
            "q",
            q,
            spec.q_elems(),
            tokens_q,
            spec.heads_q,
            spec.head_dim,
        ),
        (
            "k",
            k,
            spec.k_elems(),
            tokens_k,
            spec.heads_kv,
            spec.head_dim,
        ),
        (
            "v",
            v,
            spec.v_elems(),
            tokens_k,
            spec.heads_kv,
            spec.head_dim_v,
        ),
    ];
    for (name, t, expected, tokens, heads, dim) in checks {
        if t.dtype() != spec.dtype {
            return Err(Error::DTypeMismatch {
                tensor: name,
                expected: spec.dtype,
                actual: t.dtype(),
            });
        }
        let expected = expected.unwrap_or(usize::MAX);
        if t.len() != expected {
            return Err(Error::BufferLength {
                tensor: name,
                expected,
                actual: t.len(),
                shape: format!("{tokens} tokens x {heads} heads x {dim}"),
            });
        }
    }
    Ok(())
}

/// Random q, k, v for `spec`, uniform in [-1, 1) (scaled for fp8 so descales matter), seeded.
pub fn random_inputs(spec: &AttentionSpec, seed: u64) -> (Tensor, Tensor, Tensor) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut gen = |n: usize| -> Tensor {
        let amp = if spec.dtype == DType::Fp8E4m3 {
            4.0
        } else {
            1.0
        };
        let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-amp..amp)).collect();
        Tensor::from_f32(spec.dtype, &vals)
    };
    (
        gen(spec.q_elems().unwrap_or(0)),
        gen(spec.k_elems().unwrap_or(0)),
        gen(spec.v_elems().unwrap_or(0)),
    )
}

/// Relative L2 error `|actual - expected| / |expected|`; infinite if any value is NaN or
/// the lengths differ. An all-zero `expected` compares the absolute norm instead.
pub fn rel_l2_error(actual: &[f32], expected: &[f64]) -> f64 {
    if actual.len() != expected.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&a, &e) in actual.iter().zip(expected) {
        if a.is_nan() || e.is_nan() {
            return f64::INFINITY;
        }
        diff += (a as f64 - e).powi(2);
        norm += e * e;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Largest absolute difference of two LSE vectors; infinite when a row is masked (-inf)
/// in one and not the other, or a value is NaN.
pub fn lse_max_error(actual: &[f32], expected: &[f64]) -> f64 {
    if actual.len() != expected.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (&a, &e) in actual.iter().zip(expected) {
        let a = a as f64;
        if a.is_nan() || e.is_nan() {
            return f64::INFINITY;
        }
        if e.is_infinite() || a.is_infinite() {
            if a != e {
                return f64::INFINITY;
            }
            continue;
        }
        worst = worst.max((a - e).abs());
    }
    worst
}
