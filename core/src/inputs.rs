//! Checks that host buffers match a spec, and makes random inputs for tests and benchmarks.

use crate::strides::check_view;
use crate::{
    AttentionSpec, BackwardInputs, CheckedSpec, DType, DecodeInputs, Error, Result, Strides,
    Tensor, TensorRef,
};
use rand::{Rng, SeedableRng};

/// Validates the spec of a forward pass and that q, k, v have its dtype and element counts.
pub fn validate_inputs<'s>(
    spec: &'s AttentionSpec,
    q: &TensorRef<'_>,
    k: &TensorRef<'_>,
    v: &TensorRef<'_>,
) -> Result<CheckedSpec<'s>> {
    let c = spec.validate()?;
    if spec.kv_cache.is_some() {
        return Err(Error::invalid(
            "kv_cache",
            "set",
            "a spec with a KV cache runs through decode, not forward",
        ));
    }
    check_qkv(&c, q, k, v)?;
    Ok(c)
}

/// Validates the spec of a backward pass and every input buffer.
pub fn validate_backward_inputs<'s>(
    spec: &'s AttentionSpec,
    t: &BackwardInputs<'_>,
) -> Result<CheckedSpec<'s>> {
    let c = validate_inputs(spec, &t.q, &t.k, &t.v)?;
    if spec.dtype == DType::Fp8E4m3 {
        return Err(Error::invalid(
            "dtype",
            spec.dtype,
            "the backward pass takes f32, f16 or bf16",
        ));
    }
    let (od, view) = (spec.dtype.output(), q_view(&c, c.head_dim_v));
    let st = &spec.strides;
    check_tensor("out", &t.out, od, c.sizes.out, view, st.out)?;
    check_tensor("dout", &t.dout, od, c.sizes.out, view, st.dout)?;
    if t.lse.len() != c.sizes.lse {
        return Err(Error::BufferLength {
            tensor: "lse",
            expected: c.sizes.lse,
            actual: t.lse.len(),
            shape: "the forward's LSE layout".into(),
        });
    }
    Ok(c)
}

/// Validates the spec of a decode call (it must have a KV cache) and every input buffer.
pub fn validate_decode_inputs<'s>(
    spec: &'s AttentionSpec,
    t: &DecodeInputs<'_>,
) -> Result<CheckedSpec<'s>> {
    let (kc, vc) = (t.k_cache.as_ref(), t.v_cache.as_ref());
    check_decode(spec, &t.q, &kc, &vc, t.k_new.as_ref(), t.v_new.as_ref())
}

/// Validates the spec of a decode step against caches the backend owns (a KV cache handle):
/// q and the new rows, everything but the cache buffers.
pub fn validate_decode_step<'s>(
    spec: &'s AttentionSpec,
    q: &TensorRef<'_>,
    k_new: Option<&TensorRef<'_>>,
    v_new: Option<&TensorRef<'_>>,
) -> Result<CheckedSpec<'s>> {
    let c = decode_spec(spec)?;
    let view = q_view(&c, c.head_dim);
    check_tensor("q", q, c.dtype, c.sizes.q, view, spec.strides.q)?;
    check_new_rows(&c, k_new, v_new)?;
    Ok(c)
}

pub(crate) fn check_decode<'s>(
    spec: &'s AttentionSpec,
    q: &TensorRef<'_>,
    k_cache: &TensorRef<'_>,
    v_cache: &TensorRef<'_>,
    k_new: Option<&TensorRef<'_>>,
    v_new: Option<&TensorRef<'_>>,
) -> Result<CheckedSpec<'s>> {
    let c = decode_spec(spec)?;
    check_qkv(&c, q, k_cache, v_cache)?;
    check_new_rows(&c, k_new, v_new)?;
    Ok(c)
}

/// The checked spec of a decode step: it has a cache, and strides a decode takes.
fn decode_spec(spec: &AttentionSpec) -> Result<CheckedSpec<'_>> {
    let c = spec.validate()?;
    cache_of(&c)?;
    decode_strides(&c)?;
    Ok(c)
}

fn cache_of<'s>(c: &CheckedSpec<'s>) -> Result<&'s crate::KvCache> {
    c.spec.kv_cache.as_ref().ok_or_else(|| {
        Error::invalid(
            "kv_cache",
            "none",
            "a decode call needs the KV cache's arguments",
        )
    })
}

/// The new rows match the cache's `seqlen_new`.
fn check_new_rows(
    c: &CheckedSpec<'_>,
    k_new: Option<&TensorRef<'_>>,
    v_new: Option<&TensorRef<'_>>,
) -> Result<()> {
    let cache = cache_of(c)?;
    for (name, new, n, dim) in [
        ("k_new", k_new, c.sizes.k_new, c.head_dim),
        ("v_new", v_new, c.sizes.v_new, c.head_dim_v),
    ] {
        match new {
            Some(x) => {
                let view = View::new(c.batch, cache.seqlen_new, c.heads_kv, dim);
                check_tensor(name, x, c.dtype, n, view, None)?
            }
            None if n > 0 => {
                return Err(Error::argument(
                    name,
                    "none",
                    format!(
                        "seqlen_new is {} but no new rows were given",
                        cache.seqlen_new
                    ),
                ))
            }
            None => {}
        }
    }
    Ok(())
}

/// A decode step reads its caches in their own layout: only q may be strided.
fn decode_strides(c: &CheckedSpec<'_>) -> Result<()> {
    let st = &c.strides;
    if st.k.is_some() || st.v.is_some() || st.out.is_some() || st.dout.is_some() {
        return Err(Error::invalid(
            "strides",
            format!("{st:?}"),
            "a decode step takes strides for q only",
        ));
    }
    Ok(())
}

fn check_qkv(
    c: &CheckedSpec<'_>,
    q: &TensorRef<'_>,
    k: &TensorRef<'_>,
    v: &TensorRef<'_>,
) -> Result<()> {
    let (dt, s, st) = (c.dtype, &c.sizes, &c.strides);
    check_tensor("q", q, dt, s.q, q_view(c, c.head_dim), st.q)?;
    check_tensor("k", k, dt, s.k, k_view(c, c.head_dim), st.k)?;
    check_tensor("v", v, dt, s.v, k_view(c, c.head_dim_v), st.v)
}

/// The shape of an input as its strides address it: `batch` sequences of `seqlen` rows
/// (varlen and cache buffers: one run of all their rows) of `heads x dim`.
#[derive(Clone, Copy)]
struct View {
    batch: usize,
    seqlen: usize,
    heads: usize,
    dim: usize,
}

impl View {
    fn new(batch: usize, seqlen: usize, heads: usize, dim: usize) -> View {
        View {
            batch,
            seqlen,
            heads,
            dim,
        }
    }
}

fn q_view(c: &CheckedSpec<'_>, dim: usize) -> View {
    match c.is_varlen() {
        true => View::new(1, c.sizes.q_tokens, c.heads_q, dim),
        false => View::new(c.batch, c.seqlen_q, c.heads_q, dim),
    }
}

fn k_view(c: &CheckedSpec<'_>, dim: usize) -> View {
    match c.is_varlen() || c.kv_cache.is_some() {
        true => View::new(1, c.sizes.k_tokens, c.heads_kv, dim),
        false => View::new(c.batch, c.seqlen_k, c.heads_kv, dim),
    }
}

/// The dtype, and the length (contiguous) or the reach of the strides (strided).
fn check_tensor(
    name: &'static str,
    t: &TensorRef<'_>,
    dtype: DType,
    expected: usize,
    view: View,
    strides: Option<Strides>,
) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            tensor: name,
            expected: dtype,
            actual: t.dtype(),
        });
    }
    let geometry = (view.batch, view.seqlen, view.heads, view.dim);
    match strides {
        Some(st) => check_view(strides_name(name), &st, geometry, t.len()),
        None if t.len() != expected => Err(Error::BufferLength {
            tensor: name,
            expected,
            actual: t.len(),
            shape: format!(
                "{} tokens x {} heads x {}",
                view.batch * view.seqlen,
                view.heads,
                view.dim
            ),
        }),
        None => Ok(()),
    }
}

fn strides_name(tensor: &str) -> &'static str {
    match tensor {
        "q" => "strides.q",
        "k" => "strides.k",
        "v" => "strides.v",
        "out" => "strides.out",
        "dout" => "strides.dout",
        _ => "strides",
    }
}

/// Random q, k, v for `spec`, uniform in [-1, 1) (scaled for fp8 so descales matter), seeded.
/// With a KV cache, k and v fill the whole cache buffers.
pub fn random_inputs(spec: &AttentionSpec, seed: u64) -> (Tensor, Tensor, Tensor) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = |x: Option<usize>| x.unwrap_or(0);
    (
        random_tensor(&mut rng, spec.dtype, n(spec.q_elems())),
        random_tensor(&mut rng, spec.dtype, n(spec.k_elems())),
        random_tensor(&mut rng, spec.dtype, n(spec.v_elems())),
    )
}

/// `n` random values of `dtype`, uniform in [-1, 1) (±4 for fp8), from `rng`.
pub fn random_tensor(rng: &mut impl Rng, dtype: DType, n: usize) -> Tensor {
    let amp = if dtype == DType::Fp8E4m3 { 4.0 } else { 1.0 };
    let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-amp..amp)).collect();
    Tensor::from_f32(dtype, &vals)
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
