//! Measured backend choice: time each candidate once per (device, shape bucket) and remember
//! the result on disk, so the runtime learns, e.g., that a software Vulkan adapter is slower
//! than the CPU backend instead of assuming a GPU always wins.

use flashattn_core::{Algorithm, AttentionSpec, Backend, BenchPlan, Pass};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Tuning runs a shrunken copy of the problem: the first, quick round on one this small
/// (in FLOPs) weeds out backends far slower than the best (a software GPU adapter can be 100x
/// slower than the CPU), so that only close contenders are timed on the larger copy.
const QUICK_FLOPS: f64 = 5e7;
const FULL_FLOPS: f64 = 4e9;
/// A backend this many times slower than the best in the quick round is not timed further.
const SLOW_FACTOR: f64 = 4.0;
const QUICK_PLAN: BenchPlan = BenchPlan {
    warmup: 1,
    iters: 1,
    seed: 0x7a11,
    pass: Pass::Forward,
};
const FULL_PLAN: BenchPlan = BenchPlan {
    warmup: 1,
    iters: 2,
    seed: 0x7a12,
    pass: Pass::Forward,
};

/// bucket -> ("name@device" -> median milliseconds)
type Table = BTreeMap<String, BTreeMap<String, f64>>;

pub struct Autotuner {
    enabled: bool,
    path: Option<PathBuf>,
    table: Mutex<Table>,
}

impl Autotuner {
    /// Enabled unless `FLASHATTN_AUTOTUNE=0`; cached in `$FLASHATTN_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/flashattn`, else `~/.cache/flashattn`.
    pub fn from_env() -> Autotuner {
        let enabled = std::env::var("FLASHATTN_AUTOTUNE").map_or(true, |v| v != "0");
        let path = cache_dir().map(|d| d.join("autotune.json"));
        let table = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Autotuner {
            enabled,
            path,
            table: Mutex::new(table),
        }
    }

    pub fn in_memory(enabled: bool) -> Autotuner {
        Autotuner {
            enabled,
            path: None,
            table: Mutex::new(Table::new()),
        }
    }

    /// Index of the fastest candidate (given in static priority order) and why.
    pub fn fastest(
        &self,
        spec: &AttentionSpec,
        candidates: &[Arc<dyn Backend>],
    ) -> (usize, String) {
        if !self.enabled {
            return (0, "highest static priority (FLASHATTN_AUTOTUNE=0)".into());
        }
        let bucket = bucket(spec);
        let ids: Vec<String> = candidates
            .iter()
            .map(|b| format!("{}@{}", b.name(), b.device()))
            .collect();
        let cached: Option<Vec<Option<f64>>> = {
            let table = self.lock();
            let row = table.get(&bucket);
            ids.iter()
                .map(|id| row.and_then(|r| r.get(id)).copied().map(Some))
                .collect()
        };
        let measured_now = cached.is_none();
        let times = match cached {
            Some(times) => times,
            None => {
                let times = measure_all(spec, candidates);
                let mut table = self.lock();
                let row = table.entry(bucket.clone()).or_default();
                for (id, t) in ids.iter().zip(&times) {
                    if let Some(t) = t {
                        row.insert(id.clone(), *t);
                    }
                }
                drop(table);
                self.save();
                times
            }
        };
        let best = times
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i, t)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let Some((index, _)) = best else {
            return (
                0,
                "highest static priority (no candidate could be timed)".into(),
            );
        };
        let listing: Vec<String> = candidates
            .iter()
            .zip(&times)
            .map(|(b, t)| match t {
                Some(t) => format!("{} {t:.3} ms", b.name()),
                None => format!("{} failed", b.name()),
            })
            .collect();
        let source = if measured_now {
            "measured now"
        } else {
            "cached"
        };
        (
            index,
            format!(
                "fastest measured (proxy timings {}; {source})",
                listing.join(", ")
            ),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let text = match serde_json::to_string_pretty(&*self.lock()) {
            Ok(t) => t,
            Err(_) => return,
        };
        // A cache that cannot be written only costs a re-measure next time.
        let tmp = path.with_extension("json.tmp");
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::write(&tmp, text))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            log::warn!(
                "flashattn: cannot write the autotune cache {}: {e}",
                path.display()
            );
        }
    }
}

/// Estimated milliseconds of each candidate on a proxy of `spec`; `None` where it failed.
/// Candidates far behind in the quick round keep their quick time scaled up by the FLOP ratio.
fn measure_all(spec: &AttentionSpec, candidates: &[Arc<dyn Backend>]) -> Vec<Option<f64>> {
    let quick = shrink(spec, QUICK_FLOPS);
    let full = shrink(spec, FULL_FLOPS);
    let ratio = full.flops() / quick.flops().max(1.0);
    let quick_times: Vec<Option<f64>> = candidates
        .iter()
        .map(|b| time(b.as_ref(), &quick, &QUICK_PLAN))
        .collect();
    let best = quick_times
        .iter()
        .flatten()
        .copied()
        .fold(f64::INFINITY, f64::min);
    candidates
        .iter()
        .zip(quick_times)
        .map(|(b, t)| {
            let t = t?;
            if t > SLOW_FACTOR * best || ratio <= 1.0 {
                Some(t * ratio)
            } else {
                time(b.as_ref(), &full, &FULL_PLAN)
            }
        })
        .collect()
}

fn time(backend: &dyn Backend, spec: &AttentionSpec, plan: &BenchPlan) -> Option<f64> {
    match backend.bench(spec, Algorithm::Flash, plan, &mut || {}) {
        Ok(m) => m.median_ms(),
        Err(e) => {
            log::warn!("flashattn: autotune of {} failed: {e}", backend.name());
            None
        }
    }
}

/// A copy of a dense `spec` with its sequence lengths halved (the longer first) until its
/// FLOPs are at most `flops`; varlen problems are timed as they are.
fn shrink(spec: &AttentionSpec, flops: f64) -> AttentionSpec {
    let mut p = spec.clone();
    if p.varlen.is_some() {
        return p;
    }
    while p.flops() > flops && p.seqlen_q.max(p.seqlen_k) > 16 {
        if p.seqlen_k >= p.seqlen_q {
            p.seqlen_k = p.seqlen_k.div_ceil(2);
        } else {
            p.seqlen_q = p.seqlen_q.div_ceil(2);
        }
    }
    p
}

/// Problems in one bucket rank the backends the same way: same kind of work, sizes within 2x.
fn bucket(spec: &AttentionSpec) -> String {
    let log2 = |x: usize| usize::BITS - x.max(1).leading_zeros();
    format!(
        "{} d{} dv{} g{} c{} w{} s{} a{} v{} sq{} sk{} bh{}",
        spec.dtype,
        spec.head_dim,
        spec.head_dim_v,
        spec.group_size(),
        spec.causal as u8,
        (spec.window != (-1, -1)) as u8,
        (spec.softcap > 0.0) as u8,
        spec.alibi.is_some() as u8,
        spec.is_varlen() as u8,
        log2(spec.seqlen_q),
        log2(spec.seqlen_k),
        log2(spec.batch * spec.heads_q),
    )
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FLASHATTN_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("flashattn"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("flashattn"))
}
