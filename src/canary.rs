//! The canary: before the runtime trusts a (device, kernel variant) for the first time, it runs
//! a small problem of the same kind on that backend and compares it with the f64 reference.
//! A mismatch (or a failure, or NaN) marks the variant broken, in memory and in
//! `canary.json` in the cache directory, and the runtime falls back to another backend.
//! The verdict is kept per variant, so a correct kernel is checked once, not per call.

use crate::canary_problem::small_problem;
use crate::canary_twin::Strided;
use crate::store::JsonStore;
use flashattn_core::testing::{check_backend, check_backward, check_decode, CheckReport};
use flashattn_core::{AttentionSpec, Backend, Pass};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// Records of other flashattn versions are ignored: their kernels may differ.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const SEED: u64 = 0xca7a_7e57;

/// What the canary concluded about one (device, kernel variant).
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Passed,
    /// Wrong results or a failure on the small problem; the detail says which.
    Broken(String),
    /// No small problem of this variant could be built; trusted, with a warning.
    Unchecked(String),
}

type Key = (String, String);

pub struct Canary {
    enabled: bool,
    store: Option<JsonStore>,
    /// Verdicts of this process; a `OnceLock` per key so concurrent callers run one canary.
    verdicts: Mutex<HashMap<Key, Arc<OnceLock<Verdict>>>>,
    /// Verdicts recorded by earlier processes (device -> variant -> verdict).
    recorded: HashMap<Key, Verdict>,
}

impl Canary {
    pub fn new(enabled: bool, dir: Option<&Path>) -> Canary {
        let store = dir.map(|d| JsonStore::new(d, "canary.json"));
        let recorded = store
            .as_ref()
            .map_or_else(HashMap::new, |s| recorded(s.load()));
        Canary {
            enabled,
            store,
            verdicts: Mutex::new(HashMap::new()),
            recorded,
        }
    }

    /// Where verdicts are recorded, for messages.
    pub fn record_path(&self) -> String {
        self.store.as_ref().map_or_else(
            || "memory only: no cache directory".into(),
            |s| s.path().display().to_string(),
        )
    }

    /// The verdict on the kernel variant that runs `pass` of `spec` on `backend`: recorded,
    /// or measured now (once per process and variant). The CPU backend is not checked.
    pub fn check(&self, backend: &dyn Backend, spec: &AttentionSpec, pass: Pass) -> Verdict {
        if !self.enabled || backend.name() == "cpu" {
            return Verdict::Passed;
        }
        let key = (backend.device(), backend.kernel_variant(spec, pass));
        let cell = {
            let mut map = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        cell.get_or_init(|| match self.recorded.get(&key) {
            Some(v) => v.clone(),
            None => self.run(backend, spec, pass, &key),
        })
        .clone()
    }

    fn run(&self, backend: &dyn Backend, spec: &AttentionSpec, pass: Pass, key: &Key) -> Verdict {
        let (device, variant) = key;
        let verdict = match small_problem(backend, spec, pass) {
            Err(why) => Verdict::Unchecked(why),
            Ok(small) => match compare(backend, &small, pass) {
                Ok(report) => {
                    log::info!(
                        "flashattn: canary of {variant} on {device} passed on {small}: relative L2 {:.2e}",
                        report.rel_l2
                    );
                    Verdict::Passed
                }
                Err(why) => Verdict::Broken(why),
            },
        };
        match &verdict {
            Verdict::Passed => {}
            Verdict::Broken(why) => log::warn!(
                "flashattn: canary of {variant} on {device} FAILED, not used: {why} (recorded in {})",
                self.record_path()
            ),
            Verdict::Unchecked(why) => {
                log::warn!("flashattn: {variant} on {device} is not checked by a canary: {why}");
                return verdict;
            }
        }
        if let Some(store) = &self.store {
            let record = match &verdict {
                Verdict::Broken(why) => {
                    json!({"status": "broken", "error": why, "version": VERSION})
                }
                _ => json!({"status": "passed", "version": VERSION}),
            };
            store.update(|file| {
                let entry = &mut file[device.as_str()];
                if !entry.is_object() {
                    *entry = Value::Object(Default::default());
                }
                entry[variant.as_str()] = record;
            });
        }
        verdict
    }
}

/// Runs the small problem on `backend` and compares with the reference; a panic is a failure.
pub(crate) fn compare(
    backend: &dyn Backend,
    small: &AttentionSpec,
    pass: Pass,
) -> Result<CheckReport, String> {
    let check = match pass {
        Pass::Forward => check_backend,
        Pass::Backward => check_backward,
        Pass::Decode => check_decode,
    };
    // The reference reads contiguous inputs: a strided twin runs on padded copies of them.
    let strided = Strided {
        inner: backend,
        strides: small.strides,
    };
    let (backend, spec): (&dyn Backend, _) = if small.strides.is_contiguous() {
        (backend, small.clone())
    } else {
        (&strided, small.contiguous())
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(backend, &spec, SEED)))
        .unwrap_or_else(|_| Err(format!("{} panicked on {small}", backend.name())))
}

/// Verdicts of this version in a loaded `canary.json`.
fn recorded(file: Value) -> HashMap<Key, Verdict> {
    let mut out = HashMap::new();
    let Value::Object(devices) = file else {
        return out;
    };
    for (device, variants) in devices {
        let Value::Object(variants) = variants else {
            continue;
        };
        for (variant, r) in variants {
            if r["version"] != VERSION {
                continue;
            }
            let verdict = match r["status"].as_str() {
                Some("passed") => Verdict::Passed,
                Some("broken") => Verdict::Broken(format!(
                    "recorded as broken: {}",
                    r["error"].as_str().unwrap_or("no detail")
                )),
                _ => continue,
            };
            out.insert((device.clone(), variant), verdict);
        }
    }
    out
}
