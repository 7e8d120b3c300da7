//! Every backend available on this machine against the f64 reference, through the facade.
//! A backend named in FLASHATTN_REQUIRE_BACKENDS must be available, else this fails.

use flashattn::testing::{backend_required, check_backend, feature_cases};
use flashattn::{DType, Runtime};

#[test]
fn required_backends_are_available() {
    let rt = Runtime::new();
    for s in rt.statuses() {
        if s.available {
            println!("{}: available on {}", s.name, s.detail);
        } else if backend_required(s.name) {
            panic!(
                "{} is required (FLASHATTN_REQUIRE_BACKENDS) but unavailable: {}",
                s.name, s.detail
            );
        } else {
            println!("skipping {}: unavailable: {}", s.name, s.detail);
        }
    }
}

#[test]
fn every_available_backend_matches_the_reference_on_every_feature() {
    let rt = Runtime::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for backend in rt.backends() {
        for dtype in DType::ALL {
            for (name, spec) in feature_cases(dtype) {
                if let Err(why) = backend.supports(&spec) {
                    println!("{} skips '{name}' ({dtype}): {why}", backend.name());
                    continue;
                }
                checked += 1;
                if let Err(e) = check_backend(backend.as_ref(), &spec, 1000 + checked) {
                    failures.push(format!("'{name}': {e}"));
                }
            }
        }
    }
    assert!(checked > 0, "no backend checked any case");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn varlen_tokens_past_the_last_sequence_get_zero_output() {
    // cu_seqlens end before the buffers do: the trailing tokens belong to no sequence.
    let rt = Runtime::new();
    let spec = flashattn::AttentionSpec::new(1, 2, 40, 50, 32)
        .varlen(vec![0, 10, 30], vec![0, 20, 45])
        .causal(true)
        .return_lse(true);
    for backend in rt.backends() {
        if backend.supports(&spec).is_err() {
            continue;
        }
        check_backend(backend.as_ref(), &spec, 5).unwrap();
    }
}
