//! The backward pass against core's f64 reference backward: every feature case for every
//! dtype, instruction set and thread count; random specs; long key ranges; bitwise
//! determinism across thread counts and runs; the naive peer; and one training step of a
//! tiny attention layer whose weight gradients must match the reference's.

mod common;

use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::testing::{backward_tolerance, check_backward, check_cases, feature_cases};
use flashattn_core::{
    random_inputs, random_tensor, reference_backward, rel_l2_error, AttentionSpec, Backend,
    BackwardInputs, DType, Grads, Output, Result, Tensor, TensorRef,
};
use flashattn_cpu::CpuBackend;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;

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

fn backends() -> &'static Vec<(String, CpuBackend)> {
    static B: OnceLock<Vec<(String, CpuBackend)>> = OnceLock::new();
    B.get_or_init(|| common::every_isa(&[1, 3]))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_match_reference_backward(
        spec in specs(SpecSpace::new(&[DType::F32, DType::F32, DType::F16, DType::Bf16])),
        seed in any::<u64>(),
        which in any::<usize>(),
    ) {
        let all = backends();
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

/// Random q, k, v, dout and the forward's out and LSE of `spec`.
fn backward_inputs(spec: &AttentionSpec, seed: u64) -> (Tensor, Tensor, Tensor, Tensor, Output) {
    let (q, k, v) = random_inputs(spec, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let dout = random_tensor(&mut rng, spec.dtype, spec.out_elems().unwrap());
    let fwd = CpuBackend::with_threads(2)
        .forward(spec, q.as_ref(), k.as_ref(), v.as_ref())
        .unwrap();
    (q, k, v, dout, fwd)
}

fn run_backward(backend: &CpuBackend, spec: &AttentionSpec, seed: u64) -> Grads {
    let (q, k, v, dout, fwd) = backward_inputs(spec, seed);
    let inputs = BackwardInputs {
        q: q.as_ref(),
        k: k.as_ref(),
        v: v.as_ref(),
        out: fwd.out.as_ref(),
        lse: fwd.lse.as_deref().unwrap(),
        dout: dout.as_ref(),
    };
    backend.backward(spec, inputs).unwrap()
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

/// The naive (materialised scores) backward, seen through the `Backend` trait so that the
/// same checker applies.
struct Naive(CpuBackend);

impl Backend for Naive {
    fn name(&self) -> &'static str {
        "cpu-naive"
    }
    fn device(&self) -> String {
        self.0.device()
    }
    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.0.supports(spec)
    }
    fn forward(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        self.0.naive_forward(spec, q, k, v)
    }
    fn backward(&self, spec: &AttentionSpec, inputs: BackwardInputs<'_>) -> Result<Grads> {
        self.0.naive_backward(spec, inputs)
    }
    fn bench(
        &self,
        spec: &AttentionSpec,
        algo: flashattn_core::Algorithm,
        plan: &flashattn_core::BenchPlan,
        progress: &mut dyn FnMut(),
    ) -> Result<flashattn_core::BenchMeasure> {
        self.0.bench(spec, algo, plan, progress)
    }
}

#[test]
fn naive_backward_matches_reference() {
    for threads in [1, 3] {
        let naive = Naive(CpuBackend::with_threads(threads));
        for dtype in [DType::F32, DType::Bf16] {
            let failures = check_cases(&naive, &feature_cases(dtype), 700, check_backward);
            assert!(failures.is_empty(), "{}", failures.join("\n"));
        }
    }
}

/// `a [n, m] (row-major) -> a^T b` with `b [n, p]`, in f64.
fn at_b(a: &[f64], b: &[f64], n: usize, m: usize, p: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * p];
    for r in 0..n {
        for i in 0..m {
            for j in 0..p {
                c[i * p + j] += a[r * m + i] * b[r * p + j];
            }
        }
    }
    c
}

/// `a [n, m] -> a b` with `b [m, p]`, in f64.
fn a_b(a: &[f64], b: &[f64], n: usize, m: usize, p: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * p];
    for r in 0..n {
        for i in 0..m {
            for j in 0..p {
                c[r * p + j] += a[r * m + i] * b[i * p + j];
            }
        }
    }
    c
}

/// `a b^T` with `a [n, p]`, `b [m, p]`: the gradient through `y = x W` back to x.
fn a_bt(a: &[f64], b: &[f64], n: usize, m: usize, p: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * m];
    for r in 0..n {
        for i in 0..m {
            c[r * m + i] = (0..p).map(|j| a[r * p + j] * b[i * p + j]).sum();
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
    let (q, k, v) = (
        f32s(&a_b(&x, &wq, tokens, dm, hq * d)),
        f32s(&a_b(&x, &wk, tokens, dm, hkv * d)),
        f32s(&a_b(&x, &wv, tokens, dm, hkv * d)),
    );
    // loss = sum(out * w), so dL/dout = w.
    let dout = f32s(&w);
    // The chain rule through the projections: dW = x^T dY, dx = sum dY W^T.
    let chain = |dq: &[f64], dk: &[f64], dv: &[f64]| -> [Vec<f64>; 4] {
        let mut dx = a_bt(dq, &wq, tokens, dm, hq * d);
        for (g, wt) in [(dk, &wk), (dv, &wv)] {
            for (a, b) in dx.iter_mut().zip(a_bt(g, wt, tokens, dm, hkv * d)) {
                *a += b;
            }
        }
        [
            at_b(&x, dq, tokens, dm, hq * d),
            at_b(&x, dk, tokens, dm, hkv * d),
            at_b(&x, dv, tokens, dm, hkv * d),
            dx,
        ]
    };
    let want =
        reference_backward(&spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    let want = chain(&want.dq, &want.dk, &want.dv);
    for (label, backend) in common::every_isa(&[1, 3]) {
        let fwd = backend
            .forward(&spec, q.as_ref(), k.as_ref(), v.as_ref())
            .unwrap();
        let inputs = BackwardInputs {
            q: q.as_ref(),
            k: k.as_ref(),
            v: v.as_ref(),
            out: fwd.out.as_ref(),
            lse: fwd.lse.as_deref().unwrap(),
            dout: dout.as_ref(),
        };
        let g = backend.backward(&spec, inputs).unwrap();
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
