//! The backward pass against core's f64 reference backward: every feature case for every
//! dtype, instruction set and thread count; random specs; long key ranges; bitwise
//! determinism across thread counts and runs; the naive peer; and one training step of a
//! tiny attention layer whose weight gradients must match the reference's.

mod common;

use flashattn_core::testing::nan::backward_nan_stays_in_its_head_group;
use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::testing::{backward_tolerance, check_backward, check_cases, feature_cases};
use flashattn_core::{
    random_inputs, random_tensor, reference_backward, rel_l2_error, AttentionSpec, Backend,
    BackwardInputs, DType, ForwardInputs, Grads, Tensor,
};
use flashattn_cpu::CpuBackend;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

#[test]
fn feature_cases_every_dtype_isa_and_thread_count() {
    let mut failures = Vec::new();
    for (label, backend) in common::every_isa(&[1, 3]) {
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            for e in check_cases(&backend, &feature_cases(dtype), 500, check_backward) {
                failures.push(format!("[{label}] ({dtype}) {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_match_reference_backward(
        spec in specs(SpecSpace::new(&[DType::F32, DType::F32, DType::F16, DType::Bf16])),
        seed in any::<u64>(),
        which in any::<usize>(),
    ) {
        let all = common::every_isa_once();
        let (label, backend) = &all[which % all.len()];
        if let Err(e) = check_backward(backend, &spec, seed) {
            prop_assert!(false, "[{label}] {e}\n{spec:?}");
        }
    }
}

/// Long key ranges (many key blocks adding into one query block's dq, in turn) and a long
/// causal square (query blocks skipped along the diagonal).
#[test]
fn long_sequences() {
    let cases = vec![
        (
            "1 query x 20000 keys",
            AttentionSpec::new(1, 2, 1, 20000, 64).heads_kv(1),
        ),
        (
            "2000 x 2000 causal",
            AttentionSpec::new(1, 1, 2000, 2000, 64).causal(true),
        ),
        (
            "700 x 3000 window, softcap, alibi",
            AttentionSpec::new(1, 2, 700, 3000, 40)
                .window(300, 100)
                .softcap(10.0)
                .alibi(vec![0.01, 0.002], false),
        ),
    ];
    for (label, backend) in common::every_isa(&[3]) {
        let failures = check_cases(&backend, &cases, 900, check_backward);
        assert!(failures.is_empty(), "[{label}] {}", failures.join("\n"));
    }
}

/// The forward (for out and LSE), then the backward, on `backend`.
fn forward_backward(
    backend: &CpuBackend,
    spec: &AttentionSpec,
    [q, k, v, dout]: [&Tensor; 4],
) -> Grads {
    let fwd = backend.forward(spec, ForwardInputs::of(q, k, v)).unwrap();
    let lse = fwd.lse.as_deref().unwrap();
    let inputs = BackwardInputs::of((q, k, v), &fwd.out, lse, dout);
    backend.backward(spec, inputs).unwrap()
}

/// The gradients of `spec` on random q, k, v and dout (`seed`).
fn run_backward(backend: &CpuBackend, spec: &AttentionSpec, seed: u64) -> Grads {
    let (q, k, v) = random_inputs(spec, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let dout = random_tensor(&mut rng, spec.dtype, spec.out_elems().unwrap());
    forward_backward(backend, spec, [&q, &k, &v, &dout])
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().iter().map(|x| x.to_bits()).collect()
}

#[test]
fn gradients_are_bitwise_identical_for_any_thread_count_and_run() {
    let specs = [
        AttentionSpec::new(2, 4, 300, 500, 64)
            .heads_kv(2)
            .causal(true)
            .softcap(20.0),
        AttentionSpec::new(1, 3, 1, 3000, 72).heads_kv(1),
        AttentionSpec::new(1, 2, 400, 400, 40)
            .varlen(vec![0, 150, 400], vec![0, 260, 400])
            .window(100, 20)
            .alibi(vec![0.1, 0.05], false)
            .dtype(DType::Bf16),
    ];
    for (label, backend) in common::every_isa(&[1]) {
        let isa = backend.isa();
        for spec in &specs {
            let spec = spec.clone().return_lse(true);
            let mut first: Option<[Vec<u32>; 3]> = None;
            for threads in [1, 2, 3, 2, 3, 1] {
                let b = CpuBackend::with_threads(threads).with_isa(isa).unwrap();
                let g = run_backward(&b, &spec, 4);
                let got = [bits(&g.dq), bits(&g.dk), bits(&g.dv)];
                assert!(got.iter().flatten().any(|&x| x != 0), "all-zero gradients");
                match &first {
                    None => first = Some(got),
                    Some(want) => {
                        for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(want.iter().zip(&got)) {
                            let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
                            assert_eq!(
                                diff, 0,
                                "[{label}] {name}: {diff} elements differ at {threads} threads on {spec}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn naive_backward_matches_reference() {
    for threads in [1, 3] {
        let naive = common::Naive(CpuBackend::with_threads(threads));
        for dtype in [DType::F32, DType::Bf16] {
            let failures = check_cases(&naive, &feature_cases(dtype), 700, check_backward);
            assert!(failures.is_empty(), "{}", failures.join("\n"));
        }
    }
}

/// `C [n, p] = A B` in f64, with `A(r, i) = a[r * a_rs + i * a_cs]` (`m` wide) and
/// `B(i, c) = b[i * b_rs + c * b_cs]`: plain products and products with a transposed side.
fn matmul(
    a: &[f64],
    (a_rs, a_cs): (usize, usize),
    b: &[f64],
    (b_rs, b_cs): (usize, usize),
    (n, m, p): (usize, usize, usize),
) -> Vec<f64> {
    let mut c = vec![0.0; n * p];
    for r in 0..n {
        for i in 0..m {
            for j in 0..p {
                c[r * p + j] += a[r * a_rs + i * a_cs] * b[i * b_rs + j * b_cs];
            }
        }
    }
    c
}

/// One training step of `x -> q = x Wq, k = x Wk, v = x Wv -> attention -> loss = sum(out * w)`:
/// the gradients of Wq, Wk, Wv and x, chained by hand through the projections, from
/// flashattn's backward and from the reference backward, must agree.
#[test]
fn training_step_weight_gradients_match_the_reference() {
    let (batch, seq, dm, hq, hkv, d) = (2, 37, 24, 4, 2, 16);
    let spec = AttentionSpec::new(batch, hq, seq, seq, d)
        .heads_kv(hkv)
        .causal(true)
        .return_lse(true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let mut rand_vec = |n: usize, s: f64| -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-1.0..1.0) * s).collect()
    };
    let tokens = batch * seq;
    let x = rand_vec(tokens * dm, 1.0);
    let wq = rand_vec(dm * hq * d, 0.5);
    let wk = rand_vec(dm * hkv * d, 0.5);
    let wv = rand_vec(dm * hkv * d, 0.5);
    let w = rand_vec(tokens * hq * d, 1.0);
    let f32s = |v: &[f64]| Tensor::F32(v.iter().map(|&x| x as f32).collect());
    // x W, x^T dY and dY W^T for a [tokens, dm] x and a [dm, cols] W.
    let x_w = |w: &[f64], cols| matmul(&x, (dm, 1), w, (cols, 1), (tokens, dm, cols));
    let xt_dy = |dy: &[f64], cols| matmul(&x, (1, dm), dy, (cols, 1), (dm, tokens, cols));
    let dy_wt =
        |dy: &[f64], w: &[f64], cols| matmul(dy, (cols, 1), w, (1, cols), (tokens, cols, dm));
    let (q, k, v) = (
        f32s(&x_w(&wq, hq * d)),
        f32s(&x_w(&wk, hkv * d)),
        f32s(&x_w(&wv, hkv * d)),
    );
    // loss = sum(out * w), so dL/dout = w.
    let dout = f32s(&w);
    // The chain rule through the projections: dW = x^T dY, dx = sum dY W^T.
    let chain = |dq: &[f64], dk: &[f64], dv: &[f64]| -> [Vec<f64>; 4] {
        let mut dx = dy_wt(dq, &wq, hq * d);
        for (g, w) in [(dk, &wk), (dv, &wv)] {
            for (a, b) in dx.iter_mut().zip(dy_wt(g, w, hkv * d)) {
                *a += b;
            }
        }
        [
            xt_dy(dq, hq * d),
            xt_dy(dk, hkv * d),
            xt_dy(dv, hkv * d),
            dx,
        ]
    };
    let want =
        reference_backward(&spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    let want = chain(&want.dq, &want.dk, &want.dv);
    for (label, backend) in common::every_isa(&[1, 3]) {
        let g = forward_backward(&backend, &spec, [&q, &k, &v, &dout]);
        let f64s = |t: &Tensor| -> Vec<f64> { t.to_f32_vec().into_iter().map(f64::from).collect() };
        let got = chain(&f64s(&g.dq), &f64s(&g.dk), &f64s(&g.dv));
        for (name, (gw, ww)) in ["dWq", "dWk", "dWv", "dx"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let gw: Vec<f32> = gw.iter().map(|&x| x as f32).collect();
            let err = rel_l2_error(&gw, ww);
            assert!(
                err <= backward_tolerance(DType::F32),
                "[{label}] {name}: relative L2 error {err:e}"
            );
            assert!(
                ww.iter().any(|&x| x.abs() > 1e-3),
                "{name} is ~0: test is void"
            );
        }
    }
}

/// NaN in one key reaches exactly its head group's gradients (core's shared check), on
/// every ISA and dtype.
#[test]
fn nan_stays_in_its_head_group() {
    for (label, backend) in common::every_isa(&[3]) {
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            backward_nan_stays_in_its_head_group(&backend, dtype)
                .unwrap_or_else(|e| panic!("[{label}] {e}"));
        }
    }
}
