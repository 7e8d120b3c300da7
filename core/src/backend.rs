//! The one trait every backend implements.

use crate::{
    AttentionSpec, CacheConfig, Error, Grads, KvCacheHandle, Output, Result, Tensor, TensorMut,
    TensorRef,
};

/// What a benchmark times: our flash kernel, naive attention that materialises the scores, or
/// a plain device copy of the bytes the pass must read (decode's memory-bandwidth limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Flash,
    Naive,
    Copy,
}

/// Which computation: the forward pass, the backward pass, or a decode step against a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    Backward,
    Decode,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
            Pass::Decode => "decode",
        }
    }
}

/// How many runs a benchmark makes.
#[derive(Clone, Copy, Debug)]
pub struct BenchPlan {
    pub warmup: usize,
    pub iters: usize,
    /// Seed of the random inputs.
    pub seed: u64,
    pub pass: Pass,
}

impl BenchPlan {
    /// Total runs (warm-up + timed); an error when there is nothing to time or the count overflows.
    pub fn runs(&self) -> Result<usize> {
        if self.iters == 0 {
            return Err(Error::argument(
                "iters",
                0,
                "at least one timed run is needed",
            ));
        }
        self.warmup
            .checked_add(self.iters)
            .ok_or_else(|| Error::argument("warmup", self.warmup, "warmup + iters overflows"))
    }
}

/// One [`Backend::bench`] request: time `algo` for `plan.pass` of `spec`; `progress` is
/// called once per run, warm-up included.
pub struct BenchRun<'a> {
    pub spec: &'a AttentionSpec,
    pub algo: Algorithm,
    pub plan: &'a BenchPlan,
    pub progress: &'a mut dyn FnMut(),
}

impl<'a> BenchRun<'a> {
    pub fn new(
        spec: &'a AttentionSpec,
        algo: Algorithm,
        plan: &'a BenchPlan,
        progress: &'a mut dyn FnMut(),
    ) -> Self {
        BenchRun {
            spec,
            algo,
            plan,
            progress,
        }
    }
}

/// Host inputs of a forward pass: q, k and v.
#[derive(Clone, Copy, Debug)]
pub struct ForwardInputs<'a> {
    pub q: TensorRef<'a>,
    pub k: TensorRef<'a>,
    pub v: TensorRef<'a>,
}

impl<'a> ForwardInputs<'a> {
    /// The inputs as views of host tensors.
    pub fn of(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        ForwardInputs {
            q: q.as_ref(),
            k: k.as_ref(),
            v: v.as_ref(),
        }
    }
}

/// Host inputs of a backward pass.
#[derive(Clone, Copy, Debug)]
pub struct BackwardInputs<'a> {
    pub q: TensorRef<'a>,
    pub k: TensorRef<'a>,
    pub v: TensorRef<'a>,
    /// The forward's output, in the output dtype.
    pub out: TensorRef<'a>,
    /// The forward's LSE (f32, the forward's layout).
    pub lse: &'a [f32],
    /// Gradient of the loss with respect to `out`, in the output dtype.
    pub dout: TensorRef<'a>,
}

impl<'a> BackwardInputs<'a> {
    /// The inputs as views of host tensors: q, k, v, the forward's out and LSE, and dout.
    pub fn of(
        (q, k, v): (&'a Tensor, &'a Tensor, &'a Tensor),
        out: &'a Tensor,
        lse: &'a [f32],
        dout: &'a Tensor,
    ) -> Self {
        BackwardInputs {
            q: q.as_ref(),
            k: k.as_ref(),
            v: v.as_ref(),
            out: out.as_ref(),
            lse,
            dout: dout.as_ref(),
        }
    }
}

/// Host inputs of a decode call. The caches are appended to in place (`seqlen_new` rows per
/// batch entry from `k_new` / `v_new`) before attending.
#[derive(Debug)]
pub struct DecodeInputs<'a> {
    pub q: TensorRef<'a>,
    pub k_cache: TensorMut<'a>,
    pub v_cache: TensorMut<'a>,
    /// `[batch, seqlen_new, heads_kv, head_dim]`; `None` when `seqlen_new` is 0.
    pub k_new: Option<TensorRef<'a>>,
    pub v_new: Option<TensorRef<'a>>,
}

impl<'a> DecodeInputs<'a> {
    /// The inputs as views of host tensors; `new` holds the appended k and v rows, if any.
    pub fn of(
        q: &'a Tensor,
        (k_cache, v_cache): (&'a mut Tensor, &'a mut Tensor),
        new: Option<(&'a Tensor, &'a Tensor)>,
    ) -> Self {
        DecodeInputs {
            q: q.as_ref(),
            k_cache: k_cache.as_mut(),
            v_cache: v_cache.as_mut(),
            k_new: new.map(|(k, _)| k.as_ref()),
            v_new: new.map(|(_, v)| v.as_ref()),
        }
    }
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
    fn forward(&self, spec: &AttentionSpec, inputs: ForwardInputs<'_>) -> Result<Output>;

    /// `Ok` if this backend can run the backward pass of `spec`; else `Error::Unsupported`.
    fn supports_backward(&self, spec: &AttentionSpec) -> Result<()> {
        let _ = spec;
        Err(Error::unsupported(
            self.name(),
            "the backward pass is not implemented on this backend yet",
        ))
    }

    /// Backward pass on host data: dq, dk, dv in the input dtype.
    fn backward(&self, spec: &AttentionSpec, inputs: BackwardInputs<'_>) -> Result<Grads> {
        let _ = inputs;
        self.supports_backward(spec)?;
        Err(Error::unsupported(self.name(), "backward"))
    }

    /// `Ok` if this backend can run a decode step of `spec` (which has a `kv_cache`).
    fn supports_decode(&self, spec: &AttentionSpec) -> Result<()> {
        let _ = spec;
        Err(Error::unsupported(
            self.name(),
            "decode against a KV cache is not implemented on this backend yet",
        ))
    }

    /// One decode step on host data: appends the new rows to the caches in place, then
    /// attends; out and LSE as the forward's.
    fn decode(&self, spec: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
        let _ = inputs;
        self.supports_decode(spec)?;
        Err(Error::unsupported(self.name(), "decode"))
    }

    /// The kernel variant that runs `pass` of `spec` here: the runtime's canary checks each
    /// (device, variant) once against the CPU backend before trusting it. Backends with
    /// several kernels override this so that each gets its own check.
    fn kernel_variant(&self, spec: &AttentionSpec, pass: Pass) -> String {
        format!("{}/{}/{}", self.name(), pass.name(), spec.dtype)
    }

    /// A KV cache handle on this backend's device, for a serving loop's decode steps.
    fn kv_cache(&self, config: CacheConfig) -> Result<Box<dyn KvCacheHandle + '_>> {
        let _ = config;
        Err(Error::unsupported(
            self.name(),
            "KV cache handles are not implemented on this backend yet",
        ))
    }

    /// Times `run.algo` for `run.plan.pass` on random inputs that stay resident on the device
    /// (no host round trips inside the timed region).
    fn bench(&self, run: BenchRun<'_>) -> Result<BenchMeasure> {
        let _ = run;
        Err(Error::unsupported(
            self.name(),
            "timing is not implemented on this backend",
        ))
    }
}
