//! The one trait every backend implements.

use crate::{AttentionSpec, Output, Result, TensorRef};

/// What a benchmark times: our flash kernel, or naive attention that materialises the scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Flash,
    Naive,
}

/// How many runs a benchmark makes.
#[derive(Clone, Copy, Debug)]
pub struct BenchPlan {
    pub warmup: usize,
    pub iters: usize,
    /// Seed of the random inputs.
    pub seed: u64,
}

/// What a backend measured.
#[derive(Clone, Debug, Default)]
pub struct BenchMeasure {
    /// One time per timed run, in milliseconds (device timers where the device has them).
    pub times_ms: Vec<f64>,
    /// Peak memory allocated beyond inputs and outputs during one run, measured; `None`
    /// where this backend cannot measure it.
    pub extra_bytes: Option<u64>,
}

impl BenchMeasure {
    /// Median of the finite timings; `None` if there are none.
    pub fn median_ms(&self) -> Option<f64> {
        let mut t: Vec<f64> = self
            .times_ms
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        if t.is_empty() {
            return None;
        }
        t.sort_by(f64::total_cmp);
        Some(t[t.len() / 2])
    }
}

/// A compute backend. Backends are discovered by the runtime and must never panic on user input.
pub trait Backend: Send + Sync {
    /// Short name: "cpu", "wgpu", "cuda".
    fn name(&self) -> &'static str;

    /// The device this backend runs on, in words.
    fn device(&self) -> String;

    /// `Ok` if this backend can run `spec`; else `Error::Unsupported` saying why not.
    fn supports(&self, spec: &AttentionSpec) -> Result<()>;

    /// Forward pass on host data.
    fn forward(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output>;

    /// Times `algo` on random inputs that stay resident on the device (no host round trips
    /// inside the timed region). `progress` is called once per run, warm-up included.
    fn bench(
        &self,
        spec: &AttentionSpec,
        algo: Algorithm,
        plan: &BenchPlan,
        progress: &mut dyn FnMut(),
    ) -> Result<BenchMeasure>;
}
