//! Measured backend choice: time each candidate once per (device, pass, shape bucket) and
//! remember the result on disk, so the runtime learns, e.g., that a software Vulkan adapter is
//! slower than the CPU backend instead of assuming a GPU always wins.

use crate::store::JsonStore;
use flashattn_core::{Algorithm, AttentionSpec, Backend, BenchPlan, BenchRun, CacheLayout, Pass};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Tuning runs a shrunken copy of the problem: the first, quick round on one this small
/// (in FLOPs) weeds out backends far slower than the best (a software GPU adapter can be 100x
/// slower than the CPU), so that only close contenders are timed on the larger copy.
const QUICK_FLOPS: f64 = 5e7;
const FULL_FLOPS: f64 = 4e9;
/// A backend this many times slower than the best in the quick round is not timed further.
const SLOW_FACTOR: f64 = 4.0;
/// Cached timings outside (0, MAX_MS] are not measurements (a hand-edited or corrupt file).
const MAX_MS: f64 = 1e7;

/// bucket -> ("name@device" -> median milliseconds)
type Table = BTreeMap<String, BTreeMap<String, f64>>;

pub struct Autotuner {
    enabled: bool,
    store: Option<JsonStore>,
    table: Mutex<Table>,
}

impl Autotuner {
    /// Timings cached in `dir/autotune.json` when `dir` is given, else in memory only.
    pub fn new(enabled: bool, dir: Option<&Path>) -> Autotuner {
        let store = dir.map(|d| JsonStore::new(d, "autotune.json"));
        let table = store.as_ref().map_or_else(Table::new, |s| sane(s.load()));
        Autotuner {
            enabled,
            store,
            table: Mutex::new(table),
        }
    }

    /// The candidates' indices (given in static priority order), fastest first, and why.
    pub fn rank(
        &self,
        spec: &AttentionSpec,
        pass: Pass,
        candidates: &[Arc<dyn Backend>],
    ) -> (Vec<usize>, String) {
        let static_order = (0..candidates.len()).collect();
        if !self.enabled {
            return (
                static_order,
                "highest static priority (FLASHATTN_AUTOTUNE=0)".into(),
            );
        }
        let bucket = bucket(spec, pass);
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
                let times = measure_all(spec, pass, candidates);
                self.remember(&bucket, &ids, &times);
                times
            }
        };
        if times.iter().all(Option::is_none) {
            return (
                static_order,
                "highest static priority (no candidate could be timed)".into(),
            );
        }
        let mut order: Vec<usize> = static_order;
        // Stable: ties and untimed candidates keep their static priority, untimed last.
        order.sort_by(|&a, &b| match (times[a], times[b]) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
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
            order,
            format!(
                "fastest measured ({} proxy timings {}; {source})",
                pass.name(),
                listing.join(", ")
            ),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the timings in memory and merges them into the file (other processes' buckets
    /// and entries stay).
    fn remember(&self, bucket: &str, ids: &[String], times: &[Option<f64>]) {
        let fresh: Vec<(&String, f64)> = ids
            .iter()
            .zip(times)
            .filter_map(|(id, t)| t.filter(|&t| plausible(t)).map(|t| (id, t)))
            .collect();
        let mut table = self.lock();
        let row = table.entry(bucket.to_string()).or_default();
        for &(id, t) in &fresh {
            row.insert(id.clone(), t);
        }
        drop(table);
        if let Some(store) = &self.store {
            store.update(|file| {
                let row = &mut file[bucket];
                if !row.is_object() {
                    *row = Value::Object(Default::default());
                }
                for &(id, t) in &fresh {
                    row[id.as_str()] = t.into();
                }
            });
        }
    }
}

fn plausible(ms: f64) -> bool {
    ms.is_finite() && ms > 0.0 && ms <= MAX_MS
}

/// The table in a loaded file, without entries that are not plausible timings.
fn sane(file: Value) -> Table {
    let mut table = Table::new();
    let Value::Object(buckets) = file else {
        return table;
    };
    for (bucket, row) in buckets {
        let Value::Object(row) = row else { continue };
        let row: BTreeMap<String, f64> = row
            .into_iter()
            .filter_map(|(id, t)| t.as_f64().filter(|&t| plausible(t)).map(|t| (id, t)))
            .collect();
        if !row.is_empty() {
            table.insert(bucket, row);
        }
    }
    table
}

/// Estimated milliseconds of each candidate on a proxy of `spec`; `None` where it failed.
/// Candidates far behind in the quick round keep their quick time scaled up by the FLOP ratio.
fn measure_all(
    spec: &AttentionSpec,
    pass: Pass,
    candidates: &[Arc<dyn Backend>],
) -> Vec<Option<f64>> {
    let quick = shrink(spec, QUICK_FLOPS);
    let full = shrink(spec, FULL_FLOPS);
    let ratio = full.flops() / quick.flops().max(1.0);
    let plan = |seed, iters| BenchPlan {
        warmup: 1,
        iters,
        seed,
        pass,
    };
    let quick_times: Vec<Option<f64>> = candidates
        .iter()
        .map(|b| time(b.as_ref(), &quick, &plan(0x7a11, 1)))
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
                time(b.as_ref(), &full, &plan(0x7a12, 2))
            }
        })
        .collect()
}

fn time(backend: &dyn Backend, spec: &AttentionSpec, plan: &BenchPlan) -> Option<f64> {
    match backend.bench(BenchRun::new(spec, Algorithm::Flash, plan, &mut || {})) {
        Ok(m) => m.median_ms(),
        Err(e) => {
            log::warn!("flashattn: autotune of {} failed: {e}", backend.name());
            None
        }
    }
}

/// A copy of a dense `spec` with its sequence lengths halved (the longer first) until its
/// FLOPs are at most `flops`; varlen and decode problems are timed as they are.
fn shrink(spec: &AttentionSpec, flops: f64) -> AttentionSpec {
    // Timed on contiguous random inputs (a strided spec's own buffers are the caller's).
    let mut p = spec.contiguous();
    if !p.is_uniform() {
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

/// Problems in one bucket rank the backends the same way: the same pass and kind of work,
/// sizes within 2x.
fn bucket(spec: &AttentionSpec, pass: Pass) -> String {
    let log2 = |x: usize| usize::BITS - x.max(1).leading_zeros();
    let (_, max_k) = spec.max_lens();
    let mut key = format!(
        "{} {} d{} dv{} g{} c{} w{} s{} a{} v{} sq{} sk{} bh{}",
        pass.name(),
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
        log2(max_k),
        log2(spec.batch.saturating_mul(spec.heads_q)),
    );
    if let Some(cache) = &spec.kv_cache {
        let page = match cache.layout {
            CacheLayout::Paged { page_size, .. } => page_size,
            CacheLayout::Contiguous { .. } => 0,
        };
        key += &format!(
            " new{} page{} rot{}",
            log2(cache.seqlen_new),
            log2(page),
            cache.rotary.is_some() as u8
        );
    }
    key
}
