//! Random problem shapes and features against the f64 reference (proptest), on 1 and 3
//! threads and every instruction set this CPU has.

use flashattn_core::testing::check_backend;
use flashattn_core::{AttentionSpec, DType};
use flashattn_cpu::{CpuBackend, Isa};
use proptest::prelude::*;
use std::sync::OnceLock;

const DIMS: [usize; 8] = [8, 16, 40, 64, 72, 128, 200, 256];

/// Backends built once: (1 thread, 3 threads) for each available ISA.
fn backends() -> &'static Vec<CpuBackend> {
    static B: OnceLock<Vec<CpuBackend>> = OnceLock::new();
    B.get_or_init(|| {
        Isa::all_available()
            .into_iter()
            .flat_map(|isa| [1, 3].map(|t| CpuBackend::with_threads(t).with_isa(isa).unwrap()))
            .collect()
    })
}

fn seqlen() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(17), Just(129), 1usize..150]
}

fn window() -> impl Strategy<Value = (i64, i64)> {
    prop_oneof![
        3 => Just((-1i64, -1i64)),
        1 => (-1i64..40, -1i64..40),
    ]
}

prop_compose! {
    fn spec()(
        batch in 1usize..=3,
        heads_kv in 1usize..=3,
        group in prop_oneof![Just(1usize), Just(2), Just(3)],
        sq in seqlen(),
        sk in seqlen(),
        d in prop::sample::select(DIMS.to_vec()),
        dv in prop::option::weighted(0.3, prop::sample::select(DIMS.to_vec())),
        dtype in prop_oneof![3 => Just(DType::F32), 1 => Just(DType::F16), 1 => Just(DType::Bf16)],
        causal in any::<bool>(),
        window in window(),
        softcap in prop_oneof![3 => Just(0.0f32), 1 => 0.5f32..30.0],
        alibi in prop::option::weighted(0.25, prop::collection::vec(0.0f32..1.0, 27)),
        varlen in prop::option::weighted(
            0.3,
            prop::collection::vec((0usize..60, 0usize..60), 3),
        ),
        extra_tokens in 0usize..3,
    ) -> AttentionSpec {
        let heads_q = heads_kv * group;
        let mut spec = AttentionSpec::new(batch, heads_q, sq, sk, d)
            .heads_kv(heads_kv)
            .head_dim_v(dv.unwrap_or(d))
            .dtype(dtype)
            .causal(causal)
            .window(window.0, window.1)
            .softcap(softcap)
            .return_lse(true);
        if let Some(lens) = varlen {
            let mut cq = vec![0i32];
            let mut ck = vec![0i32];
            for &(q, k) in &lens[..batch] {
                cq.push(cq.last().unwrap() + q as i32);
                ck.push(ck.last().unwrap() + k as i32);
            }
            spec = spec.varlen(cq.clone(), ck.clone());
            spec.seqlen_q = (*cq.last().unwrap() as usize + extra_tokens).max(1);
            spec.seqlen_k = (*ck.last().unwrap() as usize + extra_tokens).max(1);
        }
        if let Some(slopes) = alibi {
            let per_batch = slopes[0] > 0.5;
            let n = if per_batch { spec.batch * heads_q } else { heads_q };
            spec = spec.alibi(slopes[..n].to_vec(), per_batch);
        }
        spec
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_match_reference(spec in spec(), seed in any::<u64>(), which in any::<usize>()) {
        prop_assert!(spec.validate().is_ok(), "generator made an invalid spec: {spec:?}");
        let all = backends();
        let backend = &all[which % all.len()];
        let label = format!("{} with {} threads", backend.isa(), backend.threads());
        if let Err(e) = check_backend(backend, &spec, seed) {
            prop_assert!(false, "[{label}] {e}\n{spec:?}");
        }
    }
}
