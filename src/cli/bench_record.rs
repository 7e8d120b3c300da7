//! One benchmark record: what was timed, how fast, and its peers (naive attention, or for
//! decode a plain copy of the same bytes on the same backend), as JSON and as a table row.

use super::budget::human;
use super::run_decode::kv_bytes_read;
use flashattn::{Algorithm, AttentionSpec, Backend, BenchPlan, BenchRun, CacheLayout, Pass};
use indicatif::ProgressBar;
use serde::Serialize;

#[derive(Serialize, Clone, Debug)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub dtype: String,
    pub causal: bool,
    /// Decode: rows in the cache per sequence before the step, new rows, rows per page.
    pub cache_len: Option<usize>,
    pub new_tokens: Option<usize>,
    pub page_size: Option<usize>,
}

/// One timed algorithm.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Measured {
    pub time_ms: Option<f64>,
    /// Forward and backward: TFLOP/s (the backward counted as 2.5 x the forward's FLOPs).
    pub tflops: Option<f64>,
    /// Decode: GB/s of the K and V rows the step attends.
    pub gbps: Option<f64>,
    pub extra_bytes: Option<u64>,
    pub error: Option<String>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Record {
    pub backend: String,
    pub device: String,
    pub pass: &'static str,
    pub spec: String,
    pub shape: Shape,
    pub time_ms: Option<f64>,
    pub tflops: Option<f64>,
    pub gbps: Option<f64>,
    pub extra_bytes: Option<u64>,
    pub error: Option<String>,
    /// `--compare-naive`: naive attention on the same backend.
    pub naive: Option<Measured>,
    /// Decode: a copy of the same bytes on the same backend (the memory-bandwidth limit).
    pub copy: Option<Measured>,
}

impl Record {
    pub fn new(
        backend: &dyn Backend,
        spec: &AttentionSpec,
        pass: Pass,
        flash: Measured,
        naive: Option<Measured>,
        copy: Option<Measured>,
    ) -> Record {
        Record {
            backend: backend.name().to_string(),
            device: backend.device(),
            pass: pass.name(),
            spec: spec.to_string(),
            shape: shape_of(spec),
            time_ms: flash.time_ms,
            tflops: flash.tflops,
            gbps: flash.gbps,
            extra_bytes: flash.extra_bytes,
            error: flash.error,
            naive,
            copy,
        }
    }

    pub fn timed(&self) -> bool {
        self.time_ms.is_some()
    }

    /// The record as one table line.
    pub fn table_row(&self) -> String {
        let mut line = format!("{:<5} {:<44}", self.backend, self.spec);
        match (&self.error, self.time_ms) {
            (Some(e), _) => line += &format!(" error: {e}"),
            (None, Some(t)) => {
                line += &format!(" {t:>10.3} ms");
                if let Some(f) = self.tflops {
                    line += &format!(" {f:>9.4} TFLOP/s");
                }
                if let Some(g) = self.gbps {
                    line += &format!(" {g:>8.2} GB/s");
                }
                line += &format!("  extra {}", bytes(self.extra_bytes));
            }
            _ => line += " no timing",
        }
        if let Some(n) = &self.naive {
            line += &match (&n.error, n.time_ms) {
                (Some(e), _) => format!(" | naive error: {e}"),
                (None, Some(t)) => {
                    let mut s = format!(" | naive {t:.3} ms extra {}", bytes(n.extra_bytes));
                    if let Some(ours) = self.time_ms {
                        s += &format!(" | {:.2}x faster", t / ours);
                    }
                    if let (Some(a), Some(b)) = (self.extra_bytes, n.extra_bytes) {
                        s += &format!(", {:.0}x less memory", b as f64 / (a.max(1)) as f64);
                    }
                    s
                }
                _ => String::new(),
            };
        }
        if let Some(c) = &self.copy {
            line += &match (&c.error, c.gbps) {
                (Some(e), _) => format!(" | copy error: {e}"),
                (None, Some(g)) => {
                    let share = self.gbps.map_or(String::new(), |ours| {
                        format!(" ({:.0}% of it)", 100.0 * ours / g)
                    });
                    format!(" | copy of the same bytes {g:.2} GB/s{share}")
                }
                _ => String::new(),
            };
        }
        line
    }
}

/// Times `algo` for `plan.pass` of `spec` on `backend`, with its throughput.
pub fn measure(
    backend: &dyn Backend,
    spec: &AttentionSpec,
    algo: Algorithm,
    plan: &BenchPlan,
    bar: &ProgressBar,
) -> Measured {
    let supported = match plan.pass {
        Pass::Forward => backend.supports(spec),
        Pass::Backward => backend.supports_backward(spec),
        Pass::Decode => backend.supports_decode(spec),
    };
    let result =
        supported.and_then(|_| backend.bench(BenchRun::new(spec, algo, plan, &mut || bar.inc(1))));
    match result {
        Ok(m) => {
            let time_ms = m.median_ms();
            let per_second = |amount: f64| time_ms.map(|t| amount / (t * 1e-3));
            let (tflops, gbps) = match plan.pass {
                Pass::Forward => (per_second(spec.flops() / 1e12), None),
                Pass::Backward => (per_second(spec.backward_flops() / 1e12), None),
                Pass::Decode => (None, per_second(kv_bytes_read(spec) as f64 / 1e9)),
            };
            Measured {
                time_ms,
                tflops,
                gbps,
                extra_bytes: m.extra_bytes,
                error: time_ms.is_none().then(|| "no finite timing".to_string()),
            }
        }
        Err(e) => Measured {
            error: Some(e.to_string()),
            ..Measured::default()
        },
    }
}

fn shape_of(spec: &AttentionSpec) -> Shape {
    let cache = spec.kv_cache.as_ref();
    Shape {
        batch: spec.batch,
        heads: spec.heads_q,
        kv_heads: spec.heads_kv,
        seqlen_q: spec.seqlen_q,
        seqlen_k: spec.seqlen_k,
        head_dim: spec.head_dim,
        head_dim_v: spec.head_dim_v,
        dtype: spec.dtype.to_string(),
        causal: spec.causal,
        cache_len: cache.and_then(|c| c.seqlens.first()).map(|&l| l as usize),
        new_tokens: cache.map(|c| c.seqlen_new),
        page_size: cache.and_then(|c| match c.layout {
            CacheLayout::Paged { page_size, .. } => Some(page_size),
            CacheLayout::Contiguous { .. } => None,
        }),
    }
}

fn bytes(b: Option<u64>) -> String {
    b.map_or_else(|| "n/a".into(), |b| human(b as u128))
}
