//! Shared test setup: one backend per test binary, or a skip (a failure when CI requires wgpu).

use flashattn_core::testing::{backend_required, check_backend};
use flashattn_core::AttentionSpec;
use flashattn_wgpu::WgpuBackend;
use std::sync::OnceLock;

/// The backend, or `None` after printing why the test is skipped.
pub fn backend() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Result<WgpuBackend, String>> = OnceLock::new();
    let b = B.get_or_init(|| match WgpuBackend::new() {
        Ok(b) => {
            eprintln!("wgpu tests on {}", b.device_description());
            Ok(b)
        }
        Err(e) => {
            assert!(
                !backend_required("wgpu"),
                "FLASHATTN_REQUIRE_BACKENDS names wgpu but it is unavailable: {e}"
            );
            Err(e.to_string())
        }
    });
    match b {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("SKIP: {e} (scripts/install-lavapipe.sh installs a CPU Vulkan driver)");
            None
        }
    }
}

/// Runs every case; panics listing all failures.
#[allow(dead_code)] // not every test binary uses it
pub fn check_all(backend: &WgpuBackend, cases: &[(String, AttentionSpec)]) {
    let mut failures = Vec::new();
    for (i, (name, spec)) in cases.iter().enumerate() {
        match check_backend(backend, spec, 1000 + i as u64) {
            Ok(r) => eprintln!(
                "ok   {name}: {spec} rel_l2 {:.2e} lse {:?}",
                r.rel_l2, r.lse_max_abs
            ),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
