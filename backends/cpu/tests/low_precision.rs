//! f16 / bf16 inputs on every instruction set this CPU has (the low-precision tiles of the
//! AVX512-FP16 and AVX512-BF16 levels, the f32 tiles of the others) against the f64
//! reference, forward and backward: long key ranges, large scores, and values outside f16's
//! range.

mod common;

use flashattn_core::testing::{backward_tolerance, check_backend, check_backward, check_cases};
use flashattn_core::{
    lse_max_error, reference_attention, reference_backward, rel_l2_error, AttentionSpec, Backend,
    BackwardInputs, DType, ForwardInputs, Grads, ReferenceGrads, Tensor,
};
use rand::{Rng, SeedableRng};

/// More than 20k keys: thousands of key blocks folded into one f32 accumulator.
#[test]
fn long_key_ranges_every_isa() {
    let mut cases = Vec::new();
    for dtype in [DType::Bf16, DType::F16] {
        let long = |sq, sk, d| {
            AttentionSpec::new(1, 2, sq, sk, d)
                .dtype(dtype)
                .return_lse(true)
        };
        cases.push((format!("{dtype} 20011 keys"), long(17, 20_011, 64)));
        cases.push((
            format!("{dtype} 20480 keys causal gqa"),
            long(9, 20_480, 128).heads_kv(1).causal(true),
        ));
    }
    let mut failures = Vec::new();
    for (label, backend) in common::every_isa(&[2]) {
        for e in check_cases(&backend, &cases, 41, check_backend) {
            failures.push(format!("[{label}] {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Several query blocks per head, so a worker meets the K / V blocks it packed for the
/// previous query block of the same (batch, KV head) (`lowp_reuse.rs`): GQA (query heads
/// share a KV head, and the next KV head must not see the last one's blocks), varlen (each
/// sequence its own keys), causal (the last block's length differs between query blocks)
/// and a window (blocks off the block grid).
#[test]
fn packed_blocks_reused_across_query_blocks_every_isa() {
    let mut cases = Vec::new();
    for dtype in [DType::Bf16, DType::F16] {
        let spec = |sq, sk| {
            AttentionSpec::new(1, 4, sq, sk, 72)
                .heads_kv(2)
                .dtype(dtype)
                .return_lse(true)
        };
        cases.push((format!("{dtype} gqa"), spec(1000, 700)));
        cases.push((format!("{dtype} gqa causal"), spec(1300, 1300).causal(true)));
        cases.push((format!("{dtype} window"), spec(900, 1100).window(300, 17)));
        cases.push((
            format!("{dtype} varlen"),
            AttentionSpec::new(1, 4, 1650, 1900, 40)
                .heads_kv(2)
                .dtype(dtype)
                .return_lse(true)
                .varlen(vec![0, 800, 817, 1650], vec![0, 300, 1129, 1900]),
        ));
    }
    let mut failures = Vec::new();
    for (label, backend) in common::every_isa(&[2]) {
        for e in check_cases(&backend, &cases, 43, check_backend) {
            failures.push(format!("[{label}] {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// q, k, v uniform in +-amp_q, +-amp_k, +-1, rounded to `spec.dtype`; the error against the
/// reference (out relative L2, LSE max abs).
fn errors(backend: &dyn Backend, spec: &AttentionSpec, amp_q: f32, amp_k: f32) -> (f64, f64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut t = |n: Option<usize>, amp: f32| {
        let vals: Vec<f32> = (0..n.unwrap())
            .map(|_| rng.random_range(-amp..amp))
            .collect();
        Tensor::from_f32(spec.dtype, &vals)
    };
    let (q, k, v) = (
        t(spec.q_elems(), amp_q),
        t(spec.k_elems(), amp_k),
        t(spec.v_elems(), 1.0),
    );
    let want = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let got = backend
        .forward(spec, ForwardInputs::of(&q, &k, &v))
        .unwrap();
    let out = rel_l2_error(&got.out.to_f32_vec(), &want.out);
    (out, lse_max_error(&got.lse.unwrap(), &want.lse))
}

/// Scores with a standard deviation near 20 (a sharp softmax; the f16 tiles' Q·K^T chunk is
/// sized for it, `forward_lowp.rs`), and
/// bf16 keys far beyond f16's largest value (the f16 tiles' block scale keeps bf16's range).
#[test]
fn large_scores_and_wide_ranges_every_isa() {
    let mut failures = Vec::new();
    for (label, backend) in common::every_isa(&[2]) {
        for dtype in [DType::Bf16, DType::F16] {
            let mut cases = Vec::new();
            for d in [64, 128] {
                let spec = AttentionSpec::new(1, 2, 129, 700, d)
                    .dtype(dtype)
                    .return_lse(true);
                cases.push((format!("d {d} amp 8"), spec, 8.0, 8.0));
            }
            if dtype == DType::Bf16 {
                let spec = AttentionSpec::new(1, 2, 65, 300, 72)
                    .dtype(dtype)
                    .return_lse(true);
                cases.push(("keys near 1e6".into(), spec, 3e-6, 1e6));
            }
            for (name, spec, aq, ak) in cases {
                let (out, lse) = errors(&backend, &spec, aq, ak);
                if !(out <= dtype.tolerance() && lse <= dtype.lse_tolerance()) {
                    failures.push(format!(
                        "[{label}] {dtype} {name}: out {out:.2e} lse {lse:.2e}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The backward of f16 / bf16 inputs on every instruction set (on AVX512-FP16: S, dP and dV
/// on the f16 tiles, `backward_lowp.rs`) against the f64 reference backward: odd sizes, a
/// few thousand keys (many key blocks into one dq and one query block's dO / P in each dV),
/// GQA, causal, window, varlen, softcap, ALiBi, head dims 40 / 72 / 200 and a differing dv.
#[test]
fn backward_every_isa() {
    let mut cases = Vec::new();
    for dtype in [DType::Bf16, DType::F16] {
        let spec = |h, sq, sk, d| AttentionSpec::new(1, h, sq, sk, d).dtype(dtype);
        cases.push((
            format!("{dtype} 3001 keys gqa"),
            spec(4, 37, 3001, 64).heads_kv(1),
        ));
        cases.push((
            format!("{dtype} 2100 causal"),
            spec(2, 2100, 2100, 128).causal(true),
        ));
        cases.push((
            format!("{dtype} window softcap alibi"),
            spec(2, 301, 1100, 40)
                .window(200, 31)
                .softcap(8.0)
                .alibi(vec![0.05, 0.01], false),
        ));
        cases.push((
            format!("{dtype} d 72 gqa"),
            spec(6, 131, 259, 72).heads_kv(2),
        ));
        cases.push((
            format!("{dtype} d 200 dv 72"),
            spec(2, 97, 389, 200).head_dim_v(72),
        ));
        cases.push((
            format!("{dtype} varlen causal"),
            AttentionSpec::new(1, 4, 650, 900, 64)
                .heads_kv(2)
                .dtype(dtype)
                .causal(true)
                .varlen(vec![0, 300, 317, 650], vec![0, 400, 431, 900]),
        ));
    }
    let mut failures = Vec::new();
    for (label, backend) in common::every_isa(&[2]) {
        for e in check_cases(&backend, &cases, 47, check_backward) {
            failures.push(format!("[{label}] {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A backward case: q, k, v and dout uniform in +-`amps` (drawn in that order from `seed`),
/// dout's element i then times `dout_mul(i)`, all rounded to `spec.dtype`. Returns the f64
/// reference gradients and each instruction set's gradients (after its own forward for the
/// LSE) with its label.
fn backward_case(
    spec: &AttentionSpec,
    seed: u64,
    amps: [f32; 4],
    dout_mul: impl Fn(usize) -> f32,
) -> (ReferenceGrads, Vec<(String, Grads)>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut vals = |n: Option<usize>, amp: f32| -> Vec<f32> {
        (0..n.unwrap())
            .map(|_| rng.random_range(-amp..amp))
            .collect()
    };
    let (q, k, v) = (
        vals(spec.q_elems(), amps[0]),
        vals(spec.k_elems(), amps[1]),
        vals(spec.v_elems(), amps[2]),
    );
    let mut dout = vals(spec.out_elems(), amps[3]);
    for (i, x) in dout.iter_mut().enumerate() {
        *x *= dout_mul(i);
    }
    let t = |x: &[f32]| Tensor::from_f32(spec.dtype, x);
    let (q, k, v, dout) = (t(&q), t(&k), t(&v), t(&dout));
    let want = reference_backward(spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    let mut grads = Vec::new();
    for (label, backend) in common::every_isa(&[2]) {
        let fwd = backend
            .forward(spec, ForwardInputs::of(&q, &k, &v))
            .unwrap();
        let lse = fwd.lse.as_deref().unwrap();
        let inputs = BackwardInputs::of((&q, &k, &v), &fwd.out, lse, &dout);
        grads.push((label, backend.backward(spec, inputs).unwrap()));
    }
    (want, grads)
}

/// Records `what` in `failures` where `got`'s relative L2 error against `want` is NaN or
/// over `tol`; panics where `want` is all zero (the check would be void).
fn check_grad(failures: &mut Vec<String>, what: String, got: &[f32], want: &[f64], tol: f64) {
    assert!(
        want.iter().any(|&x| x != 0.0),
        "{what} is all zero: test is void"
    );
    let err = rel_l2_error(got, want);
    if err.is_nan() || err > tol {
        failures.push(format!("{what}: relative L2 error {err:.2e}"));
    }
}

/// The backward with bf16 keys near 1e6, queries near 1e-6 and dout near 1e-4: far outside
/// f16's range, kept by the f16 tiles' per-block scale; the gradients must match the
/// reference within bf16's backward tolerance on every instruction set.
#[test]
fn backward_wide_ranges_every_isa() {
    let spec = AttentionSpec::new(1, 2, 77, 301, 72)
        .dtype(DType::Bf16)
        .return_lse(true);
    let (want, grads) = backward_case(&spec, 11, [2e-6, 1e6, 1.0, 1e-4], |_| 1.0);
    let tol = backward_tolerance(DType::Bf16);
    let mut failures = Vec::new();
    for (label, got) in grads {
        for (name, g, w) in [
            ("dq", &got.dq, &want.dq),
            ("dk", &got.dk, &want.dk),
            ("dv", &got.dv, &want.dv),
        ] {
            let what = format!("[{label}] {name}");
            check_grad(&mut failures, what, &g.to_f32_vec(), w, tol);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// dS spanning a wide range inside every block: dout rows alternate between 1e-2 and 1e+2
/// (so each query block's dS rows differ by ~1e4), and q, k are large enough that P spans
/// many orders. The f16 tiles scale dS per block by its largest value; the small rows must
/// still keep their precision, so dq is checked on the small and the large rows apart
/// (against the f64 reference, each within the dtype's backward tolerance), and dk, dv whole.
#[test]
fn backward_ds_wide_range_in_one_block_every_isa() {
    for dtype in [DType::F16, DType::Bf16] {
        let spec = AttentionSpec::new(1, 2, 203, 291, 64)
            .dtype(dtype)
            .return_lse(true);
        // dout is [tokens, heads, dv]: token t's rows are small for even t.
        let row = 2 * 64;
        let small = |i: usize| (i / row).is_multiple_of(2);
        let dout_mul = |i| if small(i) { 1e-2 } else { 1e2 };
        let (want, grads) = backward_case(&spec, 23, [1.5, 1.5, 1.0, 1.0], dout_mul);
        let tol = backward_tolerance(dtype);
        let mut failures = Vec::new();
        for (label, got) in grads {
            let dq = got.dq.to_f32_vec();
            // q is [tokens, heads, d], the same row split as dout's.
            let part = |keep: bool| -> (Vec<f32>, Vec<f64>) {
                let idx = (0..dq.len()).filter(|&i| small(i) == keep);
                idx.map(|i| (dq[i], want.dq[i])).unzip()
            };
            let (dq_small, want_small) = part(true);
            let (dq_large, want_large) = part(false);
            for (name, g, w) in [
                ("dq, small rows", dq_small, want_small),
                ("dq, large rows", dq_large, want_large),
                ("dk", got.dk.to_f32_vec(), want.dk.clone()),
                ("dv", got.dv.to_f32_vec(), want.dv.clone()),
            ] {
                let what = format!("[{label}] {dtype} {name}");
                check_grad(&mut failures, what, &g, &w, tol);
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

/// dout all zero: every dS block is zero (its scale must stay finite, 1), so every gradient
/// is exactly zero, on every instruction set.
#[test]
fn backward_zero_dout_every_isa() {
    for dtype in [DType::F16, DType::Bf16] {
        let spec = AttentionSpec::new(1, 2, 45, 133, 40)
            .dtype(dtype)
            .return_lse(true);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut t = |n: Option<usize>| {
            let vals: Vec<f32> = (0..n.unwrap())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            Tensor::from_f32(dtype, &vals)
        };
        let (q, k, v) = (t(spec.q_elems()), t(spec.k_elems()), t(spec.v_elems()));
        let dout = Tensor::from_f32(dtype, &vec![0.0; spec.out_elems().unwrap()]);
        for (label, backend) in common::every_isa(&[2]) {
            let fwd = backend
                .forward(&spec, ForwardInputs::of(&q, &k, &v))
                .unwrap();
            let lse = fwd.lse.as_deref().unwrap();
            let inputs = BackwardInputs::of((&q, &k, &v), &fwd.out, lse, &dout);
            let got = backend.backward(&spec, inputs).unwrap();
            for (name, g) in [("dq", &got.dq), ("dk", &got.dk), ("dv", &got.dv)] {
                let bad = g.to_f32_vec().into_iter().find(|&x| x != 0.0);
                assert!(bad.is_none(), "[{label}] {dtype} {name}: {bad:?}, want 0");
            }
        }
    }
}
