//! Random problem shapes and features against the f64 reference (core's shared proptest
//! strategy), on 1 and 3 threads and every instruction set this CPU has.

mod common;

use flashattn_core::testing::check_backend;
use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::DType;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_match_reference(
        spec in specs(SpecSpace::new(&[DType::F32, DType::F32, DType::F32, DType::F16, DType::Bf16])),
        seed in any::<u64>(),
        which in any::<usize>(),
    ) {
        prop_assert!(spec.validate().is_ok(), "generator made an invalid spec: {spec:?}");
        let all = common::every_isa_once();
        let (label, backend) = &all[which % all.len()];
        if let Err(e) = check_backend(backend, &spec, seed) {
            prop_assert!(false, "[{label}] {e}\n{spec:?}");
        }
    }
}
