//! The CPU backends a test runs on: one per instruction set (a set this CPU lacks is skipped
//! with a printed reason, or fails under FLASHATTN_REQUIRE_BACKENDS) and thread count.

use flashattn_core::testing::backend_or_skip;
use flashattn_core::{
    Algorithm, AttentionSpec, Backend, BackwardInputs, BenchMeasure, BenchRun, ForwardInputs,
    Grads, Output, Result,
};
use flashattn_cpu::{CpuBackend, Isa};
use std::sync::OnceLock;

/// Every instruction set this CPU has, at each of `threads`, with a label for messages.
#[allow(dead_code)] // not every test file uses every helper
pub fn every_isa(threads: &[usize]) -> Vec<(String, CpuBackend)> {
    let mut out = Vec::new();
    for isa in Isa::ALL {
        for &t in threads {
            let name = format!("cpu-{isa}");
            if let Some(b) = backend_or_skip(&name, || CpuBackend::with_threads(t).with_isa(isa)) {
                out.push((format!("{isa}, {t} threads"), b));
            }
        }
    }
    out
}

/// `every_isa(&[1, 3])`, built once per test binary (for proptest cases, which share it).
#[allow(dead_code)]
pub fn every_isa_once() -> &'static [(String, CpuBackend)] {
    static B: OnceLock<Vec<(String, CpuBackend)>> = OnceLock::new();
    B.get_or_init(|| every_isa(&[1, 3]))
}

/// The naive (materialised scores) forward and backward, seen through the `Backend` trait so
/// that core's checkers apply.
#[allow(dead_code)]
pub struct Naive(pub CpuBackend);

impl Backend for Naive {
    fn name(&self) -> &'static str {
        "cpu-naive"
    }
    fn device(&self) -> String {
        self.0.device()
    }
    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.0.supports(spec)
    }
    fn forward(&self, spec: &AttentionSpec, inputs: ForwardInputs<'_>) -> Result<Output> {
        self.0.naive_forward(spec, inputs)
    }
    fn backward(&self, spec: &AttentionSpec, inputs: BackwardInputs<'_>) -> Result<Grads> {
        self.0.naive_backward(spec, inputs)
    }
    fn bench(&self, run: BenchRun<'_>) -> Result<BenchMeasure> {
        self.0.bench(BenchRun {
            algo: Algorithm::Naive,
            ..run
        })
    }
}
