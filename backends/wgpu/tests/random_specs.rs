//! Random specs from the shared strategy (odd sizes, head_dim 40/72/200, every feature, every
//! dtype) against the f64 reference. Case counts are modest: lavapipe runs the kernels on the CPU.

mod common;

use flashattn_core::testing::check_backend;
use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::DType;
use proptest::prelude::*;

fn space() -> SpecSpace {
    SpecSpace::new(&[DType::F32, DType::F16, DType::Bf16])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_match_the_reference(spec in specs(space()), seed in any::<u64>()) {
        let Some(b) = common::backend() else { return Ok(()) };
        if spec.dtype == DType::F16 && !b.has_f16() {
            return Ok(());
        }
        if let Err(e) = check_backend(b, &spec, seed) {
            prop_assert!(false, "{}", e);
        }
    }
}
