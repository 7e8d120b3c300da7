use flashattn_core::testing::{check_backend, feature_cases};
use flashattn_core::{
    lse_max_error, reference_attention, rel_l2_error, AttentionSpec, Backend, DType, Tensor,
};
use flashattn_cpu::{CpuBackend, Isa};
use rand::{Rng, SeedableRng};
fn amplified(b: &CpuBackend, spec: &AttentionSpec, amp: f32) -> (f64, f64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut t = |n: usize, a: f32| {
        Tensor::from_f32(
            spec.dtype,
            &(0..n)
                .map(|_| rng.random_range(-a..a))
                .collect::<Vec<f32>>(),
        )
    };
    let (q, k, v) = (
        t(spec.q_elems().unwrap(), amp),
        t(spec.k_elems().unwrap(), amp),
        t(spec.v_elems().unwrap(), 1.0),
    );
    let want = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let got = b.forward(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    (
        rel_l2_error(&got.out.to_f32_vec(), &want.out),
        lse_max_error(&got.lse.unwrap(), &want.lse),
    )
}
fn main() {
    let isas: Vec<Isa> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    for dtype in [DType::F16, DType::Bf16] {
        let mut worst = vec![0.0f64; isas.len()];
        let mut cases = feature_cases(dtype);
        cases.push((
            "long",
            AttentionSpec::new(1, 2, 300, 3000, 128)
                .dtype(dtype)
                .return_lse(true),
        ));
        cases.push((
            "d=200",
            AttentionSpec::new(1, 2, 129, 300, 200)
                .dtype(dtype)
                .return_lse(true),
        ));
        for (name, spec) in &cases {
            for (w, &isa) in worst.iter_mut().zip(&isas) {
                let b = CpuBackend::with_threads(2).with_isa(isa).unwrap();
                match check_backend(&b, spec, 5) {
                    Ok(r) => *w = w.max(r.rel_l2),
                    Err(e) => println!("FAIL {isa} {name}: {e}"),
                }
            }
        }
        println!(
            "{dtype} worst feature case: {:?}",
            worst.iter().map(|w| format!("{w:.2e}")).collect::<Vec<_>>()
        );
        for amp in [2.0f32, 4.0, 8.0] {
            for d in [64, 128, 256] {
                let spec = AttentionSpec::new(1, 2, 256, 1024, d)
                    .dtype(dtype)
                    .return_lse(true);
                let r: Vec<String> = isas
                    .iter()
                    .map(|&isa| {
                        let (o, l) = amplified(
                            &CpuBackend::with_threads(2).with_isa(isa).unwrap(),
                            &spec,
                            amp,
                        );
                        format!("{o:.2e}/{l:.1e}")
                    })
                    .collect();
                println!("{dtype} amp {amp} d {d}: {}", r.join("  "));
            }
        }
    }
}
