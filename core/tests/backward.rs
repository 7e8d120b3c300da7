//! The f64 reference backward against central finite differences of the f64 forward.

mod common;

use flashattn_core::{random_inputs, random_tensor, reference_backward, AttentionSpec, Tensor};
use rand::SeedableRng;

/// `sum(out * dout)` of the reference forward.
fn loss(spec: &AttentionSpec, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> f64 {
    let r = common::reference_f32(spec, q, k, v);
    r.out.iter().zip(dout).map(|(o, d)| o * *d as f64).sum()
}

/// Worst relative error of every gradient entry against its central difference.
fn check(spec: &AttentionSpec, seed: u64) {
    let (q, k, v) = random_inputs(spec, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 7);
    let dout = random_tensor(&mut rng, spec.dtype, spec.out_elems().unwrap());
    let g = reference_backward(spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    let f = |t: &Tensor| t.to_f32_vec();
    let (q, k, v, dout) = (f(&q), f(&k), f(&v), f(&dout));
    let h = 1e-3f32;
    let mut worst = 0.0f64;
    let mut scale = 0.0f64;
    for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
        for idx in 0..grad.len() {
            let mut xs = [q.clone(), k.clone(), v.clone()];
            let x0 = xs[which][idx];
            xs[which][idx] = x0 + h;
            let up = loss(spec, &xs[0], &xs[1], &xs[2], &dout);
            let step_up = xs[which][idx] as f64;
            xs[which][idx] = x0 - h;
            let down = loss(spec, &xs[0], &xs[1], &xs[2], &dout);
            let numeric = (up - down) / (step_up - xs[which][idx] as f64);
            worst = worst.max((numeric - grad[idx]).abs());
            scale = scale.max(grad[idx].abs());
        }
    }
    assert!(
        scale > 1e-3,
        "gradients are all ~0 on {spec}: the check proves nothing"
    );
    assert!(
        worst <= 1e-5 * scale.max(1.0),
        "finite differences disagree by {worst:.3e} (largest gradient {scale:.3e}) on {spec}"
    );
}

#[test]
fn dense() {
    check(&AttentionSpec::new(2, 2, 3, 5, 4).head_dim_v(3), 1);
}

#[test]
fn causal_gqa_with_masked_rows() {
    // sq > sk: the first rows see no key and must get zero gradient.
    check(
        &AttentionSpec::new(1, 4, 5, 3, 4).heads_kv(2).causal(true),
        2,
    );
}

#[test]
fn window_softcap_alibi() {
    let spec = AttentionSpec::new(1, 2, 4, 6, 3)
        .window(2, 1)
        .softcap(0.7)
        .alibi(vec![0.3, 0.1], false)
        .scale(0.9);
    check(&spec, 3);
}

#[test]
fn varlen_per_batch_alibi() {
    let spec = AttentionSpec::new(1, 2, 7, 8, 4)
        .varlen(vec![0, 3, 6], vec![0, 5, 8])
        .causal(true)
        .alibi(vec![0.2, 0.4, 0.1, 0.3], true);
    check(&spec, 4);
}

#[test]
fn fully_masked_rows_get_zero_gradient() {
    let spec = AttentionSpec::new(1, 1, 4, 2, 3).causal(true);
    let (q, k, v) = random_inputs(&spec, 9);
    let dout = Tensor::F32(vec![1.0; spec.out_elems().unwrap()]);
    let g = reference_backward(&spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    // Rows 0 and 1 see nothing (j <= i + 2 - 4).
    assert!(g.dq[..6].iter().all(|&x| x == 0.0), "{:?}", &g.dq[..6]);
    assert!(g.dq[6..].iter().any(|&x| x != 0.0));
}
