//! Measured backend choice: time each candidate once per (device, shape bucket) and remember
//! the result on disk, so the runtime learns, e.g., that a software Vulkan adapter is slower
//! than the CPU backend instead of assuming a GPU always wins.

use flashattn_core::{Algorithm, AttentionSpec, Backend, BenchPlan};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Sequence lengths above this are measured at this length: enough to rank backends.
const PROXY_MAX_SEQLEN: usize = 4096;
const TUNE_PLAN: BenchPlan = BenchPlan {
    warmup: 1,
    iters: 2,
    seed: 0x7a11,
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
        let mut times = Vec::new();
        let mut measured_now = false;
        for b in candidates {
            let id = format!("{}@{}", b.name(), b.device());
            let cached = self.lock().get(&bucket).and_then(|m| m.get(&id)).copied();
            let ms = match cached {
                Some(ms) => Some(ms),
                None => {
                    measured_now = true;
                    let ms = measure(b.as_ref(), spec);
                    if let Some(ms) = ms {
                        self.lock()
                            .entry(bucket.clone())
                            .or_default()
                            .insert(id, ms);
                    }
                    ms
                }
            };
            times.push(ms);
        }
        if measured_now {
            self.save();
        }
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
            format!("fastest measured ({}; {source})", listing.join(", ")),
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

/// Median milliseconds of `backend` on a proxy of `spec`; `None` if it failed.
fn measure(backend: &dyn Backend, spec: &AttentionSpec) -> Option<f64> {
    let proxy = proxy(spec);
    match backend.bench(&proxy, Algorithm::Flash, &TUNE_PLAN, &mut || {}) {
        Ok(m) => m.median_ms(),
        Err(e) => {
            log::warn!("flashattn: autotune of {} failed: {e}", backend.name());
            None
        }
    }
}

/// The spec with its sequence lengths capped for timing (dense problems only).
fn proxy(spec: &AttentionSpec) -> AttentionSpec {
    let mut p = spec.clone();
    if p.varlen.is_none() {
        p.seqlen_q = p.seqlen_q.min(PROXY_MAX_SEQLEN);
        p.seqlen_k = p.seqlen_k.min(PROXY_MAX_SEQLEN);
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
