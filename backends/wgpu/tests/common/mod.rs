//! What the wgpu test binaries share beyond `flashattn_core::testing`: one backend per test
//! binary (opening a device is slow), skipped with a printed reason when there is no adapter.

use flashattn_core::testing::{backend_or_skip, check_backend, check_cases};
use flashattn_core::AttentionSpec;
use flashattn_wgpu::WgpuBackend;
use std::sync::OnceLock;

/// The backend, or `None` when the test is skipped (the reason is printed; a failure instead
/// when FLASHATTN_REQUIRE_BACKENDS names wgpu).
pub fn backend() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let b = B
        .get_or_init(|| {
            let b = backend_or_skip("wgpu", WgpuBackend::new)?;
            eprintln!("wgpu tests on {}", b.device_description());
            Some(b)
        })
        .as_ref();
    if b.is_none() {
        eprintln!(
            "SKIP: no wgpu adapter (scripts/install-lavapipe.sh installs a CPU Vulkan driver)"
        );
    }
    b
}

/// Runs every forward case against the reference (seeds from `seed`); panics listing all failures.
#[allow(dead_code)] // not every test binary uses it
pub fn assert_forward_cases<S: AsRef<str>>(
    b: &WgpuBackend,
    cases: &[(S, AttentionSpec)],
    seed: u64,
) {
    let failures = check_cases(b, cases, seed, check_backend);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
