//! Random specs (odd sizes, head_dim 40/72/200, every feature, every dtype) against the f64
//! reference. Case counts are modest: lavapipe runs the kernels on the CPU.

mod common;

use flashattn_core::testing::check_backend;
use flashattn_core::{AttentionSpec, DType};
use proptest::prelude::*;

fn spec_strategy() -> impl Strategy<Value = (AttentionSpec, u64)> {
    let sizes = prop_oneof![Just(1usize), Just(17), Just(129), 2usize..80];
    let dims = prop_oneof![Just(40usize), Just(72), Just(200), Just(64), 1usize..=256];
    (
        (
            1usize..=2,
            prop_oneof![Just(1usize), Just(2), Just(4)],
            1usize..=2,
        ),
        (sizes.clone(), sizes),
        (
            dims.clone(),
            prop_oneof![3 => Just(None), 1 => dims.prop_map(Some)],
        ),
        prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::Bf16)],
        (
            any::<bool>(),
            prop_oneof![Just(-1i64), 0i64..40],
            prop_oneof![Just(-1i64), 0i64..40],
        ),
        (
            prop_oneof![3 => Just(0.0f32), 1 => 1.0f32..30.0],
            any::<bool>(),
            any::<bool>(),
        ),
        any::<u64>(),
    )
        .prop_map(
            |(
                (batch, group, heads_kv),
                (sq, sk),
                (d, dv),
                dtype,
                (causal, wl, wr),
                (cap, alibi, varlen),
                seed,
            )| {
                let heads_q = heads_kv * group;
                let mut s = AttentionSpec::new(batch, heads_q, sq, sk, d)
                    .heads_kv(heads_kv)
                    .head_dim_v(dv.unwrap_or(d))
                    .dtype(dtype)
                    .causal(causal)
                    .window(wl, wr)
                    .softcap(cap)
                    .return_lse(true);
                if alibi {
                    let slopes = (0..heads_q).map(|h| 0.5f32.powi(h as i32 + 1)).collect();
                    s = s.alibi(slopes, false);
                }
                if varlen && batch == 2 {
                    // Two sequences cut from the totals, one possibly empty of queries.
                    let (cq, ck) = ((sq / 3) as i32, (sk / 2) as i32);
                    s = s.varlen(vec![0, cq, sq as i32], vec![0, ck, sk as i32]);
                }
                (s, seed)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_match_the_reference((spec, seed) in spec_strategy()) {
        let Some(b) = common::backend() else { return Ok(()) };
        if spec.dtype == DType::F16 && !b.has_f16() {
            return Ok(());
        }
        if let Err(e) = check_backend(b, &spec, seed) {
            prop_assert!(false, "{}", e);
        }
    }
}
