//! The CPU backends a test runs on: one per instruction set (a set this CPU lacks is skipped
//! with a printed reason, or fails under FLASHATTN_REQUIRE_BACKENDS) and thread count.

use flashattn_core::testing::backend_or_skip;
use flashattn_cpu::{CpuBackend, Isa};

/// Every instruction set this CPU has, at each of `threads`, with a label for messages.
#[allow(dead_code)] // not every test file uses every helper
pub fn every_isa(threads: &[usize]) -> Vec<(String, CpuBackend)> {
    let mut out = Vec::new();
    for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
        for &t in threads {
            let name = format!("cpu-{isa}");
            if let Some(b) = backend_or_skip(&name, || CpuBackend::with_threads(t).with_isa(isa)) {
                out.push((format!("{isa}, {t} threads"), b));
            }
        }
    }
    out
}
