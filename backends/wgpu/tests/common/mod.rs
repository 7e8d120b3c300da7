//! Shared test setup: one backend per test binary, or a skip (a failure when CI requires wgpu).

use flashattn_core::testing::{backend_required, check_backend};
use flashattn_core::AttentionSpec;
use flashattn_wgpu::WgpuBackend;
use std::sync::OnceLock;

/// The backend, or `None` after printing why the test is skipped.
pub fn backend() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let b = B.get_or_init(|| match WgpuBackend::new() {
        Ok(b) => {
            eprintln!("wgpu tests on {}", b.device_description());
            Some(b)
        }
        Err(e) => {
            assert!(
                !backend_required("wgpu"),
                "FLASHATTN_REQUIRE_BACKENDS names wgpu but it is unavailable: {e}"
            );
            None
        }
    });
    if b.is_none() {
        eprintln!("SKIP: no wgpu adapter (run scripts/install-lavapipe.sh for a CPU one)");
    }
    b.as_ref()
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
