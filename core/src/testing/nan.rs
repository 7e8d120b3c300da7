//! NaN in, NaN out, checked against the f64 reference for the backward pass: a NaN in one key
//! reaches exactly the gradients of the head group that sees it, and no other head or batch
//! entry (a shared accumulator or a reused buffer would leak it there).

use super::backward_tolerance;
use crate::{
    random_inputs, random_tensor, reference_backward, rel_l2_error, AttentionSpec, Backend,
    BackwardInputs, DType, ForwardInputs, Tensor,
};
use rand::SeedableRng;

/// NaN exactly where `want` has NaN, and the same infinity where it has one (a fully masked
/// row's LSE is -inf); the relative L2 error of the finite elements at most `tol`. `Err` names
/// the first element that differs.
pub fn same_nans_and_close(got: &[f32], want: &[f64], tol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{} elements, the reference has {}",
            got.len(),
            want.len()
        ));
    }
    let mut finite = (Vec::new(), Vec::new());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() != g.is_nan() || (w.is_infinite() && g as f64 != w) {
            return Err(format!("element {i}: got {g}, the reference has {w}"));
        }
        if w.is_finite() {
            finite.0.push(g);
            finite.1.push(w);
        }
    }
    let err = rel_l2_error(&finite.0, &finite.1);
    if err.is_nan() || err > tol {
        return Err(format!(
            "finite elements: relative L2 error {err:.3e} > {tol:.0e}"
        ));
    }
    Ok(())
}

/// Plants a NaN in one key element of the last batch entry's KV head 0 (no mask, so every
/// query row of that head group sees it), runs `backend`'s forward and backward, and compares
/// dq, dk, dv with the reference: NaN in exactly that head group's gradients, the other
/// heads and batch entries within the backward tolerance.
pub fn backward_nan_stays_in_its_head_group(
    backend: &dyn Backend,
    dtype: DType,
) -> Result<(), String> {
    let name = backend.name();
    let spec = AttentionSpec::new(2, 4, 17, 40, 40)
        .heads_kv(2)
        .dtype(dtype)
        .return_lse(true);
    let (q, k, v) = random_inputs(&spec, 13);
    let mut kv = k.to_f32_vec();
    let (token, x) = (spec.seqlen_k + 21, 7); // batch 1, key 21, kv head 0
    kv[token * spec.heads_kv * spec.head_dim + x] = f32::NAN;
    let k = Tensor::from_f32(dtype, &kv);
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let dout = random_tensor(&mut rng, dtype, spec.out_elems().unwrap_or(0));
    let fwd = backend
        .forward(&spec, ForwardInputs::of(&q, &k, &v))
        .map_err(|e| format!("{name} forward on {spec}: {e}"))?;
    let lse = fwd.lse.ok_or_else(|| format!("{name}: no LSE on {spec}"))?;
    let inputs = BackwardInputs::of((&q, &k, &v), &fwd.out, &lse, &dout);
    let got = backend
        .backward(&spec, inputs)
        .map_err(|e| format!("{name} backward on {spec}: {e}"))?;
    let want = reference_backward(&spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref())
        .map_err(|e| format!("reference backward on {spec}: {e}"))?;
    if !want.dq.iter().any(|x| x.is_nan()) || !want.dq.iter().any(|x| x.is_finite()) {
        return Err(format!("{spec}: the case needs NaN and finite rows"));
    }
    for (which, g, w) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        same_nans_and_close(&g.to_f32_vec(), w, backward_tolerance(dtype))
            .map_err(|e| format!("{name}: {which} on {spec} with a NaN key: {e}"))?;
    }
    Ok(())
}
